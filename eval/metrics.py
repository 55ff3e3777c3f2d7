"""Style-transfer metrics on torch tensors.

Images are float tensors in 0..1, either ComfyUI's IMAGE layout [B, H, W, C] or torch's [B, C, H, W]
(`as_bchw` tells them apart by where the 3 channels are). Pairwise metrics need equal sizes and say so
otherwise; nothing is resized silently.

- content preservation: `ssim` (Wang et al. 2004), `LPIPS` (Zhang et al. 2018), `VGGStyle.content_loss`
- style: `lpips_to_style` (LPIPS to the style images), `VGGStyle.gram_loss` (Gatys et al. 2016), `fid`/`kid`
  on Inception features (Heusel et al. 2017; Binkowski et al. 2018), `artfid` (Wright & Ommer 2022, as StyleID
  evaluates it)
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from . import backbones
from .weights import ALEXNET, FID_INCEPTION, LPIPS_LINEAR, VGG16, VGG19, load_state_dict

logger = logging.getLogger(__name__)


def as_bchw(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """[B, H, W, 3] (ComfyUI) or [B, 3, H, W] (torch), or one image without B, -> float32 [B, 3, H, W] in 0..1."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    x = images if images.ndim == 4 else images[None] if images.ndim == 3 else None
    if x is None:
        raise ValueError(f"{name}: expected [B, H, W, C] or [B, C, H, W], got shape {tuple(images.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3, 4):
        x = x[..., :3].permute(0, 3, 1, 2)  # ComfyUI IMAGE; an alpha channel is dropped
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected 1 or 3 colour channels, got shape {tuple(images.shape)}")
    x = x.float()
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"{name}: values must be in 0..1, got {x.min().item():.3g}..{x.max().item():.3g}")
    return x.clamp(0, 1)


def same_size(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"{names[0]} and {names[1]}: batch sizes {a.shape[0]} and {b.shape[0]} differ")
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"{names[0]} is {a.shape[-1]}x{a.shape[-2]} but {names[1]} is {b.shape[-1]}x{b.shape[-2]}; "
                         "resize one of them first (metrics never resize silently)")


