"""`evaluate`: folders of content photos, stylised outputs (one folder per method) and style images in,
a report a person reads out: report.json, report.csv, report.md, bar charts, a scatter plot and a grid."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.files import atomic_write, atomic_write_text, image_files, index_by_stem
from ..core.images import ImageLoadError, load_image, resize_cover
from .config import ALL_METRICS, DESCRIPTION, HIGHER_IS_BETTER, PAIR_METRICS, SET_METRICS, EvalConfig
from .metrics import InceptionFeatures, artfid, fid, kid, lpips_to_style, ssim
from .scoring import (
    StyleSet,
    fmt,
    json_safe,
    load_nets,
    load_tensor,
    mean_grams,
    style_images,
    style_set_features,
    to_tensor,
)

logger = logging.getLogger(__name__)

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
    content_files = index_by_stem(Path(cfg.content), "--content")
    names = list(cfg.names) or _unique_names([Path(s).name for s in cfg.styled])
    methods = []
    for name, folder in zip(names, cfg.styled):
        styled_files = index_by_stem(Path(folder), "--styled")
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
    for metric, why in unavailable.items():  # the caller shows them (the CLI prints each once)
        logger.debug("unavailable: %s (%s)", metric, why)
    nets = {k: v.to(device) for k, v in nets.items()}
    if cfg.style is None:
        for metric in sorted(wanted & {"lpips_style", "gram", "fid", "kid", "artfid"}):
            unavailable.setdefault(metric, "no --style folder given")

    # 3. Style-set statistics: the style images for LPIPS to the style, mean Gram matrices and (cached) Inception
    #    features.
    style_files = image_files(Path(cfg.style), "--style") if cfg.style else []  # recursive, as training reads it
    style_grams, style_features, paintings = None, None, None
    if style_files and "lpips" in nets and "lpips_style" in wanted:
        paintings = StyleSet(style_images(style_files))
    if style_files and "vgg" in nets and "gram" in wanted and "gram" not in unavailable:
        style_grams = mean_grams(nets["vgg"], style_files, cfg.style_max_side, device, progress)
    if style_files and "inception" in nets and wanted & {"fid", "kid", "artfid"}:
        style_features = style_set_features(nets["inception"], style_files, cfg.cache_dir, progress,
                                         cacheable=getattr(nets["inception"], "published", False))

    # 4. Per-image metrics for every method; each output is decoded once, its Inception features taken then too.
    inception = nets["inception"] if style_features is not None else None
    features: dict[str, list[np.ndarray]] = {m.name: [] for m in methods}
    total = sum(len(m.rows) for m in methods)
    bar = tqdm(total=total, desc="Evaluating", unit="img", disable=not progress)
    for m in methods:
        for row in m.rows:
            feat = _score_pair(row, nets, wanted, unavailable, style_grams, cfg.resize_content, device, inception,
                               paintings)
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


@torch.no_grad()
def _score_pair(row: dict[str, Any], nets: dict, wanted: set[str], unavailable: dict[str, str], style_grams,
                resize_content: bool, device: torch.device, inception: InceptionFeatures | None = None,
                paintings: StyleSet | None = None) -> np.ndarray | None:
    """Fill `row` with the per-image metrics; return the output's Inception features [2048] when `inception`
    is given (FID/KID need no content photo, so they count outputs whose pair fails). `paintings`: the style set
    for LPIPS to the style, which needs no content photo either."""
    try:
        styled = load_tensor(Path(row["styled_file"])).to(device)
    except ImageLoadError as e:
        row["error"] = str(e)
        return None
    feat = inception(styled).numpy()[0] if inception is not None else None
    problems = []
    if paintings is not None:  # against the style images, so it needs no content photo
        try:
            h, w = styled.shape[-2:]
            row["lpips_style"] = float(lpips_to_style(nets["lpips"], styled, paintings.at_size(w, h).to(device))[0])
        except (RuntimeError, ValueError) as e:
            problems.append(f"lpips_style: {' '.join(str(e).split())[:160]}")
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
                try:
                    row["gram"] = float(nets["vgg"].gram_loss(styled, style_grams)[0])
                except (RuntimeError, ValueError) as e:
                    row["error"] += f"; gram: {' '.join(str(e).split())[:160]}"
            return feat
        from PIL import Image

        row["resized_content"] = f"{content_img.size[0]}x{content_img.size[1]} -> {w}x{h}"
        content_img = content_img.resize((w, h), Image.Resampling.LANCZOS)
    content = to_tensor(content_img).to(device)
    # Each metric on its own: an image too small for one (SSIM's 11x11 window, VGG's four poolings) is reported
    # in its row and the other metrics, and the other pairs, are still scored.
    scores = {
        "ssim": lambda: ssim(styled, content),
        "lpips": lambda: nets["lpips"](styled, content),
        "lpips_vgg": lambda: nets["lpips_vgg"](styled, content),
        "content": lambda: nets["vgg"].content_loss(styled, content),
        "gram": lambda: nets["vgg"].gram_loss(styled, style_grams),
    }
    needs = {"lpips": "lpips", "lpips_vgg": "lpips_vgg", "content": "vgg", "gram": "vgg"}
    for metric, score in scores.items():
        if metric not in wanted or (metric in needs and needs[metric] not in nets) or \
                (metric == "gram" and style_grams is None):
            continue
        try:
            row[metric] = float(score()[0])
        except (RuntimeError, ValueError) as e:
            problems.append(f"{metric}: {' '.join(str(e).split())[:160]}")
    if problems:
        row["error"] = f"{row['styled_file']} ({w}x{h}): not scored for " + "; ".join(problems)
    return feat


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
                spread = f" ± {fmt(m.set_metrics.get('kid_std'))}" if k == "kid" and v is not None else ""
                cells.append(fmt(v) + spread)
            else:
                cells.append(fmt(m.mean(k)))
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


