"""What the nodes need from ComfyUI's internals, checked where they touch them.

The pack is tested with ComfyUI 0.3.64 (backend); ComfyUI's internals (`comfy.*`, `folder_paths`, ModelPatcher's
methods and fields) are not a stable API. Each node calls `has_module` / `has_attrs` just before it uses one: when a
piece is absent (a renamed function, a moved module), the log says once which piece and which node needs it, so a
person reading ComfyUI's console sees the cause before the AttributeError. The nodes then go on as before (a piece
may have moved only for a feature the run does not use).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

logger = logging.getLogger(__name__)

TESTED_WITH = "ComfyUI 0.3.64"
_warned: set[str] = set()  # pieces already reported: one warning per piece per process


def has_module(module: str, *names: str, used_by: str) -> bool:
    """True when `module` imports and has every attribute in `names`; otherwise warns once per missing piece
    (e.g. `comfy.sd.load_lora_for_models`), naming it and `used_by` (the node), and returns False. Outside ComfyUI
    (its top-level package does not import: the pack's own tests, the CLI) there is no host to report on: False,
    silently."""
    try:
        importlib.import_module(module.split(".")[0])
    except ImportError:
        return False
    try:
        found = importlib.import_module(module)
    except ImportError:
        return _report([module], used_by)
    return _report([f"{module}.{n}" for n in names if not hasattr(found, n)], used_by)


def has_attrs(obj: Any, label: str, *names: str, used_by: str) -> bool:
    """True when `obj` has every attribute in `names`; otherwise warns once per missing piece (`label.name`, e.g.
    `ModelPatcher.patches_uuid`), naming it and `used_by`, and returns False."""
    return _report([f"{label}.{n}" for n in names if not hasattr(obj, n)], used_by)


def _report(missing: list[str], used_by: str) -> bool:
    for piece in missing:
        if piece not in _warned:
            _warned.add(piece)
            logger.warning("Stylora: ComfyUI has no %s, which %s needs (tested with %s); this node may fail or "
                           "behave differently on this ComfyUI version", piece, used_by, TESTED_WITH)
    return not missing


# === Model folders and file lookups (folder_paths) ===========================================================


# === LoRA patches on ModelPatcher and CLIP (Load Style LoRA, Style Strength) =================================


# === The VAE (Content Encode's float32 copy) ==================================================================


# === Devices, progress, Cancel and memory (Style Metrics, Train Style) ========================================


# === Attention patches and the model wrapper (Style From Image) ===============================================
