"""`evaluate`: folders of content photos, stylised outputs (one folder per method) and style images in,
a report a person reads out: report.json, report.csv, report.md, bar charts, a scatter plot and a grid."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..trainer.files import atomic_write, atomic_write_text
from ..trainer.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from .metrics import LPIPS, InceptionFeatures, VGGStyle, artfid, as_bchw, fid, kid, same_size, ssim
from .weights import WeightsUnavailable

logger = logging.getLogger(__name__)

PAIR_METRICS = ("ssim", "lpips", "lpips_vgg", "content", "gram")  # one value per styled image
SET_METRICS = ("fid", "kid", "artfid")  # one value per styled folder
ALL_METRICS = PAIR_METRICS + SET_METRICS
# Which way is better, for the tables.
HIGHER_IS_BETTER = {"ssim": True, "lpips": False, "lpips_vgg": False, "content": False, "gram": False,
                    "fid": False, "kid": False, "artfid": False}
DESCRIPTION = {
    "ssim": "SSIM to the content photo (structure kept)",
    "lpips": "LPIPS (AlexNet) to the content photo",
    "lpips_vgg": "LPIPS (VGG-16) to the content photo",
    "content": "VGG-19 relu4_2 content loss to the content photo",
    "gram": "Gram style loss to the style set's mean Gram matrices (VGG-19)",
    "fid": "FID of the outputs against the style set",
    "kid": "KID of the outputs against the style set",
    "artfid": "ArtFID = (1 + LPIPS) * (1 + FID)",
}


@dataclass(frozen=True)
class EvalConfig:
    content: str  # folder of content photos
    styled: tuple[str, ...]  # folders of stylised outputs, paired with content photos by file stem
    out: str  # folder for the report
    style: str | None = None  # folder of style images (needed for gram, fid, kid, artfid)
    names: tuple[str, ...] = ()  # a label per styled folder; default: the folder names
    metrics: tuple[str, ...] = ALL_METRICS  # which metrics to compute
    resize_content: bool = False  # resize a content photo to its output's size when they differ (else: an error row)
    style_max_side: int = 512  # style images are scaled down to this longest side for Gram statistics
    kid_subsets: int = 100  # KID: number of random subsets
    kid_subset_size: int = 1000  # KID: subset size (capped by the set sizes)
    grid_rows: int = 6  # rows of the content | style | output grid
    device: str | None = None  # "cuda", "cpu"; None picks CUDA when available
    cache_dir: str | None = None  # style-set Inception feature cache; None: ~/.cache/stylora/features

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; choose from {list(ALL_METRICS)}")
        if not self.styled:
            raise ValueError("styled: give at least one folder of stylised outputs")
        if self.names and len(self.names) != len(self.styled):
            raise ValueError(f"names: {len(self.names)} labels for {len(self.styled)} styled folders")


@dataclass
class MethodResult:
    name: str  # label of the styled folder
    folder: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per paired image
    set_metrics: dict[str, float | None] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # styled files without a content photo

    def mean(self, metric: str) -> float | None:
        values = [r[metric] for r in self.rows if r.get(metric) is not None]
        return float(np.mean(values)) if values else None


def evaluate(cfg: EvalConfig, nets: dict[str, torch.nn.Module] | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Compute the metrics and write the report files into cfg.out. Returns the report as a dict.

    `nets` may supply prebuilt feature networks ("lpips", "lpips_vgg", "vgg", "inception"), e.g. with random
    weights in tests; otherwise the published weights are loaded, and a metric whose weights are missing
    is reported as unavailable with the reason instead of failing the run.
    """
    from tqdm.auto import tqdm

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(cfg.metrics)

    # 1. Pair every styled image with its content photo by file stem.
    content_files = _index(Path(cfg.content), "--content")
    names = list(cfg.names) or _unique_names([Path(s).name for s in cfg.styled])
    methods = []
    for name, folder in zip(names, cfg.styled):
        styled_files = _index(Path(folder), "--styled")
        m = MethodResult(name, str(folder))
        m.unmatched = sorted(s for s in styled_files if s not in content_files)
        m.rows = [{"image": stem, "content_file": str(content_files[stem]), "styled_file": str(path)}
                  for stem, path in sorted(styled_files.items()) if stem in content_files]
        if m.unmatched:
            logger.warning("%s: %d output(s) have no content photo of the same name: %s", folder, len(m.unmatched),
                           ", ".join(m.unmatched[:5]))
        methods.append(m)
    if not any(m.rows for m in methods):
        raise ValueError(f"no styled image in {list(cfg.styled)} has a content photo of the same name in {cfg.content}")

    # 2. Feature networks for the requested metrics; missing weights make a metric unavailable, not an error.
    nets, unavailable = load_nets(wanted, nets)
    for metric, why in unavailable.items():
        logger.warning("unavailable: %s (%s)", metric, why)
    nets = {k: v.to(device) for k, v in nets.items()}
    if cfg.style is None:
        for metric in sorted(wanted & {"gram", "fid", "kid", "artfid"}):
            unavailable.setdefault(metric, "no --style folder given")

    # 3. Style-set statistics: mean Gram matrices and (cached) Inception features.
    style_files = list(_index(Path(cfg.style), "--style").values()) if cfg.style else []
    style_grams, style_features = None, None
    if style_files and "vgg" in nets and "gram" in wanted and "gram" not in unavailable:
        style_grams = _mean_grams(nets["vgg"], style_files, cfg.style_max_side, device, progress)
    if style_files and "inception" in nets and wanted & {"fid", "kid", "artfid"}:
        style_features = _style_features(nets["inception"], style_files, cfg.cache_dir, progress,
                                         cacheable=getattr(nets["inception"], "published", False))

    # 4. Per-image metrics for every method; each output is decoded once, its Inception features taken then too.
    inception = nets["inception"] if style_features is not None else None
    features: dict[str, list[np.ndarray]] = {m.name: [] for m in methods}
    total = sum(len(m.rows) for m in methods)
    bar = tqdm(total=total, desc="Evaluating", unit="img", disable=not progress)
    for m in methods:
        for row in m.rows:
            feat = _score_pair(row, nets, wanted, unavailable, style_grams, cfg.resize_content, device, inception)
            if feat is not None:
                features[m.name].append(feat)
            bar.update(1)
    bar.close()

    # 5. Set-level metrics: FID and KID against the style set, ArtFID from FID and mean LPIPS.
    for m in methods:
        if style_features is None or not m.rows:
            continue
        feats = np.stack(features[m.name]) if features[m.name] else np.zeros((0, 2048))
        enough = len(feats) >= 2 and len(style_features) >= 2
        if "fid" in wanted or "artfid" in wanted:
            m.set_metrics["fid"] = fid(feats, style_features) if enough else None
        if "kid" in wanted:
            k = kid(feats, style_features, cfg.kid_subsets, cfg.kid_subset_size) if enough else (None, None)
            m.set_metrics["kid"], m.set_metrics["kid_std"] = k
        if "artfid" in wanted and m.mean("lpips") is not None and m.set_metrics.get("fid") is not None:
            m.set_metrics["artfid"] = artfid(m.mean("lpips"), m.set_metrics["fid"])
        if not enough:
            logger.warning("%s: FID/KID need at least 2 outputs and 2 style images", m.name)

    # 6. Write the report: JSON, CSV, Markdown, plots and the image grid.
    report = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "metrics": [x for x in ALL_METRICS if x in wanted],
        "unavailable": unavailable,
        "higher_is_better": {k: HIGHER_IS_BETTER[k] for k in ALL_METRICS if k in wanted},
        "methods": {m.name: {"folder": m.folder, "images": len(m.rows),
                             "mean": {k: m.mean(k) for k in PAIR_METRICS if k in wanted},
                             "set": m.set_metrics, "unmatched": m.unmatched, "rows": m.rows}
                    for m in methods},
    }
    atomic_write_text(out / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False,
                                                      default=_json_default))
    _write_csv(out / "report.csv", methods, [x for x in PAIR_METRICS if x in wanted])
    atomic_write_text(out / "report.md", _markdown(report, methods, style_files))
    _plot(out, methods, report)
    _grid(out / "grid.png", methods, style_files, cfg.grid_rows)
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def _index(folder: Path, flag: str) -> dict[str, Path]:
    """Image files directly in a folder, by stem (subfolders, e.g. other methods' outputs, are not entered)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: not a folder")
    index: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.suffix.lower() not in IMAGE_EXTENSIONS or not f.is_file():
            continue
        if f.stem in index:
            logger.warning("%s: %s and %s share a stem; using the first", folder, index[f.stem].name, f.name)
            continue
        index[f.stem] = f
    return index


def _to_tensor(img) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] float in 0..1."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def _load(path: Path) -> torch.Tensor:
    return _to_tensor(load_image(path))


@torch.no_grad()
def _score_pair(row: dict[str, Any], nets: dict, wanted: set[str], unavailable: dict[str, str], style_grams,
                resize_content: bool, device: torch.device, inception: InceptionFeatures | None = None
                ) -> np.ndarray | None:
    """Fill `row` with the per-image metrics; return the output's Inception features [2048] when `inception`
    is given (FID/KID need no content photo, so they count outputs whose pair fails)."""
    try:
        styled = _load(Path(row["styled_file"])).to(device)
    except ImageLoadError as e:
        row["error"] = str(e)
        return None
    feat = inception(styled).numpy()[0] if inception is not None else None
    try:
        content_img = load_image(Path(row["content_file"]))
    except ImageLoadError as e:
        row["error"] = str(e)
        return feat
    h, w = styled.shape[-2:]
    if content_img.size != (w, h):
        if not resize_content:
            row["error"] = (f"size mismatch: content {content_img.size[0]}x{content_img.size[1]}, output {w}x{h} "
                            "(pass --resize-content to compare at the output's size)")
            if "gram" in wanted and "gram" not in unavailable and style_grams is not None:
                row["gram"] = float(nets["vgg"].gram_loss(styled, style_grams)[0])
            return feat
        from PIL import Image

        row["resized_content"] = f"{content_img.size[0]}x{content_img.size[1]} -> {w}x{h}"
        content_img = content_img.resize((w, h), Image.Resampling.LANCZOS)
    content = _to_tensor(content_img).to(device)
    if "ssim" in wanted:
        row["ssim"] = float(ssim(styled, content)[0])
    for metric, key in (("lpips", "lpips"), ("lpips_vgg", "lpips_vgg")):
        if metric in wanted and key in nets:
            row[metric] = float(nets[key](styled, content)[0])
    if "vgg" in nets:
        if "content" in wanted:
            row["content"] = float(nets["vgg"].content_loss(styled, content)[0])
        if "gram" in wanted and style_grams is not None:
            row["gram"] = float(nets["vgg"].gram_loss(styled, style_grams)[0])
    return feat


@torch.no_grad()
def _mean_grams(vgg: VGGStyle, files: list[Path], max_side: int, device, progress: bool) -> list[torch.Tensor]:
    from PIL import Image
    from tqdm.auto import tqdm

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
        grams = vgg.grams(_to_tensor(img).to(device))
        sums = grams if sums is None else [s + g for s, g in zip(sums, grams)]
        n += 1
    if not n:
        raise ValueError("--style: no usable style image")
    return [s / n for s in sums]


@torch.no_grad()
def _features_of(net: InceptionFeatures, files: list[Path], progress: bool, desc: str) -> np.ndarray:
    from tqdm.auto import tqdm

    feats = []
    for f in tqdm(files, desc=desc, unit="img", disable=not progress):
        try:
            feats.append(net(_load(f)).numpy()[0])
        except ImageLoadError as e:
            logger.warning("skipped for FID/KID: %s", e)
    return np.stack(feats) if feats else np.zeros((0, 2048))


def set_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _style_features(net: InceptionFeatures, files: list[Path], cache_dir: str | None, progress: bool,
                    cacheable: bool) -> np.ndarray:
    """Inception features of the style set, cached by the set's fingerprint: one style set serves many runs."""
    from safetensors.numpy import load_file, save_file

    cache = Path(cache_dir or os.environ.get("STYLORA_CACHE", Path.home() / ".cache" / "stylora")) / "features"
    path = cache / f"fid-inception-2015-12-05-{set_fingerprint(files)[:32]}.safetensors"
    if cacheable and path.is_file():
        logger.info("style-set features from cache %s", path)
        return load_file(str(path))["features"]
    feats = _features_of(net, files, progress, "Inception features (style set)")
    if cacheable and len(feats):
        try:
            atomic_write(path, lambda tmp: save_file({"features": feats}, tmp))
        except OSError as e:
            logger.warning("could not cache style features at %s: %s", path, e)
    return feats


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}"


