"""Scoring stylised images: the one scorer of the metrics in eval/registry.py (`score_pairs`, `score_set`, with the
style side from `style_targets` and the networks from `load_nets`), the batch scores of the StyleMetrics node
(`score_images`), their text and a CSV row. `stylora eval` and `stylora study` (eval/report.py) score with the same
functions."""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from ..core.files import atomic_write, atomic_write_csv, index_by_stem
from ..core.images import ImageLoadError, load_image, resize_cover
from .metrics import InceptionFeatures, VGGStyle, as_bchw, same_size
from .registry import (
    ALL_METRICS,
    DESCRIPTION,
    HIGHER_IS_BETTER,
    METRICS,
    NETWORKS,
    PAIR,
    SET,
    SET_METRICS,
    PairInputs,
    SetInputs,
)
from .weights import WeightsUnavailable

logger = logging.getLogger(__name__)



def to_tensor(img) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float in 0..1."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def load_tensor(path: Path) -> torch.Tensor:
    return to_tensor(load_image(path))


def style_at_size(images: list[Image.Image], width: int, height: int) -> torch.Tensor:
    """The style images for LPIPS to the style: each scaled to cover width x height (aspect kept, LANCZOS), then
    centre-cropped (core.images.resize_cover). Returns [N, 3, height, width] in 0..1."""
    return torch.cat([to_tensor(resize_cover(img.convert("RGB"), width, height)) for img in images])


def style_images(files: list[Path]) -> list[Image.Image]:
    """The readable images of a style folder (an unreadable one is skipped with a warning)."""
    images = []
    for f in files:
        try:
            images.append(load_image(f))
        except ImageLoadError as e:
            logger.warning("style image skipped: %s", e)
    return images


class StyleSet:
    """The style images for LPIPS to the style, scaled to an output size once and kept for the next output of
    that size (a study's outputs share one size)."""

    def __init__(self, images: list[Image.Image]):
        if not images:
            raise ValueError("style: no readable style image for LPIPS to the style")
        self.images = images
        self._sized: dict[tuple[int, int], torch.Tensor] = {}

    def at_size(self, width: int, height: int) -> torch.Tensor:
        """[N, 3, height, width] in 0..1 (see style_at_size)."""
        if (width, height) not in self._sized:
            self._sized = {(width, height): style_at_size(self.images, width, height)}  # one size kept
        return self._sized[width, height]


def tensor_images(images: torch.Tensor) -> list[Image.Image]:
    """[B, H, W, 3] or [B, 3, H, W] in 0..1 -> B PIL RGB images (rounded to 8 bits, as a saved image would be)."""
    x = as_bchw(images, "style").permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in x]


@torch.no_grad()
def mean_grams(vgg: VGGStyle, files: list[Path], max_side: int, device, progress: bool) -> list[torch.Tensor]:
    sums, n = None, 0
    for f in tqdm(files, desc="Style Gram matrices", unit="img", disable=not progress):
        try:
            img = load_image(f)
        except ImageLoadError as e:
            logger.warning("style image skipped: %s", e)
            continue
        scale = max_side / max(img.size)
        if scale < 1:  # explicit, documented: style statistics at a bounded size (EvalConfig.style_max_side)
            img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                             Image.Resampling.LANCZOS)
        grams = vgg.grams(to_tensor(img).to(device))
        sums = grams if sums is None else [s + g for s, g in zip(sums, grams)]
        n += 1
    if not n:
        raise ValueError("--style: no usable style image")
    return [s / n for s in sums]


@torch.no_grad()
def features_of(net: InceptionFeatures, files: list[Path], progress: bool, desc: str) -> np.ndarray:
    feats = []
    for f in tqdm(files, desc=desc, unit="img", disable=not progress):
        try:
            feats.append(net(load_tensor(f)).numpy()[0])
        except ImageLoadError as e:
            logger.warning("skipped for FID/KID: %s", e)
    return np.stack(feats) if feats else np.zeros((0, 2048))


