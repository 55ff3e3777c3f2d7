"""ComfyUI node declarations. Plain V1 node classes; `comfy` is imported only inside the functions that need
it, so this package imports (and is tested) without ComfyUI."""

from .colour import KeepPhotoColours
from .content import ContentEncode
from .mask import MaskedStyleApply
from .metrics import StyleMetrics
from .strength import StyleStrength
from .style_image import StyleFromImage
from .style_lora import LoadStyleLoRA, register_model_folders
from .training import TrainStyle

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LoadStyleLoRA": LoadStyleLoRA,
    "ContentEncode": ContentEncode,
    "StyleStrength": StyleStrength,
    "MaskedStyleApply": MaskedStyleApply,
    "StyleMetrics": StyleMetrics,
    "StyleFromImage": StyleFromImage,
    "KeepPhotoColours": KeepPhotoColours,
    "TrainStyle": TrainStyle,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LoadStyleLoRA": "Load Style LoRA (Stylora)",
    "ContentEncode": "Content Encode (Stylora)",
    "StyleStrength": "Style Strength (Stylora)",
    "MaskedStyleApply": "Masked Style Apply (Stylora)",
    "StyleMetrics": "Style Metrics (Stylora)",
    "StyleFromImage": "Style From Image (Stylora)",
    "KeepPhotoColours": "Keep Photo Colours (Stylora)",
    "TrainStyle": "Train Style LoRA (Stylora)",
}

try:  # inside ComfyUI: make models/styles a model folder; elsewhere there is nothing to register
    import folder_paths
except ImportError:
    folder_paths = None
if folder_paths is not None:
    register_model_folders(folder_paths)