def _write_csv(path: Path, methods: list[MethodResult], metrics: list[str]) -> None:
    fields = ["method", "image", *metrics, "content_file", "styled_file", "error"]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            for m in methods:
                for r in m.rows:
                    w.writerow({"method": m.name, **{k: r.get(k, "") for k in fields if k != "method"}})

    atomic_write(path, write)


def _markdown(report: dict, methods: list[MethodResult], style_files: list[Path]) -> str:
    metrics = report["metrics"]
    arrow = {k: "↑" if HIGHER_IS_BETTER[k] else "↓" for k in metrics}
    lines = ["# Stylora evaluation", "",
             f"Content: `{report['config']['content']}`  ", f"Style set: `{report['config']['style']}` "
             f"({len(style_files)} images)", ""]
    head = ["method", "images"] + [f"{k} {arrow[k]}" for k in metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [m.name, str(len(m.rows))]
        for k in metrics:
            if k in report["unavailable"]:
                cells.append("unavailable")
            elif k in SET_METRICS:
                v = m.set_metrics.get(k)
                spread = f" ± {_fmt(m.set_metrics.get('kid_std'))}" if k == "kid" and v is not None else ""
                cells.append(_fmt(v) + spread)
            else:
                cells.append(_fmt(m.mean(k)))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-image metrics are means over the paired images; FID, KID and ArtFID compare each method's "
              "outputs with the style set. ↑ higher is better, ↓ lower is better.", ""]
    lines += [f"- **{k}**: {DESCRIPTION[k]}" for k in metrics]
    if report["unavailable"]:
        lines += ["", "## Unavailable metrics", ""]
        lines += [f"- **{k}**: {reason}" for k, reason in report["unavailable"].items()]
    errors = [(m.name, r["image"], r["error"]) for m in methods for r in m.rows if r.get("error")]
    unmatched = [(m.name, s) for m in methods for s in m.unmatched]
    if errors or unmatched:
        lines += ["", "## Problems", ""]
        lines += [f"- {name}/{image}: {err}" for name, image, err in errors]
        lines += [f"- {name}/{s}: no content photo named {s}.*" for name, s in unmatched]
    lines += ["", "Plots: `plot_<metric>.png`, `plot_content_vs_style.png`; examples: `grid.png`.", ""]
    return "\n".join(lines)


