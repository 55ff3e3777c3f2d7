"""StyleStrength: one knob, 0..1, that sets both how much of the style's LoRA weight is applied and how much of
the content photo the sampler may repaint (KSampler's denoise).

The mapping (documented in the README, "Style strength"):

    lora_scale(s) = min(1, s / FULL_STYLE_AT)      the style's trained weight is reached at s = 0.5
    denoise(s)    = s * max_denoise                 max_denoise defaults to 0.75

Why two ramps: denoise decides how much of the photo's layout survives (img2img, Meng et al. 2022, SDEdit),
the LoRA weight how far the colours and strokes move toward the style. Low strengths should recolour without
redrawing, so the LoRA ramps up faster than denoise. At s = 0 both are 0: the style's patches are removed
from the MODEL and, when the CLIP is connected, from the text encoder too (LoRAs with `lora_te_*` keys), so both
are the base checkpoint's, bit for bit; KSampler with denoise 0 returns the content latent untouched.
Style From Image's injection follows the LoRA ramp (its output blend); at s = 0 it is removed too.
"""

from __future__ import annotations

from typing import Any

from .host import has_attrs
from .style_image import INJECTION_ATTACHMENT, rescale_injection

FULL_STYLE_AT = 0.5  # strength at which the LoRA reaches its trained weight
STYLE_ATTACHMENT = "stylora_style_adapters"  # ModelPatcher attachment: the patch adapters LoadStyleLoRA added


def style_schedule(strength: float, max_denoise: float = 0.75) -> tuple[float, float]:
    """strength in 0..1 -> (LoRA weight multiplier in 0..1, KSampler denoise in 0..max_denoise)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in 0..1, got {strength}")
    if not 0.0 <= max_denoise <= 1.0:
        raise ValueError(f"max_denoise must be in 0..1, got {max_denoise}")
    return min(1.0, strength / FULL_STYLE_AT), strength * max_denoise


def scale_patches(patches: dict[str, list[tuple]], ours: set[int], factor: float) -> dict[str, list[tuple]]:
    """ComfyUI patch lists with the strength of our patches (adapter id in `ours`) multiplied by `factor`.

    A patch is (strength_patch, adapter, strength_model, offset, function); factor 0 drops ours altogether,
    so the result is exactly the patches the model had before the style. Other patches are kept as they are.
    """
    out: dict[str, list[tuple]] = {}
    for key, plist in patches.items():
        new = []
        for p in plist:
            if id(p[1]) in ours:
                if factor == 0:
                    continue
                p = (p[0] * factor, *p[1:])
            new.append(p)
        if new:
            out[key] = new
    return out


class StyleStrength:
    """Turns one 0..1 style strength into the style's LoRA weight and KSampler's denoise."""

    CATEGORY = "Stylora"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "FLOAT", "CLIP")  # CLIP last: workflows saved before it keep their slots
    RETURN_NAMES = ("model", "denoise", "clip")
    OUTPUT_TOOLTIPS = (
        "The model with the style's weight scaled (strength 0: the base model itself).",
        "Wire into KSampler's denoise (right-click KSampler > convert denoise to input if your frontend needs it).",
        "The text encoder with the style's text-encoder weights scaled the same way (strength 0: the base CLIP); "
        "wire into the prompt encoders. Only set when the clip input is connected.",
    )
    DESCRIPTION = ("One knob for how strongly the photo is styled. The style's LoRA weight ramps from 0 to its "
                   f"trained weight as strength goes 0 -> {FULL_STYLE_AT}, and denoise = strength x max_denoise. "
                   "Strength 0 gives back the content unchanged (no style weights, denoise 0).")

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
            },
        }

    def apply(self, model: Any, strength: float, max_denoise: float = 0.75, clip: Any = None):
        import uuid

        # 1. Which patches are the style's: LoadStyleLoRA records its adapters on the model.
        ours = model.get_attachment(STYLE_ATTACHMENT) if hasattr(model, "get_attachment") else None
        injection = model.get_attachment(INJECTION_ATTACHMENT) if hasattr(model, "get_attachment") else None
        if not ours and injection is None:
            raise ValueError("StyleStrength: model has no style applied by Load Style LoRA or Style From Image "
                             "(Stylora); connect the model output of one of them")
        lora_scale, denoise = style_schedule(strength, max_denoise)
        # 2. Rescale on a clone (the input model stays as it is) and give it a new patches_uuid, so ComfyUI
        #    re-bakes the weights instead of reusing those of the unscaled model.
        out = model.clone()
        if ours:
            has_attrs(model, "ModelPatcher", "patches", "patches_uuid", used_by="Style Strength")
            out.patches = scale_patches(model.patches, {id(a) for a in ours}, lora_scale)
            out.patches_uuid = uuid.uuid4()
        # 3. Style From Image's injection follows the same ramp (0: removed, the input model's behaviour).
        rescale_injection(out, lora_scale)
        # 4. The same for the text encoder's style patches (LoRAs with lora_te_* keys), on a clone of the CLIP.
        out_clip = clip
        clip_ours = clip.patcher.get_attachment(STYLE_ATTACHMENT) if clip is not None else None
        if clip_ours:
            out_clip = clip.clone()
            out_clip.patcher.patches = scale_patches(clip.patcher.patches, {id(a) for a in clip_ours}, lora_scale)
            out_clip.patcher.patches_uuid = uuid.uuid4()
        return (out, denoise, out_clip)
