"""ComfyUI node declarations. Plain V1 node classes; ComfyUI's internals are reached only through `nodes.host`,
whose functions import `comfy` when called, so this package imports (and is tested) without ComfyUI."""

import logging

from ..eval.weights import use_host_folders
from .colour import KeepPhotoColours
from .content import ContentEncode
from .host import HostMismatch, metrics_folders, register_model_folders
from .mask import MaskedStyleApply
from .metrics import StyleMetrics
from .strength import StyleStrength
from .style_image import StyleFromImage
from .style_lora import LoadStyleLoRA
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

# Inside ComfyUI: models/styles and models/stylora_metrics become model folders (outside it there is nothing to
# register), and the metrics' weights are looked up in the latter first. A ComfyUI whose folder_paths changed is
# logged, not raised: the other nodes still load.
try:
    register_model_folders()
except HostMismatch as e:
    logging.getLogger(__name__).warning("%s", e)
use_host_folders(metrics_folders)