def _plot(out: Path, methods: list[MethodResult], report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in methods]
    for k in report["metrics"]:
        if k in report["unavailable"]:
            continue
        values = [m.set_metrics.get(k) if k in SET_METRICS else m.mean(k) for m in methods]
        if all(v is None for v in values):
            continue
        fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(names) + 2), 3.6))
        if len(methods) == 1 and k in PAIR_METRICS:  # one method: the per-image values tell more
            rows = [r for r in methods[0].rows if r.get(k) is not None]
            ax.bar([r["image"] for r in rows], [r[k] for r in rows], color="#4c72b0")
            ax.tick_params(axis="x", rotation=45)
        else:
            ax.bar(names, [v if v is not None else 0 for v in values], color="#4c72b0")
        ax.set_title(f"{DESCRIPTION[k]} ({'higher' if HIGHER_IS_BETTER[k] else 'lower'} is better)", fontsize=9)
        ax.set_ylabel(k)
        fig.tight_layout()
        _save_fig(fig, out / f"plot_{k}.png")
        plt.close(fig)
    x_key = next((k for k in ("ssim", "lpips") if k in report["metrics"] and k not in report["unavailable"]), None)
    y_key = next((k for k in ("gram", "content") if k in report["metrics"] and k not in report["unavailable"]), None)
    if x_key and y_key:
        fig, ax = plt.subplots(figsize=(5, 4))
        for m in methods:
            pts = [(r[x_key], r[y_key]) for r in m.rows if r.get(x_key) is not None and r.get(y_key) is not None]
            if pts:
                ax.scatter(*zip(*pts), label=m.name, alpha=0.8)
        ax.set_xlabel(f"{x_key} (content preservation)")
        ax.set_ylabel(f"{y_key} (style distance)")
        ax.set_yscale("log") if y_key == "gram" else None
        ax.legend(fontsize=8)
        ax.set_title("Content preservation vs style", fontsize=10)
        fig.tight_layout()
        _save_fig(fig, out / "plot_content_vs_style.png")
        plt.close(fig)


