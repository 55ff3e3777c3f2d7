"""LoadStyleLoRA: apply one style LoRA, or a weighted blend of up to three, to ComfyUI's MODEL and CLIP.

A thin layer: the fit check and blend weights are `core.lora_file` functions; the patching is ComfyUI's own
`comfy.sd.load_lora_for_models`, so the result is what stock LoraLoader would give for a file that fits.
"""

from __future__ import annotations

import os
from typing import Any

from ..core.lora_file import check_lora_fits, normalize_blend, read_lora
from ..core.strength_rule import SUGGESTED_DENOISE, read_calibration
from .host import (
    CALIBRATION_ATTACHMENT,
    STYLE_ATTACHMENT,
    attach,
    attachment,
    clip_patcher,
    load_lora,
    lora_key_map,
    sd15_mismatch,
    style_adapters,
    style_files,
    style_path,
    weight_shapes,
)

NONE = "None"
USED_BY = "Load Style LoRA"


def file_signature(path: str) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten or replaced under the same name: (inode, size, mtime, ctime) in ns.
    The mtime alone misses a copy that keeps the old file's time (cp -p, sync tools, an unpacked archive); ctime
    and the inode change with every write or rename onto the name."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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
        self._cache: dict[tuple, tuple[dict, dict]] = {}  # (path, file_signature) -> (tensors, metadata)

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
            keys.append((path, file_signature(path)))
        self._cache = {k: self._cache[k] if k in self._cache else read_lora(k[0]) for k in keys}
        return [self._cache[k] for k in keys]

    def load(self, model, clip, style: str, strength: float, style_2: str = NONE, weight_2: float = 1.0,
             style_3: str = NONE, weight_3: float = 1.0):
        # 1. Only SD1.5: the styles' layers and widths are SD1.5's.
        other = sd15_mismatch(model, USED_BY)
        if other is not None:
            raise ValueError(f"LoadStyleLoRA: the model is {other}; Stylora styles are for SD1.5 "
                             "checkpoints (load one with Load Checkpoint)")
        # 2. The styles and their normalised blend weights.
        picks = [(style, 1.0)] + [(s, w) for s, w in ((style_2, weight_2), (style_3, weight_3)) if s != NONE and w]
        weights = normalize_blend([w for _, w in picks])
        # 3. ComfyUI's own key map and the model's weight shapes, for the fit check.
        key_map = lora_key_map(model, clip, USED_BY)
        shapes = weight_shapes(model, clip, USED_BY)
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
        calibrations = list(attachment(before, CALIBRATION_ATTACHMENT, USED_BY) or ())
        for (name, state, meta, calibration), w in zip(loaded, weights):
            model, clip = load_lora(model, clip, state, strength * w, strength * w, USED_BY)
            calibrations.append((calibration.to_json() if calibration else None, strength * w))
            info["styles"].append({"name": name, "weight": w, "trigger": meta.get("stylora.trigger")
                                   or meta.get("modelspec.trigger_phrase", ""),
                                   "suggested_denoise": float(meta.get("stylora.suggested_denoise", SUGGESTED_DENOISE)),
                                   "base_model": meta.get("stylora.base_model", meta.get("ss_sd_model_name", "")),
                                   "calibrated": calibration is not None,
                                   "calibration": calibration.to_json() if calibration else None})
        # 5. Record which patches are styles (ours and those of earlier Load Style LoRA nodes) for StyleStrength.
        attach(model, STYLE_ATTACHMENT, style_adapters(before, model, USED_BY), USED_BY)
        attach(model, CALIBRATION_ATTACHMENT, tuple(calibrations), USED_BY)  # Style Strength's remap
        if clip is not None:  # text-encoder patches (lora_te_* keys), which Style Strength scales too
            patcher = clip_patcher(clip, USED_BY)
            attach(patcher, STYLE_ATTACHMENT, style_adapters(clip_patcher(before_clip, USED_BY), patcher, USED_BY),
                   USED_BY)
        info["trigger"] = ", ".join(s["trigger"] for s in info["styles"] if s["trigger"])
        info["calibrated"] = all(s["calibrated"] for s in info["styles"])
        info["suggested_denoise"] = sum(s["suggested_denoise"] * abs(s["weight"]) for s in info["styles"])
        return (model, clip, info, info["trigger"])
