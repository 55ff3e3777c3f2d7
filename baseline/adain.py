"""AdaIN style transfer (Huang and Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance
Normalization", ICCV 2017), with its published weights: the normalised VGG-19 encoder (up to relu4_1) and the
trained decoder of the authors' PyTorch port (naoto0804/pytorch-AdaIN, files `vgg_normalised.pth`, `decoder.pth`).

    t = AdaIN(f(c), f(s)) = sigma(f(s)) * (f(c) - mu(f(c))) / sigma(f(c)) + mu(f(s))      (paper, eq. 8)
    output = g(alpha * t + (1 - alpha) * f(c))                                             (paper, eq. 14)

mu and sigma are per image and channel over the spatial positions; sigma^2 is the unbiased variance plus 1e-5, as
the published decoder was trained with. The weights are looked up like the metrics' (eval.weights): ComfyUI's
models/stylora_metrics, $STYLORA_WEIGHTS_DIR, the torch hub cache; missing ones raise WeightsUnavailable naming
the file.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn

from ..core.files import atomic_write
from ..core.images import load_image
from ..eval.backbones import random_init
from ..eval.weights import WeightsFile, WeightsUnavailable, load_state_dict
from .config import AdaINConfig

logger = logging.getLogger(__name__)

_RELEASE = "https://github.com/naoto0804/pytorch-AdaIN/releases/download/v0.0.0/"
ENCODER = WeightsFile("vgg_normalised.pth", _RELEASE + "vgg_normalised.pth",
                      "AdaIN normalised VGG-19 encoder (Huang & Belongie 2017)")
DECODER = WeightsFile("decoder.pth", _RELEASE + "decoder.pth", "AdaIN decoder (Huang & Belongie 2017)")

# The published encoder: a 1x1 input conv (the Caffe VGG's BGR/mean preprocessing folded in, so images go in as
# RGB 0..1), then VGG-19's 16 convolutions, each after a 1-pixel reflection pad. Its state dict numbers the
# modules of that whole sequence; AdaIN uses it up to relu4_1 (the first 31 modules).
ENCODER_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
RELU4_1 = 31
# The decoder mirrors the encoder up to relu4_1: channels of its convolutions, "U" = nearest 2x upsampling.
DECODER_LAYOUT = [256, "U", 256, 256, 256, 128, "U", 128, 64, "U", 64, 3]
EPS = 1e-5  # added to the variance, as in the published training


def encoder_layers() -> nn.Sequential:
    """The whole published encoder (module indices as in `vgg_normalised.pth`, 53 modules)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 3, 1)]
    channels = 3
    for v in ENCODER_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, 0, ceil_mode=True))
        else:
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, v, 3), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


def decoder_layers() -> nn.Sequential:
    """The published decoder (module indices as in `decoder.pth`): relu4_1 features [B, 512, h, w] -> RGB
    [B, 3, 8h, 8w]; no activation after the last convolution."""
    layers: list[nn.Module] = []
    channels = 512
    for i, v in enumerate(DECODER_LAYOUT):
        if v == "U":
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            continue
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, v, 3)]
        if i < len(DECODER_LAYOUT) - 1:
            layers.append(nn.ReLU())
        channels = v
    return nn.Sequential(*layers)


