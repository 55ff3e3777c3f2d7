"""Stylora: artistic style transfer for ComfyUI (Stable Diffusion 1.5 style LoRAs).

ComfyUI loads this folder as a custom-node package and reads the mappings below. Keep this file light:
the CLI (`stylora ...`) imports it too, and nothing here may import ComfyUI's modules.
"""

__version__ = "0.1.0"  # defined before the imports below, which may read it

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./nodes/web"  # StyleMetrics' on-node text display (a frontend extension)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