def set_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def weights_fingerprint(net: torch.nn.Module) -> str:
    """sha256 of a network's parameters and buffers (names, shapes, values): features cached under it are never
    served for other weights, e.g. after the weights file was replaced."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def style_set_features(net: InceptionFeatures, files: list[Path], cache_dir: str | None, progress: bool,
                       cacheable: bool) -> np.ndarray:
    """Inception features of the style set, cached by the set's fingerprint and the network's weights: one style
    set serves many runs."""
    cache = Path(cache_dir or os.environ.get("STYLORA_CACHE", Path.home() / ".cache" / "stylora")) / "features"
    key = hashlib.sha256(f"{set_fingerprint(files)}:{weights_fingerprint(net)}".encode()).hexdigest()
    path = cache / f"fid-inception-2015-12-05-{key[:32]}.safetensors"
    if cacheable and path.is_file():
        logger.info("style-set features from cache %s", path)
        return load_file(str(path))["features"]
    feats = features_of(net, files, progress, "Inception features (style set)")
    if cacheable and len(feats):
        try:
            atomic_write(path, lambda tmp: save_file({"features": feats}, tmp))
        except OSError as e:
            logger.warning("could not cache style features at %s: %s", path, e)
    return feats


def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}"


def load_nets(wanted: set[str], nets: dict[str, torch.nn.Module] | None = None
              ) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """The feature networks the wanted metrics need, with published weights; a network whose weights are missing
    makes its metrics unavailable (metric -> reason) instead of failing. `nets` supplies prebuilt ones."""
    nets = dict(nets or {})
    unavailable: dict[str, str] = {}
    for key, build in NETWORKS.items():
        needing = sorted(m.name for m in METRICS if m.name in wanted and key in m.networks)
        if key in nets or not needing:
            continue
        try:
            nets[key] = build()
        except WeightsUnavailable as e:
            unavailable.update({metric: str(e) for metric in needing})
    return nets, unavailable


@dataclass
class StyleTargets:
    """What the style metrics compare with, computed once per style set; None where not given or not wanted."""

    images: StyleSet | None = None  # LPIPS to the style
    grams: list[torch.Tensor] | None = None  # Gram loss: [1, C, C] per VGG-19 style layer
    features: np.ndarray | None = None  # FID/KID/ArtFID: Inception features [N, 2048]


@torch.no_grad()
def style_targets(nets: dict[str, torch.nn.Module], wanted: set[str], device: torch.device | str, *,
                  images: torch.Tensor | None = None, files: list[Path] | None = None, style_max_side: int = 512,
                  cache_dir: str | None = None, progress: bool = False) -> StyleTargets:
    """The style side of the wanted metrics. `images`: style image(s) [N, H, W, 3] or [N, 3, H, W] in 0..1, any
    size, for LPIPS to the style and the Gram loss (their mean Gram matrices); `files`: a style folder's images,
    for those when no `images` are given (Gram statistics at most `style_max_side` px) and for the Inception
    features of FID/KID (cached under `cache_dir` for the published network)."""
    files = files or []
    targets = StyleTargets()
    if "lpips_style" in wanted and "lpips" in nets and (images is not None or files):
        targets.images = StyleSet(tensor_images(images) if images is not None else style_images(files))
    if "gram" in wanted and "vgg" in nets and images is not None:
        grams = nets["vgg"].grams(as_bchw(images, "style").to(device))
        targets.grams = [g.mean(0, keepdim=True) for g in grams]  # several style images: their mean statistics
    elif "gram" in wanted and "vgg" in nets and files:
        targets.grams = mean_grams(nets["vgg"], files, style_max_side, device, progress)
    if files and "inception" in nets and wanted & set(SET_METRICS):
        targets.features = style_set_features(nets["inception"], files, cache_dir, progress,
                                              cacheable=getattr(nets["inception"], "published", False))
    return targets


@torch.no_grad()
def score_pairs(inputs: PairInputs, wanted: set[str]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """The wanted per-image metrics (registry order) whose networks are loaded and whose target is given, each on
    its own: one that cannot be scored (an image smaller than SSIM's 11x11 window or VGG-19's four poolings) gets
    its reason and the others are still scored. Returns ({name: B values}, {name: reason})."""
    values: dict[str, list[float]] = {}
    problems: dict[str, str] = {}
    for metric in METRICS:
        if metric.scope != PAIR or metric.name not in wanted or getattr(inputs, metric.target) is None \
                or not all(net in inputs.nets for net in metric.networks):
            continue
        try:
            values[metric.name] = metric.score(inputs).tolist()
        except (RuntimeError, ValueError) as e:
            problems[metric.name] = " ".join(str(e).split())[:160]
    return values, problems


def score_set(inputs: SetInputs, wanted: set[str]) -> tuple[dict[str, float], dict[str, str]]:
    """The wanted set metrics of Inception features against the style set's, each on its own. Returns
    ({name: value}, {name: reason}); the values hold "kid_std" with KID and "fid" whenever FID was computed
    (ArtFID needs it)."""
    chosen = [m for m in METRICS if m.scope == SET and m.name in wanted]
    n, n_style = len(inputs.features), len(inputs.style_features)
    if n < 2 or n_style < 2:  # a covariance (FID) and an unbiased MMD (KID) need two samples on each side
        why = f"needs at least 2 styled images and 2 style images (got {n} and {n_style})"
        return {}, {m.name: why for m in chosen}
    values: dict[str, float] = {}
    problems: dict[str, str] = {}
    for metric in chosen:
        try:
            values.update(metric.score(inputs))
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as e:
            problems[metric.name] = " ".join(str(e).split())[:160]
    if inputs.fid_value is not None:
        values.setdefault("fid", inputs.fid_value)
    return values, problems


@torch.no_grad()
def score_images(content: torch.Tensor, styled: torch.Tensor, style: torch.Tensor | None = None,
                 style_folder: str | None = None, metrics: tuple[str, ...] = ALL_METRICS,
                 nets: dict[str, torch.nn.Module] | None = None, device: torch.device | str = "cpu",
                 style_max_side: int = 512) -> dict[str, Any]:
    """Metrics of a batch of styled images (the StyleMetrics node's work).

    content, styled: [B, H, W, 3] (ComfyUI IMAGE) or [B, 3, H, W], values 0..1, same H and W (batches of 1
    broadcast); style: optional style image(s) of any size, for the Gram loss and LPIPS to the style; style_folder:
    optional folder of style images, for the Gram loss (its mean Gram matrices), LPIPS to the style (when no
    `style` image is given) and FID/KID/ArtFID (needs >= 2 styled images).
    Returns {"images": B, "metrics": {name: mean}, "per_image": {name: [B values]}, "unavailable": {name: why},
    "nonfinite_pixels": [B counts]}.
    """
    wanted = set(metrics)
    x, y = as_bchw(styled, "styled").to(device), as_bchw(content, "content").to(device)
    same_size(x, y, ("styled", "content"))
    # 1. Networks (missing weights -> unavailable, with the file and where to get it).
    nets, unavailable = load_nets(wanted, nets)
    nets = {k: v.to(device) for k, v in nets.items()}
    if style is None and style_folder is None:
        unavailable.update({m: "no style image or style folder given" for m in ("gram", "lpips_style")
                            if m in wanted})
    if style_folder is None:
        unavailable.update({m: "no style folder given" for m in SET_METRICS if m in wanted})
    # 2. What the style metrics compare with.
    files = list(index_by_stem(Path(style_folder), "style_folder").values()) if style_folder else []
    if style_folder and not files:
        raise ValueError(f"style_folder {style_folder}: no images in it")
    targets = style_targets(nets, wanted, device, images=style, files=files, style_max_side=style_max_side)
    # 3. Per-image metrics, each on its own.
    per, problems = score_pairs(PairInputs(x, nets, y, targets.images, targets.grams), wanted)
    unavailable.update(problems)
    out: dict[str, Any] = {"images": int(x.shape[0]), "per_image": per, "unavailable": unavailable,
                           "metrics": {k: float(np.mean(v)) for k, v in per.items()}}
    bad_inputs = [name for name, t in (("styled", x), ("content", y)) if not torch.isfinite(t).all()]
    # NaN/inf pixels per styled image: Save Image writes them as black, so they must be said, not only scored.
    out["nonfinite_pixels"] = (~torch.isfinite(x)).any(dim=1).sum(dim=(1, 2)).tolist()
    # 4. Set metrics against the style folder.
    if targets.features is not None:
        values, problems = score_set(SetInputs(nets["inception"](x).numpy(), targets.features, out["metrics"]),
                                     wanted)
        out["metrics"].update({k: v for k, v in values.items() if k in wanted})
        unavailable.update(problems)
    # 5. A NaN/inf score is reported as n/a with the reason, never as a number: JSON has no NaN, and the
    #    browser cannot parse the NaN that Python's json writes by default.
    cause = (f"NaN/inf pixels in the {' and '.join(bad_inputs)} image" if bad_inputs
             else "the metric is undefined or overflowed for these inputs")
    for name, values in per.items():
        bad = sum(not math.isfinite(v) for v in values)
        if bad:
            per[name] = [v if math.isfinite(v) else None for v in values]
            unavailable[name] = f"not a finite number for {bad} of {len(values)} image(s): {cause}"
    for name, value in list(out["metrics"].items()):
        if name in unavailable or not math.isfinite(value):
            del out["metrics"][name]
            unavailable.setdefault(name, f"not a finite number: {cause}")
    return out


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, through dicts, lists and tuples, so that
    `json.dumps(..., allow_nan=False)` succeeds and browsers can parse the result."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def format_scores(scores: dict[str, Any]) -> str:
    """The readable text of `score_images`'s result: one line per metric, then the unavailable ones and why."""
    lines = [f"{scores['images']} image(s)"]
    bad = [(i, n) for i, n in enumerate(scores.get("nonfinite_pixels", []), 1) if n]
    if bad:
        where = ", ".join(f"image {i}: {n} pixel(s)" for i, n in bad)
        lines.append(f"WARNING: NaN/inf pixels in the styled image(s) ({where}); Save Image writes them as black "
                     "(an overflowing fp16 VAE or a broken model: try --fp32-vae or another checkpoint)")
    missing = []
    for name in ALL_METRICS:
        value = scores["metrics"].get(name)
        if value is not None and math.isfinite(value):
            better = "higher" if HIGHER_IS_BETTER[name] else "lower"
            lines.append(f"{name}: {fmt(value)}  ({DESCRIPTION[name]}; {better} is better)")
        elif name in scores["metrics"] or name in scores["unavailable"]:
            # The numbers first, then one short line per metric that has none (the first line of the reason).
            why = str(scores["unavailable"].get(name, "not a finite number")).splitlines()[0]
            missing.append(f"{name}: n/a ({why})")
    return "\n".join(lines + missing)


def append_csv(path: str | Path, row: dict[str, Any]) -> None:
    """Add one row to a CSV (header from the first row; new columns extend it), rewriting the file atomically."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    rows.append(row)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    atomic_write_csv(path, fields, rows)
