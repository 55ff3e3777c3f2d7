"""LoadStyleLoRA: apply one style LoRA, or a weighted blend of up to three, to ComfyUI's MODEL and CLIP.

A thin layer: the fit check and blend weights are `core.lora_file` functions; the patching is ComfyUI's own
`comfy.sd.load_lora_for_models`, so the result is what stock LoraLoader would give for a file that fits.
"""

from __future__ import annotations

import os
from typing import Any

from ..core.lora_file import check_lora_fits, normalize_blend, read_lora
from ..core.strength_rule import SUGGESTED_DENOISE, read_calibration
from ..eval.weights import METRICS_FOLDER_KEY
from .host import has_attrs, has_module
from .strength import CALIBRATION_ATTACHMENT, STYLE_ATTACHMENT

STYLE_FOLDER_KEY = "stylora"  # folder_paths key of models/styles (namespaced: ComfyUI has no generic "styles")
NONE = "None"


def style_files() -> list[str]:
    """Style files ComfyUI can see: models/styles first, then models/loras (empty without ComfyUI)."""
    try:
        import folder_paths
    except ImportError:
        return []
    names: list[str] = []
    for key in (STYLE_FOLDER_KEY, "loras"):
        if key in folder_paths.folder_names_and_paths:
            names += [n for n in folder_paths.get_filename_list(key) if n not in names]
    return names


def style_path(name: str) -> str:
    import folder_paths

    for key in (STYLE_FOLDER_KEY, "loras"):
        if key in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(key, name)
            if path:
                return path
    raise FileNotFoundError(f"LoadStyleLoRA: style {name!r} is in neither models/styles nor models/loras")


def register_model_folders(folder_paths: Any) -> None:
    """Add models/styles under the key 'stylora' and models/stylora_metrics (Style Metrics' network weights) under
    'stylora_metrics', each merged with any extra_model_paths.yaml entry for its key."""
    if not has_attrs(folder_paths, "folder_paths", "models_dir", "folder_names_and_paths", "supported_pt_extensions",
                     used_by="the models/styles folder"):
        return
    for key, folder in ((STYLE_FOLDER_KEY, "styles"), (METRICS_FOLDER_KEY, "stylora_metrics")):
        default = os.path.join(folder_paths.models_dir, folder)
        entry = folder_paths.folder_names_and_paths.get(key)
        if entry is None:
            folder_paths.folder_names_and_paths[key] = ([default], set(folder_paths.supported_pt_extensions))
        elif default not in entry[0]:
            entry[0].append(default)


def style_adapters(before: Any, after: Any) -> tuple:
    """Adapters of the style patches on `after`: those recorded on `before` plus every patch `after` added."""
    known = tuple(before.get_attachment(STYLE_ATTACHMENT) or ())
    old = {id(p) for plist in before.patches.values() for p in plist}
    added = tuple(p[1] for plist in after.patches.values() for p in plist if id(p) not in old)
    return known + added


