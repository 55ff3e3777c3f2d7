"""Stylora: artistic style transfer for ComfyUI (Stable Diffusion 1.5 style LoRAs).

ComfyUI loads this folder as a custom-node package and reads the mappings below. Keep this file light:
the CLI (`stylora ...`) imports it too, and nothing here may import ComfyUI's modules. The node mappings are
imported on first access (PEP 562): ComfyUI reads them right after importing the package, while `stylora --help`
never does and so does not wait for torch.
"""

from typing import Any

from .core.version import __version__

WEB_DIRECTORY = "./nodes/web"  # StyleMetrics' on-node text display (a frontend extension)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from . import nodes  # heavy: the nodes import torch; only ComfyUI needs them

        return getattr(nodes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
