"""ContentEncode: the content photo resized for SD1.5 and encoded by the VAE, plus the resized photo itself.

The sizing is explicit: the node returns (and logs) a sentence saying how the photo was scaled, stretched or
cropped, and the resized IMAGE it outputs is exactly the picture the latent encodes, so composites and metrics
compare like with like. ComfyUI's VAE.encode would otherwise crop H and W to multiples of 8 without a word.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .host import float32_vae

logger = logging.getLogger(__name__)

RESIZE_MODES = ("shrink only", "fit max side")  # never enlarge / scale so the longest side is max_side
ROUNDINGS = ("stretch", "crop")  # how the last few pixels to a size multiple are reached
TILINGS = ("auto", "always", "never")
TILE_AUTO_PIXELS = 1536 * 1536  # above this, "auto" encodes in tiles (an SD1.5 VAE encode needs ~10 GB here)


@dataclass(frozen=True)
class SizePlan:
    """How one photo is brought to an encodable size. All sizes in pixels, (width, height)."""

    source: tuple[int, int]  # the photo as given
    scaled: tuple[int, int]  # after scaling with the aspect ratio kept (before rounding to the size multiple)
    final: tuple[int, int]  # what is encoded: multiples of the size multiple
    crop: tuple[int, int] | None  # (left, top) of the centre crop from `scaled`; None: stretched to `final`

    def describe(self) -> str:
        (sw, sh), (w, h), (fw, fh) = self.source, self.scaled, self.final
        if self.source == self.final:
            return f"{sw}x{sh}: encoded at its own size"
        parts = [f"{sw}x{sh} -> {fw}x{fh}"]
        if (w, h) != (sw, sh):
            parts.append(f"scaled by {max(w, h) / max(sw, sh):.3g} to {w}x{h}")  # the long side's: never rounded to 1
        if self.crop is not None and (w, h) != (fw, fh):
            parts.append(f"centre-cropped {w - fw}x{h - fh} px")
        elif (w, h) != (fw, fh):
            parts.append(f"stretched {fw - w:+d}x{fh - h:+d} px to a multiple (aspect {sw / sh:.4f} -> {fw / fh:.4f})")
        return ", ".join(parts)


def plan_size(width: int, height: int, max_side: int, multiple: int = 8, rounding: str = "stretch",
              resize_mode: str = "shrink only") -> SizePlan:
    """The encode size of a width x height photo: longest side at most `max_side` (0: no limit), aspect kept,
    then each side brought to a multiple of `multiple` by a sub-multiple stretch or a centre crop."""
    if width < 1 or height < 1:
        raise ValueError(f"image: empty image ({width}x{height})")
    if multiple < 1:
        raise ValueError(f"size_multiple must be >= 1, got {multiple}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    scale = 1.0
    if max_side > 0 and (max(width, height) > max_side or resize_mode == "fit max side"):
        scale = max_side / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if rounding == "stretch":
        fw, fh = (max(multiple, int(s / multiple + 0.5) * multiple) for s in (w, h))  # half rounds up
        if max_side > 0:  # rounding up must not break the max_side promise
            fw, fh = (min(s, max(multiple, max_side // multiple * multiple)) for s in (fw, fh))
        return SizePlan((width, height), (w, h), (fw, fh), None)
    fw, fh = (s // multiple * multiple for s in (w, h))
    if fw == 0 or fh == 0:
        raise ValueError(f"image: {width}x{height} scaled to {w}x{h} is smaller than size_multiple={multiple}; "
                         "use rounding='stretch' or a larger max_side")
    return SizePlan((width, height), (w, h), (fw, fh), ((w - fw) // 2, (h - fh) // 2))


def resize_images(images: torch.Tensor, plan: SizePlan) -> torch.Tensor:
    """images [B, H, W, C] in 0..1 (ComfyUI IMAGE) -> [B, h, w, C] per the plan (antialiased bicubic)."""
    if images.ndim != 4:
        raise ValueError(f"image: expected an IMAGE batch [B, H, W, C], got shape {tuple(images.shape)}")
    size = plan.final if plan.crop is None else plan.scaled  # stretching: one resize straight to the final size
    out = images
    if size != plan.source:
        x = images.movedim(-1, 1).float()
        x = F.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True, align_corners=False)
        out = x.clamp(0, 1).movedim(1, -1).to(images.dtype)
    if plan.crop is None:
        return out
    (left, top), (fw, fh) = plan.crop, plan.final
    return out[:, top:top + fh, left:left + fw, :]


def _encode(vae: Any, pixels: torch.Tensor, tile: int | None) -> torch.Tensor:
    """vae.encode of the RGB channels, or encode_tiled in `tile`-pixel tiles overlapping by an eighth."""
    if tile is not None:
        return vae.encode_tiled(pixels[..., :3], tile_x=tile, tile_y=tile, overlap=tile // 8)
    return vae.encode(pixels[..., :3])


def encode_images(vae: Any, pixels: torch.Tensor, tiling: str = "auto", tile_size: int = 512,
                  fp32_vae: Any = None) -> tuple[torch.Tensor, str]:
    """pixels [B, H, W, 3] in 0..1, H and W multiples of the VAE's factor -> latents [B, 4, H/8, W/8] and a note.

    `vae` is ComfyUI's VAE (encode, encode_tiled). Half-precision VAEs overflow to NaN/inf on some images
    (the SD1.5 fp16 VAE problem); then the batch is encoded again by `fp32_vae()`, a float32 copy.
    """
    if tiling not in TILINGS:
        raise ValueError(f"tiling must be one of {TILINGS}, got {tiling!r}")
    h, w = pixels.shape[1:3]
    tile = tile_size if tiling == "always" or (tiling == "auto" and h * w > TILE_AUTO_PIXELS) else None
    notes = [f"tiled {tile_size}px"] if tile is not None else []
    latents = _encode(vae, pixels, tile)
    if not torch.isfinite(latents).all():
        if fp32_vae is None:
            raise ValueError("vae: the encoded latent has NaN/inf values and no float32 VAE is available")
        logger.warning("ContentEncode: the VAE gave NaN/inf values; encoding again in float32")
        latents = _encode(fp32_vae(), pixels, tile)
        notes.append("re-encoded in float32 (the VAE overflowed)")
        if not torch.isfinite(latents).all():
            raise ValueError("vae: the latent has NaN/inf values even in float32; is the VAE damaged?")
    return latents, "; ".join(notes)


class ContentEncode:
    """Resizes the content photo for SD1.5 (saying exactly what changed) and encodes it for img2img."""

    CATEGORY = "Stylora"
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT", "IMAGE", "STRING", "MASK")  # MASK last: saved workflows keep their slots
    RETURN_NAMES = ("latent", "image", "info", "mask")
    OUTPUT_TOOLTIPS = (
        "The encoded photo, to feed KSampler (img2img) or MaskedStyleApply.",
        "The photo at exactly the encoded size: use it as the content for MaskedStyleApply and StyleMetrics.",
        "What was done to the photo: original and new size, scale, stretch or crop, tiling, float32 re-encode.",
        "The mask input resized and cropped exactly like the photo (for Masked Style Apply); empty without one.",
    )
    DESCRIPTION = ("Resizes the content photo to an SD1.5-friendly size (aspect ratio kept, sides multiples of 8) "
                   "and encodes it with the VAE. The resized image output is pixel-for-pixel what was encoded.")

    def __init__(self) -> None:
        self._fp32: tuple[int, Any] | None = None  # (id of the source VAE, its float32 copy)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The content photo (e.g. from Load Image)."}),
                "vae": ("VAE", {"tooltip": "The VAE of the SD1.5 checkpoint."}),
                "max_side": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 8,
                                     "tooltip": "Longest side after resizing, in pixels; 0 keeps the size. SD1.5 "
                                                "works best around 512-768."}),
                "size_multiple": ("INT", {"default": 8, "min": 8, "max": 128, "step": 8,
                                          "tooltip": "Both sides become multiples of this (the VAE needs 8)."}),
                "rounding": (list(ROUNDINGS), {"default": "stretch",
                                               "tooltip": "stretch: scale each side by under one multiple to reach "
                                                          "it (nothing is cut off); crop: cut the remainder off the "
                                                          "edges, centred (no distortion)."}),
                "resize_mode": (list(RESIZE_MODES), {"default": "shrink only",
                                                     "tooltip": "shrink only: larger photos are scaled down to "
                                                                "max_side, smaller ones kept; fit max side: scaled "
                                                                "up or down so the longest side is max_side."}),
            },
            "optional": {
                "tiling": (list(TILINGS), {"default": "auto",
                                           "tooltip": "Encode in tiles to save memory; auto tiles images "
                                                      "larger than 1536x1536 pixels."}),
                "tile_size": ("INT", {"default": 512, "min": 256, "max": 2048, "step": 64,
                                      "tooltip": "Tile side in pixels when tiling."}),
                "mask": ("MASK", {"tooltip": "A mask painted on the photo (Load Image's mask output): it gets the "
                                             "same resize and crop as the photo, at the mask output."}),
            },
        }

    def _fp32_vae(self, vae: Any) -> Any:
        """The float32 copy of `vae`, built once per VAE the node is given (it takes a VAE's memory)."""
        if self._fp32 is None or self._fp32[0] != id(vae):
            self._fp32 = (id(vae), float32_vae(vae))
        return self._fp32[1]

    def encode(self, image: torch.Tensor, vae: Any, max_side: int, size_multiple: int, rounding: str,
               resize_mode: str, tiling: str = "auto", tile_size: int = 512, mask: torch.Tensor | None = None):
        # 1. Plan the size, then resize (the same plan for every image of the batch).
        plan = plan_size(image.shape[2], image.shape[1], max_side, size_multiple, rounding, resize_mode)
        pixels = resize_images(image, plan)
        # 2. Encode; NaN/inf from a half-precision VAE is retried in float32.
        latents, note = encode_images(vae, pixels, tiling, tile_size, lambda: self._fp32_vae(vae))
        info = plan.describe() + (f"; {note}" if note else "")
        logger.info("ContentEncode: %s", info)
        # 3. The mask through the same plan as the photo: resizing it straight to the encoded size would miss
        #    the centre crop (off by up to size_multiple - 1 px with rounding = crop).
        if mask is None:
            mask_out = torch.zeros(pixels.shape[:3])
        else:
            m = (mask[None] if mask.ndim == 2 else mask).float()
            if tuple(m.shape[-2:]) != tuple(image.shape[1:3]):  # e.g. the 64x64 empty mask of a photo without alpha
                m = F.interpolate(m[:, None], size=tuple(image.shape[1:3]), mode="bilinear", align_corners=False)[:, 0]
            mask_out = resize_images(m[..., None], plan)[..., 0].clamp(0, 1)
        return ({"samples": latents}, pixels, info, mask_out)
