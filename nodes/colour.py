"""KeepPhotoColours: the styled image's luminance with the photo's colours (luminance-only transfer, Gatys et al.,
"Controlling Perceptual Factors in Neural Style Transfer", CVPR 2017). The maths is `core.colour.keep_colours`."""

from __future__ import annotations

from typing import Any

import torch

from ..core.colour import keep_colours


class KeepPhotoColours:
    """Keeps the photo's chroma under the style's luminance pattern, by an amount 0..1."""

    CATEGORY = "Stylora"
    FUNCTION = "apply"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The styled image with the photo's colours mixed back in by amount (0: unchanged).",)
    DESCRIPTION = ("Keep the photo's colours: the styled image's luminance (strokes, light and shade) with the "
                   "photo's chroma (Y'CbCr, BT.601), as in luminance-only style transfer (Gatys et al., CVPR 2017). "
                   "amount 0 keeps the style's colours, 1 the photo's exactly. Put it after VAE Decode and before "
                   "Masked Style Apply's composite (or after it: unstyled pixels stay the photo's either way).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "content": ("IMAGE", {"tooltip": "The photo at the encoded size (Content Encode's image output)."}),
                "styled": ("IMAGE", {"tooltip": "The decoded styled image."}),
                "amount": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                     "tooltip": "0: the style's colours; 1: the photo's colours, exactly (only the "
                                                "luminance is styled)."}),
            },
        }

    def apply(self, content: torch.Tensor, styled: torch.Tensor, amount: float) -> tuple[torch.Tensor]:
        try:
            return (keep_colours(content, styled, amount),)
        except ValueError as e:
            raise ValueError(f"KeepPhotoColours: {e}") from e
