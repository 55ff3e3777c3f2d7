"""MaskedStyleApply: style only inside a mask.

Two places in the graph, one node type: before the sampler it sets the latent noise mask, so the sampler
repaints only the masked region; after VAEDecode it composites the styled pixels over the content with a
seam feathered *inward*, so every pixel outside the mask is the content's, exactly (a latent mask alone is
not exact in pixels: the VAE decoder mixes neighbouring latents). Several regions with several styles:
chain passes, each pass's composite being the next pass's content.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def fit_mask(mask: torch.Tensor, height: int, width: int, invert: bool = False) -> torch.Tensor:
    """MASK [H, W] or [B, H, W] in 0..1 -> [B, height, width] (bilinear when the size differs), inverted if asked."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask: expected a MASK [B, H, W], got shape {tuple(mask.shape)}")
    mask = mask.float()
    if tuple(mask.shape[-2:]) != (height, width):
        logger.info("MaskedStyleApply: mask %dx%d resized to the content's %dx%d (a mask painted on the photo "
                    "should come from Content Encode's mask output, which gets the photo's crop)", mask.shape[2],
                    mask.shape[1], width, height)
        mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    mask = mask.clamp(0, 1)
    return 1 - mask if invert else mask


def feather_mask(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """mask [B, H, W] in 0..1 -> the blend weights [B, H, W] in 0..1: 0 wherever the mask is 0, rising inward from
    its edge, so a seam never reaches outside the mask, and > 0 on every painted pixel.

    weight = mask * smoothstep(d / min(feather, h)), with d the Euclidean distance (px) from a painted pixel to the
    nearest unpainted one (>= 1) and h the region's local half-width, the largest d within `feather` px. Regions
    wider than 2 * feather get the usual ramp over `feather` px; a thinner stroke gets a ramp as wide as its
    half-width, so it keeps full weight on its centre line instead of vanishing (a fixed-width ramp gives 0 to
    strokes narrower than about twice the feather). The image border is not an edge.
    """
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    if feather == 0:
        return mask
    import numpy as np
    from scipy import ndimage

    ramps = []
    narrowed = 0
    for inside in (mask > 0).cpu().numpy():
        if inside.all() or not inside.any():
            ramps.append(np.ones(inside.shape, np.float32))
            continue
        d = ndimage.distance_transform_edt(np.pad(inside, 1, mode="edge"))[1:-1, 1:-1]
        h = np.minimum(ndimage.maximum_filter(d, size=2 * feather + 1), feather)
        narrowed += int((inside & (h < feather)).sum())
        ramps.append(np.clip(d / np.maximum(h, 1.0), 0.0, 1.0).astype(np.float32))
    if narrowed:
        logger.info("MaskedStyleApply: feather narrowed to the stroke's half-width on %d of %d painted pixels "
                    "(strokes thinner than 2 x feather = %d px)", narrowed, int((mask > 0).sum()), 2 * feather)
    ramp = torch.from_numpy(np.stack(ramps)).to(mask.device)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep: no visible kink where the ramp starts or ends
    return mask * ramp


def composite(content: torch.Tensor, styled: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """content, styled [B, H, W, C] in 0..1, weights [B, H, W] -> content where weights == 0 (bit for bit),
    content + weights * (styled - content) elsewhere. Batches of 1 broadcast."""
    if content.shape[1:3] != styled.shape[1:3]:
        raise ValueError(f"styled image is {styled.shape[2]}x{styled.shape[1]} but content is "
                         f"{content.shape[2]}x{content.shape[1]}; use ContentEncode's image output as content")
    w = weights[..., None].to(content.dtype)
    channels = min(content.shape[-1], styled.shape[-1])
    content, styled = content[..., :channels], styled[..., :channels].to(content.dtype)
    blended = content + w * (styled - content)
    return torch.where(w > 0, blended, content.expand_as(blended))


class MaskedStyleApply:
    """Limits the style to a masked region: latent noise mask before sampling, exact composite after decoding."""

    CATEGORY = "Stylora"
    FUNCTION = "apply"
    RETURN_TYPES = ("IMAGE", "LATENT", "MASK")
    RETURN_NAMES = ("image", "latent", "blend_mask")
    OUTPUT_TOOLTIPS = (
        "With styled connected: the composite, the content's own pixels outside the mask. Otherwise the content.",
        "With latent connected: that latent with the mask set, for KSampler (only the masked region is "
        "repainted). Not set when no latent is connected.",
        "The feathered blend weights used for the composite (1 = styled, 0 = content).",
    )
    DESCRIPTION = ("Style only where the mask is. Use it twice: before KSampler with the latent connected (the "
                   "sampler repaints only the masked region), and after VAE Decode with the styled image connected "
                   "(pixels outside the mask are the content's exactly; the seam is feathered inward). For several "
                   "regions with several styles, chain passes: the composite is the next pass's content.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "content": ("IMAGE", {"tooltip": "The content photo at the encoded size (ContentEncode's image)."}),
                "mask": ("MASK", {"tooltip": "Where the style goes (1) and where the content stays (0); e.g. "
                                             "painted in Load Image's mask editor and passed through Content "
                                             "Encode's mask output (same resize and crop as the photo)."}),
                "feather": ("INT", {"default": 16, "min": 0, "max": 512, "step": 1,
                                    "tooltip": "Width in pixels of the soft seam, inside the mask's edge."}),
                "invert": ("BOOLEAN", {"default": False, "tooltip": "Style everything except the mask."}),
            },
            "optional": {
                "styled": ("IMAGE", {"tooltip": "The decoded styled image, to composite over the content."}),
                "latent": ("LATENT", {"tooltip": "The content latent, to limit the sampler to the mask."}),
            },
        }

    def apply(self, content: torch.Tensor, mask: torch.Tensor, feather: int, invert: bool,
              styled: torch.Tensor | None = None, latent: dict | None = None):
        # 1. The mask at the content's size; an empty mask styles nothing, which deserves a warning.
        region = fit_mask(mask, content.shape[1], content.shape[2], invert)
        if not (region > 0).any():
            logger.warning("MaskedStyleApply: the mask is empty%s: nothing will be styled",
                           "" if invert else " (paint one in Load Image's mask editor, or set invert)")
        weights = feather_mask(region, feather)
        # 2. Before sampling: the latent with ComfyUI's noise mask (the sampler resizes it to the latent).
        latent_out = None
        if latent is not None:
            latent_out = {**latent, "noise_mask": region.reshape(-1, 1, *region.shape[-2:])}
        # 3. After decoding: the exact composite.
        image = content if styled is None else composite(content, styled, weights)
        return (image, latent_out, weights)