def _save_fig(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _grid(path: Path, methods: list[MethodResult], style_files: list[Path], rows: int, cell: int = 192) -> None:
    """content | style sample | output(s): one row per image (the first `rows` paired images)."""
    from PIL import Image, ImageDraw

    from ..trainer.images import resize_cover

    stems = [r["image"] for r in methods[0].rows][:rows] if methods else []
    if not stems:
        return
    cols = 2 + len(methods)
    canvas = Image.new("RGB", (cols * cell, 20 + len(stems) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(["content", "style"] + [m.name for m in methods]):
        draw.text((c * cell + 4, 4), title[:28], fill="black")
    by_method = [{r["image"]: r for r in m.rows} for m in methods]
    for i, stem in enumerate(stems):
        cells = [by_method[0][stem]["content_file"], str(style_files[i % len(style_files)]) if style_files else None]
        cells += [bm[stem]["styled_file"] if stem in bm else None for bm in by_method]
        for c, f in enumerate(cells):
            if f is None:
                continue
            try:
                canvas.paste(resize_cover(load_image(f), cell, cell), (c * cell, 20 + i * cell))
            except ImageLoadError:
                draw.text((c * cell + 4, 20 + i * cell + 4), "unreadable", fill="red")
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def load_nets(wanted: set[str], nets: dict[str, torch.nn.Module] | None = None
              ) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """The feature networks the wanted metrics need, with published weights; a network whose weights are missing
    makes its metrics unavailable (metric -> reason) instead of failing. `nets` supplies prebuilt ones."""
    nets = dict(nets or {})
    unavailable: dict[str, str] = {}
    needs = {"lpips": {"lpips", "artfid"}, "lpips_vgg": {"lpips_vgg"}, "vgg": {"content", "gram"},
             "inception": {"fid", "kid", "artfid"}}
    builders = {"lpips": lambda: LPIPS("alex"), "lpips_vgg": lambda: LPIPS("vgg"), "vgg": lambda: VGGStyle(),
                "inception": lambda: InceptionFeatures()}
    for key, metrics in needs.items():
        if key in nets or not wanted & metrics:
            continue
        try:
            nets[key] = builders[key]()
        except WeightsUnavailable as e:
            for metric in sorted(wanted & metrics):
                unavailable[metric] = str(e)
    return nets, unavailable


@torch.no_grad()
def score_images(content: torch.Tensor, styled: torch.Tensor, style: torch.Tensor | None = None,
                 style_folder: str | None = None, metrics: tuple[str, ...] = ALL_METRICS,
                 nets: dict[str, torch.nn.Module] | None = None, device: torch.device | str = "cpu",
                 style_max_side: int = 512) -> dict[str, Any]:
    """Metrics of a batch of styled images (the StyleMetrics node's work).

    content, styled: [B, H, W, 3] (ComfyUI IMAGE) or [B, 3, H, W], values 0..1, same H and W (batches of 1
    broadcast); style: optional style image(s) of any size, for the Gram loss; style_folder: optional folder of
    style images, for the Gram loss (its mean Gram matrices) and FID/KID/ArtFID (needs >= 2 styled images).
    Returns {"images": B, "metrics": {name: mean}, "per_image": {name: [B values]}, "unavailable": {name: why}}.
    """
    wanted = set(metrics)
    x, y = as_bchw(styled, "styled").to(device), as_bchw(content, "content").to(device)
    same_size(x, y, ("styled", "content"))
    # 1. Networks (missing weights -> unavailable, with the file and where to get it).
    nets, unavailable = load_nets(wanted, nets)
    nets = {k: v.to(device) for k, v in nets.items()}
    if style is None and style_folder is None:
        unavailable.update({m: "no style image or style folder given" for m in ("gram",) if m in wanted})
    if style_folder is None:
        unavailable.update({m: "no style folder given" for m in ("fid", "kid", "artfid") if m in wanted})
    # 2. Per-image metrics.
    per: dict[str, list[float]] = {}
    if "ssim" in wanted:
        per["ssim"] = ssim(x, y).tolist()
    for key in ("lpips", "lpips_vgg"):
        if key in wanted and key in nets:
            per[key] = nets[key](x, y).tolist()
    files = list(_index(Path(style_folder), "style_folder").values()) if style_folder else []
    if style_folder and not files:
        raise ValueError(f"style_folder {style_folder}: no images in it")
    if "vgg" in nets:
        if "content" in wanted:
            per["content"] = nets["vgg"].content_loss(x, y).tolist()
        if "gram" in wanted and "gram" not in unavailable:
            target = (nets["vgg"].grams(as_bchw(style, "style").to(device)) if style is not None
                      else _mean_grams(nets["vgg"], files, style_max_side, device, progress=False))
            if style is not None and len(target[0]) > 1:  # several style images: their mean statistics
                target = [g.mean(0, keepdim=True) for g in target]
            per["gram"] = nets["vgg"].gram_loss(x, target).tolist()
    out: dict[str, Any] = {"images": int(x.shape[0]), "per_image": per, "unavailable": unavailable,
                           "metrics": {k: float(np.mean(v)) for k, v in per.items()}}
    bad_inputs = [name for name, t in (("styled", x), ("content", y)) if not torch.isfinite(t).all()]
    # 3. Set metrics against the style folder.
    if files and "inception" in nets and wanted & {"fid", "kid", "artfid"}:
        feats = nets["inception"](x).numpy()
        style_feats = _style_features(nets["inception"], files, None, False,
                                      cacheable=getattr(nets["inception"], "published", False))
        if len(feats) < 2 or len(style_feats) < 2:
            why = f"needs at least 2 styled images and 2 style images (got {len(feats)} and {len(style_feats)})"
            unavailable.update({m: why for m in ("fid", "kid", "artfid") if m in wanted})
        else:
            f = fid(feats, style_feats)
            if "fid" in wanted:
                out["metrics"]["fid"] = f
            if "kid" in wanted:
                out["metrics"]["kid"] = kid(feats, style_feats, subsets=100, subset_size=1000)[0]
            if "artfid" in wanted and "lpips" in out["metrics"]:
                out["metrics"]["artfid"] = artfid(out["metrics"]["lpips"], f)
    # 4. A NaN/inf score is reported as n/a with the reason, never as a number: JSON has no NaN, and the
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
    missing = []
    for name in ALL_METRICS:
        value = scores["metrics"].get(name)
        if value is not None and math.isfinite(value):
            better = "higher" if HIGHER_IS_BETTER[name] else "lower"
            lines.append(f"{name}: {_fmt(value)}  ({DESCRIPTION[name]}; {better} is better)")
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

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)