def mean_std(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel mean and std over the positions of feat [B, C, H, W]: two [B, C, 1, 1] tensors
    (std from the unbiased variance + 1e-5)."""
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    return flat.mean(dim=2).view(b, c, 1, 1), (flat.var(dim=2) + EPS).sqrt().view(b, c, 1, 1)


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """AdaIN (paper, eq. 8): content features [B, C, H, W] with their per-channel mean and std replaced by those
    of the style features [B or 1, C, h, w] (any spatial size)."""
    c_mean, c_std = mean_std(content)
    s_mean, s_std = mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean


class AdaIN(nn.Module):
    """Encoder, AdaIN and decoder. forward(content [B, 3, H, W], style [B or 1, 3, h, w], alpha) -> [B, 3, H', W']
    in 0..1 (clamped), inputs in 0..1; H' = 8 * ceil(H / 8) (the encoder's ceil-mode pooling), so give sides that
    are multiples of 8 to keep the size. pretrained=False: seeded random weights of the same architecture."""

    def __init__(self, pretrained: bool = True, seed: int = 0):
        super().__init__()
        encoder, self.decoder = encoder_layers(), decoder_layers()
        self.weights = f"{ENCODER.name}, {DECODER.name}" if pretrained else f"random (seed {seed})"
        if pretrained:
            states, missing = {}, []
            for spec in (ENCODER, DECODER):  # both looked up first, so that one message names every missing file
                try:
                    states[spec.name] = load_state_dict(spec)
                except WeightsUnavailable as e:
                    missing.append(str(e))
            if missing:
                names = " and ".join(s.name for s in (ENCODER, DECODER) if s.name not in states)
                raise WeightsUnavailable(f"AdaIN unavailable: {names} missing\n" + "\n".join(missing))
            encoder.load_state_dict(states[ENCODER.name], strict=True)
            self.decoder.load_state_dict(states[DECODER.name], strict=True)
        else:
            random_init(encoder, seed)
            random_init(self.decoder, seed + 1)
        self.encoder = encoder[:RELU4_1]
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in 0..1 (1: all style), got {alpha!r}")
        f_c, f_s = self.encoder(content), self.encoder(style)
        t = alpha * adaptive_instance_norm(f_c, f_s) + (1 - alpha) * f_c  # paper, eq. 14
        return self.decoder(t).clamp(0, 1)


def fit_image(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) to `max_side` on the longest side, then to multiples of 8 on both sides (a stretch of
    under 8 pixels, as Content Encode does) so that the output has the photo's size. LANCZOS."""
    scale = min(1.0, max_side / max(img.size))
    w, h = (max(8, round(s * scale) // 8 * 8) for s in img.size)
    return img if (w, h) == img.size else img.resize((w, h), Image.Resampling.LANCZOS)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float in 0..1."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def save_image(image: torch.Tensor, path: Path, info: dict | None = None) -> None:
    """[1, 3, H, W] in 0..1 -> an 8-bit image file, written atomically (format from the suffix); a PNG carries
    `info` as JSON in its text chunk "stylora"."""
    arr = image[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    extra = {}
    if fmt == "PNG" and info:
        extra["pnginfo"] = PngInfo()
        extra["pnginfo"].add_text("stylora", json.dumps(info))
    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format=fmt, **extra))


def stylize_file(model: AdaIN, content: Path, style: Path, out: Path, alpha: float, max_side: int,
                 device: torch.device) -> float:
    """Stylise one photo file with one style image file into `out`; returns the seconds it took (load to save)."""
    start = time.perf_counter()
    photo = fit_image(load_image(content), max_side)
    painting = fit_image(load_image(style), max_side)
    result = model(to_tensor(photo).to(device), to_tensor(painting).to(device), alpha)
    save_image(result, out, {"method": "adain", "paper": "Huang and Belongie, ICCV 2017", "weights": model.weights,
                             "alpha": alpha, "max_side": max_side, "content": content.name, "style": style.name})
    return time.perf_counter() - start


def run_adain(cfg: AdaINConfig, model: AdaIN | None = None) -> Path:
    """`stylora adain`: one photo in the style of one painting. Raises WeightsUnavailable (naming the files) when
    the published weights are not on this machine, ImageLoadError for an unreadable image."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # 1. The network with the published weights (or the one given, e.g. with random weights in tests).
    model = (model or AdaIN()).to(device)
    # 2. Stylise and write the output atomically.
    seconds = stylize_file(model, Path(cfg.content), Path(cfg.style), Path(cfg.out), cfg.alpha, cfg.max_side, device)
    logger.info("AdaIN: wrote %s in %.2f s (alpha %g)", cfg.out, seconds, cfg.alpha)
    return Path(cfg.out)
