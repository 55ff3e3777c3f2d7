"""Stylora: artistic style transfer for ComfyUI (Stable Diffusion 1.5 style LoRAs).

ComfyUI loads this folder as a custom-node package and reads the mappings below. Keep this file light:
the CLI (`stylora ...`) imports it too, and nothing here may import ComfyUI's modules.
"""

from .core.version import __version__
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./nodes/web"  # StyleMetrics' on-node text display (a frontend extension)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