class LoadStyleLoRA:
    """Loads a Stylora style (or any SD1.5 kohya LoRA) onto the model, refusing files that do not fit it."""

    CATEGORY = "Stylora"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STYLORA_STYLE", "STRING")  # new outputs go last: saved links keep slots
    RETURN_NAMES = ("model", "clip", "style_info", "trigger")
    OUTPUT_TOOLTIPS = (
        "The model with the style's weights patched in.",
        "The text encoder, patched too when the style carries text-encoder weights.",
        "What was applied: style names, blend weights, trigger phrase, the trainer's suggested denoise and whether "
        "each style is calibrated (stylora calibrate).",
        "The prompt the style was trained with: its trigger phrase, or empty for a promptless style. Wire into "
        "the positive CLIPTextEncode's text so the sampler is conditioned as in training.",
    )
    DESCRIPTION = ("Applies a style LoRA from models/styles or models/loras to an SD1.5 model. Optional second and "
                   "third styles are blended with the first by weight (weights are normalised to sum to 1, then "
                   "scaled by strength). LoRAs made for SDXL, SD2 or damaged files are refused with the reason "
                   "instead of being half-applied.")

    def __init__(self) -> None:
        self._cache: dict[tuple[str, float], tuple[dict, dict]] = {}  # (path, mtime) -> (tensors, metadata)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        styles = style_files()
        weight = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 model, e.g. from Load Checkpoint."}),
                "clip": ("CLIP", {"tooltip": "The CLIP text encoder of the same checkpoint."}),
                "style": (styles, {"tooltip": "The style file (models/styles or models/loras)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05,
                                       "tooltip": "How strongly the (blended) style is applied; 0 leaves the model "
                                                  "unchanged, 1 is the strength it was trained at."}),
            },
            "optional": {
                "style_2": ([NONE, *styles], {"default": NONE, "tooltip": "A second style to blend in (optional)."}),
                "weight_2": ("FLOAT", {**weight, "tooltip": "Blend weight of style_2 relative to style (weight 1)."}),
                "style_3": ([NONE, *styles], {"default": NONE, "tooltip": "A third style to blend in (optional)."}),
                "weight_3": ("FLOAT", {**weight, "tooltip": "Blend weight of style_3 relative to style (weight 1)."}),
            },
        }

    def _read_all(self, names: list[str]) -> list[tuple[dict, dict]]:
        """(tensors, metadata) of each style; the files of this blend stay cached for the next run of the node."""
        keys = []
        for name in names:
            path = style_path(name)
            keys.append((path, os.path.getmtime(path)))
        self._cache = {k: self._cache[k] if k in self._cache else read_lora(k[0]) for k in keys}
        return [self._cache[k] for k in keys]

    def load(self, model, clip, style: str, strength: float, style_2: str = NONE, weight_2: float = 1.0,
             style_3: str = NONE, weight_3: float = 1.0):
        import comfy.lora
        import comfy.sd
        import comfy.supported_models

        has_module("comfy.lora", "model_lora_keys_unet", "model_lora_keys_clip", used_by="Load Style LoRA")
        has_module("comfy.sd", "load_lora_for_models", used_by="Load Style LoRA")
        has_module("comfy.supported_models", "SD15", used_by="Load Style LoRA")
        # 1. Only SD1.5: the styles' layers and widths are SD1.5's.
        config = model.model.model_config
        if not isinstance(config, comfy.supported_models.SD15):
            raise ValueError(f"LoadStyleLoRA: the model is {type(config).__name__}; Stylora styles are for SD1.5 "
                             "checkpoints (load one with Load Checkpoint)")
        # 2. The styles and their normalised blend weights.
        picks = [(style, 1.0)] + [(s, w) for s, w in ((style_2, weight_2), (style_3, weight_3)) if s != NONE and w]
        weights = normalize_blend([w for _, w in picks])
        # 3. ComfyUI's own key map and the model's weight shapes, for the fit check.
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
        shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
        # 4. Check every style before patching anything, then patch each at strength * weight.
        loaded = []
        for (name, _), (state, meta) in zip(picks, self._read_all([name for name, _ in picks])):
            problems = check_lora_fits(state, key_map, shapes)
            if problems:
                raise ValueError(f"LoadStyleLoRA: style {name!r} ({style_path(name)}) does not fit this SD1.5 model "
                                 f"(an SDXL or SD2 LoRA, or a damaged file?): " + "; ".join(problems))
            try:
                calibration = read_calibration(meta)
            except ValueError as e:
                raise ValueError(f"LoadStyleLoRA: style {name!r} ({style_path(name)}): {e}; run stylora calibrate "
                                 "again") from e
            loaded.append((name, state, meta, calibration))
        info: dict[str, Any] = {"styles": [], "strength": strength}
        before, before_clip = model, clip
        calibrations = list(before.get_attachment(CALIBRATION_ATTACHMENT) or ())
        for (name, state, meta, calibration), w in zip(loaded, weights):
            model, clip = comfy.sd.load_lora_for_models(model, clip, state, strength * w, strength * w)
            calibrations.append((calibration.to_json() if calibration else None, strength * w))
            info["styles"].append({"name": name, "weight": w, "trigger": meta.get("stylora.trigger")
                                   or meta.get("modelspec.trigger_phrase", ""),
                                   "suggested_denoise": float(meta.get("stylora.suggested_denoise", SUGGESTED_DENOISE)),
                                   "base_model": meta.get("stylora.base_model", meta.get("ss_sd_model_name", "")),
                                   "calibrated": calibration is not None,
                                   "calibration": calibration.to_json() if calibration else None})
        # 5. Record which patches are styles (ours and those of earlier Load Style LoRA nodes) for StyleStrength.
        model.set_attachments(STYLE_ATTACHMENT, style_adapters(before, model))
        model.set_attachments(CALIBRATION_ATTACHMENT, tuple(calibrations))  # Style Strength's remap
        if clip is not None:  # text-encoder patches (lora_te_* keys), which Style Strength scales too
            clip.patcher.set_attachments(STYLE_ATTACHMENT, style_adapters(before_clip.patcher, clip.patcher))
        info["trigger"] = ", ".join(s["trigger"] for s in info["styles"] if s["trigger"])
        info["calibrated"] = all(s["calibrated"] for s in info["styles"])
        info["suggested_denoise"] = sum(s["suggested_denoise"] * abs(s["weight"]) for s in info["styles"])
        return (model, clip, info, info["trigger"])
