"""Resumable training checkpoints, written so that a crash or `kill -9` never leaves a half one in use.

<output stem>.checkpoints/
    step-00000500/         complete: renamed into place only after every file and COMPLETE were written
        trainable.safetensors   the trained weights: LoRA adapters (peft keys) or a whole UNet
        state.pt              optimizer and LR-schedule state (loaded with weights_only=True)
        info.json             step, config, dataset fingerprint
        COMPLETE              marker
    .step-00001000.tmp-123  an interrupted write: ignored, removed on the next save
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"


def checkpoint_root(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / f"{output.stem}.checkpoints"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; incomplete ones are logged and skipped."""
    found = []
    if not root.is_dir():
        return found
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        if (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
        else:
            logger.warning("skipping incomplete checkpoint %s (no %s marker)", d, MARKER)
    return sorted(found)


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    info: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint `step` into a temporary folder, mark it complete, rename it into place, prune old ones."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "info.json").write_text(json.dumps({"step": step, **info}, indent=2), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / MARKER).write_text(f"{step}\n", encoding="utf-8")
    _fsync_dir(tmp)
    final = root / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trained weights, optimizer/schedule state, info) of a complete checkpoint folder."""
    from safetensors.torch import load_file

    if not (folder / MARKER).is_file():
        raise ValueError(f"{folder}: incomplete checkpoint (no {MARKER} marker)")
    weights = load_file(str(folder / "trainable.safetensors"))
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    return weights, state, info
