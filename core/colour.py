"""Keeping the photo's colours: luminance-only style transfer (Gatys, Ecker, Bethge, Hertzmann and Shechtman,
"Controlling Perceptual Factors in Neural Style Transfer", CVPR 2017, section 5.1).

The paper transfers the style on the luminance channel only and recombines the result with the content's colour
channels in YIQ. Here the style is transferred by the diffusion model in RGB; the recombination step is the same:
the output keeps the styled image's luminance and takes the photo's chroma.

Colour space: Y'CbCr with BT.601 luma weights on the gamma-encoded sRGB values (the JPEG/PIL convention; YIQ has
the same luma, so this is the paper's recombination with another chroma basis). In every such luma-chroma space
the inverse transform has a luma coefficient of 1 for R, G and B, so "styled luminance, photo chroma" is the photo
plus the luminance difference added equally to its three channels:

    out = photo + (Y_styled - Y_photo) * [1, 1, 1]        chroma(out) == chroma(photo) exactly

This form is exact in floating point where the styled image equals the photo (the difference is 0), so a mask
composite keeps the photo bit for bit outside the mask in either order. Where photo + difference would leave the
0..1 gamut, the luminance difference is clipped per pixel to [-min(photo), 1 - max(photo)] rather than the RGB
channels, so the chroma stays the photo's and only the luminance gives way.
"""

from __future__ import annotations

import torch

LUMA = (0.299, 0.587, 0.114)  # BT.601 luma weights (Y'CbCr of JPEG; the Y of YIQ)


def luma(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [..., 3] in 0..1 (gamma-encoded sRGB) -> luma Y' [..., 1] in 0..1 (BT.601)."""
    weights = torch.tensor(LUMA, dtype=image.dtype, device=image.device)
    return (image * weights).sum(-1, keepdim=True)


def keep_colours(photo: torch.Tensor, styled: torch.Tensor, amount: float = 1.0) -> torch.Tensor:
    """The styled image's luminance with the photo's chroma, mixed by `amount`.

    photo, styled: IMAGE [B, H, W, 3] in 0..1 of the same H and W (a photo batch of 1 is used for every styled
    image). amount 0: the styled image exactly; 1: styled luminance (clipped to the photo's gamut) with the photo's
    chroma exactly; between: a linear mix of the two, which is in gamut too. Returns [B, H, W, 3] in 0..1.
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in 0..1 (0: the style's colours, 1: the photo's), got {amount}")
    if photo.ndim != 4 or styled.ndim != 4 or photo.shape[-1] != 3 or styled.shape[-1] != 3:
        raise ValueError(f"photo and styled must be IMAGE [B, H, W, 3], got {tuple(photo.shape)} and "
                         f"{tuple(styled.shape)}")
    if photo.shape[1:3] != styled.shape[1:3]:
        raise ValueError(f"photo is {photo.shape[2]}x{photo.shape[1]} and styled {styled.shape[2]}x{styled.shape[1]}"
                         "; give the photo at the encoded size (Content Encode's image output)")
    if photo.shape[0] not in (1, styled.shape[0]):
        raise ValueError(f"photo batch {photo.shape[0]} does not match styled batch {styled.shape[0]} (give 1 photo "
                         "or one per styled image)")
    photo = photo.to(styled.dtype).expand_as(styled)
    if amount == 0:
        return styled.clone()
    # 1. The luminance difference, clipped so that the photo plus it stays in 0..1 in every channel.
    delta = luma(styled) - luma(photo)
    low = -photo.amin(-1, keepdim=True)
    high = 1 - photo.amax(-1, keepdim=True)
    delta = torch.maximum(torch.minimum(delta, high), low)
    # 2. Photo chroma with the styled luminance, then the mix; styled + amount * (...) is exactly `styled`
    #    wherever the styled image equals the photo.
    recoloured = photo + delta
    if amount == 1:
        return recoloured
    return styled + amount * (recoloured - styled)
