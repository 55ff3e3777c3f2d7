"""StyleStrength: one knob, 0..1, that sets how much of the style's LoRA weight is applied, how much of the content
photo the sampler may repaint (KSampler's denoise) and how hard a layout guard (ControlNet) holds the photo's edges.

The rule is `core.strength_rule` (documented in the README, "Style strength"):

    lora_scale(s) = min(1, s / FULL_STYLE_AT)      the style's trained weight is reached at s = 0.5
    denoise(s)    = s * max_denoise                 max_denoise defaults to 0.75
    guard(s)      = denoise(s)                      ControlNet weight, for the layout_guard workflow

Why two ramps: denoise decides how much of the photo's layout survives (img2img, Meng et al. 2022, SDEdit),
the LoRA weight how far the colours and strokes move toward the style. Low strengths should recolour without
redrawing, so the LoRA ramps up faster than denoise. At s = 0 both are 0: the style's patches are removed
from the MODEL and, when the CLIP is connected, from the text encoder too (LoRAs with `lora_te_*` keys), so both
are the base checkpoint's, bit for bit; KSampler with denoise 0 returns the content latent untouched.
Style From Image's injection follows the LoRA ramp (its output blend); at s = 0 it is removed too.
A style whose file carries a calibration (`stylora calibrate`) first has s remapped so that s gives the same SSIM to
the photo for every calibrated style; Load Style LoRA records the calibrations on the model.
"""

from __future__ import annotations

from typing import Any

from ..core.strength_rule import (
    FULL_STYLE_AT,
    Calibration,
    blend_strength,
    guard_weight,
    style_schedule,
)
from .host import (
    CALIBRATION_ATTACHMENT,
    INJECTION_ATTACHMENT,
    STYLE_ATTACHMENT,
    attachment,
    rescale_clip_style,
    rescale_style_injection,
    scaled_clone,
)

USED_BY = "Style Strength"


class StyleStrength:
    """Turns one 0..1 style strength into the style's LoRA weight and KSampler's denoise."""

    CATEGORY = "Stylora"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "FLOAT", "CLIP", "FLOAT", "STRING")  # new outputs last: saved links keep their slots
    RETURN_NAMES = ("model", "denoise", "clip", "guard", "mapping")
    OUTPUT_TOOLTIPS = (
        "The model with the style's weight scaled (strength 0: the base model itself).",
        "Wire into KSampler's denoise (right-click KSampler > convert denoise to input if your frontend needs it).",
        "The text encoder with the style's text-encoder weights scaled the same way (strength 0: the base CLIP); "
        "wire into the prompt encoders. Only set when the clip input is connected.",
        "The layout guard's weight (= denoise): wire into ControlNet Apply's strength so the photo's edges hold "
        "what the sampler repaints.",
        "How the strength was mapped: calibrated or today's ramps, the raw strength, LoRA weight, denoise, guard.",
    )
    DESCRIPTION = ("One knob for how strongly the photo is styled. The style's LoRA weight ramps from 0 to its "
                   f"trained weight as strength goes 0 -> {FULL_STYLE_AT}, and denoise = strength x max_denoise. "
                   "Strength 0 gives back the content unchanged (no style weights, denoise 0). A calibrated style "
                   "(stylora calibrate) first has strength remapped so it gives the same SSIM to the photo as every "
                   "other calibrated style. guard (= denoise) drives a ControlNet layout guard.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model output of Load Style LoRA (one or several chained) or of "
                                               "Style From Image."}),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "0: the photo unchanged; 0.3: recoloured, layout kept; 0.5: the "
                                                  "style's full weight; 1: strongest (denoise = max_denoise)."}),
                "max_denoise": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Denoise at strength 1. Higher repaints more of the layout."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The clip output of Load Style LoRA: styles with text-encoder weights "
                                             "are scaled there too, so strength 0 is the base CLIP."}),
                "use_calibration": ("BOOLEAN", {"default": True,
                                                "tooltip": "Use the styles' calibration when every style carries "
                                                           "one (off: today's ramps; stylora calibrate measures "
                                                           "with it off)."}),
            },
        }

    def apply(self, model: Any, strength: float, max_denoise: float = 0.75, clip: Any = None,
              use_calibration: bool = True):
        # 1. Which patches are the style's: LoadStyleLoRA records its adapters on the model.
        ours = attachment(model, STYLE_ATTACHMENT, USED_BY)
        injection = attachment(model, INJECTION_ATTACHMENT, USED_BY)
        if not ours and injection is None:
            raise ValueError("StyleStrength: model has no style applied by Load Style LoRA or Style From Image "
                             "(Stylora); connect the model output of one of them")
        style_schedule(strength, max_denoise)  # validates both before anything is read
        # 2. A calibrated style (or blend) remaps the strength first; uncalibrated ones keep today's ramps.
        recorded = attachment(model, CALIBRATION_ATTACHMENT, USED_BY)
        styles = [(Calibration.from_json(c) if c else None, w) for c, w in (recorded or ())]
        if injection is not None:
            styles.append((None, 1.0))  # Style From Image has no calibration
        raw, calibrated = blend_strength(strength, styles) if use_calibration else (strength, False)
        lora_scale, denoise = style_schedule(raw, max_denoise)
        guard = guard_weight(raw, max_denoise)
        how = "calibrated" if calibrated else ("uncalibrated" if use_calibration else "calibration off")
        mapping = (f"strength {strength:.3f} -> {how}: raw strength {raw:.3f}, LoRA weight x{lora_scale:.3f}, "
                   f"denoise {denoise:.3f}, guard {guard:.3f}")
        # 3. Rescale on a clone (the input model stays as it is); the host gives it a new patches_uuid, so ComfyUI
        #    re-bakes the weights instead of reusing those of the unscaled model.
        out = scaled_clone(model, lora_scale, USED_BY)
        # 4. Style From Image's injection follows the same ramp (0: removed, the input model's behaviour).
        rescale_style_injection(out, lora_scale, USED_BY)
        # 5. The same for the text encoder's style patches (LoRAs with lora_te_* keys), on a clone of the CLIP.
        out_clip = clip if clip is None else rescale_clip_style(clip, lora_scale, USED_BY)
        return (out, denoise, out_clip, guard, mapping)