def ssim(output: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """SSIM per image [B]: 11x11 Gaussian window, sigma 1.5, data range 1, mean over RGB and valid pixels.

    The standard SSIM of Wang et al. (2004), as scikit-image computes it with gaussian_weights=True and
    use_sample_covariance=False: the mean runs over pixels whose whole window lies inside the image
    (kornia's padding="valid"; torchmetrics instead averages reflect-padded borders in).
    """
    import kornia

    x, y = as_bchw(output, "output"), as_bchw(content, "content")
    same_size(x, y, ("output", "content"))
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim: images must be at least 11x11 pixels, got {x.shape[-1]}x{x.shape[-2]}")
    x, y = torch.broadcast_tensors(x, y)
    # float32: within 5e-6 of scikit-image's float64 result on real photos, and 10x faster than float64.
    ssim_map = kornia.metrics.ssim(x, y, 11, max_val=1.0, padding="valid")
    return ssim_map.mean(dim=(1, 2, 3))


def _normalize_channels(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al. 2018), v0.1, AlexNet or VGG-16 backbone.

    forward(x, y: images in 0..1, same size) -> distance per image [B], 0 for identical images.
    pretrained=False builds fixed random weights (seeded), for tests that need no download.
    """

    # Indices into the backbone's `features` after which the five compared activations are taken.
    TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
    CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}

    def __init__(self, net: str = "alex", pretrained: bool = True, seed: int = 0):
        super().__init__()
        if net not in self.TAPS:
            raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
        self.net = net
        full = backbones.alexnet_features() if net == "alex" else backbones.vgg_features(backbones.VGG16_LAYOUT)
        self.features = full[: self.TAPS[net][-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS[net])
        # LPIPS' input scaling layer: inputs in -1..1 mapped to ImageNet-normalised values.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        if pretrained:
            state = load_state_dict(ALEXNET if net == "alex" else VGG16)
            sub = {k[len("features."):]: v for k, v in state.items()
                   if k.startswith("features.") and int(k.split(".")[1]) <= self.TAPS[net][-1]}
            self.features.load_state_dict(sub, strict=True)
            lin = load_state_dict(LPIPS_LINEAR[net])  # keys lin{i}.model.1.weight
            for i, conv in enumerate(self.lins):
                conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        else:
            backbones.random_init(self.features, seed)
            g = torch.Generator().manual_seed(seed + 1)
            for conv in self.lins:
                conv.weight.data = torch.rand(conv.weight.shape, generator=g) / conv.in_channels
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, taps = [], set(self.TAPS[self.net])
        h = (x * 2 - 1 - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = as_bchw(x, "x"), as_bchw(y, "y")
        same_size(x, y, ("x", "y"))
        x, y = torch.broadcast_tensors(x.to(self.shift.device), y.to(self.shift.device))
        total = 0
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            d = (_normalize_channels(fx) - _normalize_channels(fy)) ** 2
            total = total + lin(d).mean(dim=(2, 3))
        return total.flatten()


def lpips_to_style(lpips: LPIPS, output: torch.Tensor, style: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """LPIPS of each output to the style images, averaged over the style images: [B].

    output: [B, 3, H, W] (or ComfyUI's [B, H, W, 3]) in 0..1; style: [N, 3, H, W] in 0..1, already at the outputs'
    size (the caller scales them, see eval.scoring.style_at_size). Each output is compared with all N style images,
    `chunk` at a time, so the memory is bounded for large style sets.
    """
    x, s = as_bchw(output, "output"), as_bchw(style, "style")
    same_size(x[:1], s[:1], ("output", "style"))
    totals = []
    for image in x:
        parts = [lpips(image[None], s[i:i + chunk]) for i in range(0, len(s), chunk)]
        totals.append(torch.cat(parts).mean())
    return torch.stack(totals)


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, C], normalised by C*H*W so it does not depend on the image size."""
    b, c, h, w = feat.shape
    f = feat.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class VGGStyle(nn.Module):
    """VGG-19 features for the Gram-matrix style loss and the content loss of Gatys et al. (2016).

    Style layers relu1_1, relu2_1, relu3_1, relu4_1, relu5_1; content layer relu4_2. Inputs in 0..1.
    """

    STYLE_TAPS = (1, 6, 11, 20, 29)  # relu1_1 ... relu5_1 in torchvision's vgg19().features
    CONTENT_TAP = 22  # relu4_2

    def __init__(self, pretrained: bool = True, seed: int = 0):
        super().__init__()
        self.features = backbones.vgg_features(backbones.VGG19_LAYOUT)[: max(self.STYLE_TAPS) + 1]
        if pretrained:
            state = load_state_dict(VGG19)
            sub = {k[len("features."):]: v for k, v in state.items()
                   if k.startswith("features.") and int(k.split(".")[1]) <= max(self.STYLE_TAPS)}
            self.features.load_state_dict(sub, strict=True)
        else:
            backbones.random_init(self.features, seed)
        self.register_buffer("mean", torch.tensor(backbones.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbones.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def activations(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        h = (as_bchw(images).to(self.mean.device) - self.mean) / self.std
        out = {}
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.STYLE_TAPS or i == self.CONTENT_TAP:
                out[i] = h
        return out

    def grams(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Gram matrices of the style layers, each [B, C, C]."""
        acts = self.activations(images)
        return [gram_matrix(acts[i]) for i in self.STYLE_TAPS]

    def gram_loss(self, output: torch.Tensor, style: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Style loss per output image [B]: sum over layers of the mean squared Gram difference.

        `style` is an image batch (any size: Gram matrices do not depend on it; one image or one per
        output) or precomputed target Gram matrices from `grams` (e.g. a style set's mean).
        """
        target = style if isinstance(style, list) else self.grams(style)
        total = 0
        for g, t in zip(self.grams(output), target):
            total = total + (g - t.to(g.device)).pow(2).mean(dim=(1, 2))
        return total

    def content_loss(self, output: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """MSE between relu4_2 activations per image [B]; images must be the same size."""
        x, y = as_bchw(output, "output"), as_bchw(content, "content")
        same_size(x, y, ("output", "content"))
        fx, fy = self.activations(x)[self.CONTENT_TAP], self.activations(y)[self.CONTENT_TAP]
        return (fx - fy).pow(2).mean(dim=(1, 2, 3))


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the FID Inception-v3. forward(images in 0..1, any size) -> [B, 2048]."""

    def __init__(self, pretrained: bool = True, seed: int = 0):
        super().__init__()
        self.net = backbones.FIDInceptionV3()
        self.published = pretrained  # only features of the published weights are cached across runs
        if pretrained:
            self.net.load_published(load_state_dict(FID_INCEPTION))
        else:
            backbones.random_init(self.net, seed)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.net(as_bchw(images).to(device)).double().cpu()


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, like numpy.cov) of features [N, D]."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: need at least 2 rows of [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))  # [1, 1] for one dimension, not a scalar


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017).

    Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): the symmetric form needs only eigendecompositions of
    symmetric matrices, which is several times faster than scipy's sqrtm on 2048x2048 covariances and stays
    stable when a small set makes them rank-deficient.
    """
    diff = mu1 - mu2
    w1, v1 = np.linalg.eigh(sigma1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    return fid_from_stats(*feature_stats(features1), *feature_stats(features2))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Returns (mean, std)."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"kid: need at least 2 features per set, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def artfid(lpips_mean: float, fid_value: float) -> float:
    """ArtFID = (1 + LPIPS) * (1 + FID): content and style in one number, lower is better."""
    return (1 + lpips_mean) * (1 + fid_value)


class PerceptualLoss(nn.Module):
    """The trainer's perceptual terms on decoded images in 0..1: LPIPS to the training image and the Gram
    style loss to it. forward(pred, target) -> (lpips [B], gram [B]); differentiable in `pred`."""

    def __init__(self, lpips_net: str = "alex", pretrained: bool = True, seed: int = 0):
        super().__init__()
        self.lpips = LPIPS(lpips_net, pretrained=pretrained, seed=seed)
        self.vgg = VGGStyle(pretrained=pretrained, seed=seed)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lpips(pred, target), self.vgg.gram_loss(pred, target)

