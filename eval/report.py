"""`evaluate`: folders of content photos, stylised outputs (one folder per method) and style images in,
a report a person reads out: report.json, report.csv, report.md, bar charts, a scatter plot and a grid."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.files import atomic_write, atomic_write_csv, atomic_write_text, image_files, index_by_stem
from ..core.images import ImageLoadError, image_grid, load_image
from .config import EvalConfig
from .registry import (
    ALL_METRICS,
    DESCRIPTION,
    HIGHER_IS_BETTER,
    PAIR_METRICS,
    SET_METRICS,
    PairInputs,
    SetInputs,
    arrow,
)
from .scoring import (
    StyleTargets,
    fmt,
    json_safe,
    load_nets,
    load_tensor,
    score_pairs,
    score_set,
    style_targets,
    to_tensor,
)

logger = logging.getLogger(__name__)

PROBLEMS = "## Problems"  # the report's section that says why a cell has no number or a partial mean

@dataclass
class MethodResult:
    name: str  # label of the styled folder
    folder: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per paired image
    set_metrics: dict[str, float | None] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # styled files without a content photo
    set_problems: dict[str, str] = field(default_factory=dict)  # set metric -> why it has no value

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
    targets = style_targets(nets, wanted, device, files=style_files, style_max_side=cfg.style_max_side,
                            cache_dir=cfg.cache_dir, progress=progress)

    # 4. Per-image metrics for every method; each output is decoded once, its Inception features taken then too.
    features: dict[str, list[np.ndarray]] = {m.name: [] for m in methods}
    total = sum(len(m.rows) for m in methods)
    bar = tqdm(total=total, desc="Evaluating", unit="img", disable=not progress)
    for m in methods:
        for row in m.rows:
            feat = _score_pair(row, nets, wanted, targets, cfg.resize_content, device)
            if feat is not None:
                features[m.name].append(feat)
            bar.update(1)
    bar.close()

    # 5. Set-level metrics: FID and KID against the style set, ArtFID from FID and mean LPIPS.
    for m in methods:
        if targets.features is None or not m.rows:
            continue
        feats = np.stack(features[m.name]) if features[m.name] else np.zeros((0, 2048))
        values, m.set_problems = score_set(SetInputs(feats, targets.features, {k: m.mean(k) for k in PAIR_METRICS},
                                                     cfg.kid_subsets, cfg.kid_subset_size), wanted)
        if "fid" in wanted or "artfid" in wanted:
            m.set_metrics["fid"] = values.get("fid")
        if "kid" in wanted:
            m.set_metrics["kid"], m.set_metrics["kid_std"] = values.get("kid"), values.get("kid_std")
        if "artfid" in values:
            m.set_metrics["artfid"] = values["artfid"]
        for metric, why in m.set_problems.items():
            logger.warning("%s: %s: %s", m.name, metric, why)

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
def _score_pair(row: dict[str, Any], nets: dict, wanted: set[str], targets: StyleTargets, resize_content: bool,
                device: torch.device) -> np.ndarray | None:
    """Fill `row` with the per-image metrics; return the output's Inception features [2048] when the style set has
    them (FID/KID need no content photo, so they count outputs whose pair fails). The style metrics need no
    content photo either: they are scored when the photo is unreadable or of another size."""
    try:
        styled = load_tensor(Path(row["styled_file"])).to(device)
    except ImageLoadError as e:
        row["error"] = str(e)
        return None
    feat = nets["inception"](styled).numpy()[0] if targets.features is not None else None
    h, w = styled.shape[-2:]
    content, error = _content_photo(row, w, h, resize_content)
    # Each metric on its own: an image too small for one (SSIM's 11x11 window, VGG's four poolings) is reported
    # in its row and the other metrics, and the other pairs, are still scored.
    values, problems = score_pairs(PairInputs(styled, nets, content.to(device) if content is not None else None,
                                              targets.images, targets.grams), wanted)
    row.update({metric: v[0] for metric, v in values.items()})
    errors = [error] if error else []
    if problems:
        errors.append(f"{row['styled_file']} ({w}x{h}): not scored for "
                      + "; ".join(f"{metric}: {why}" for metric, why in problems.items()))
    if errors:
        row["error"] = "; ".join(errors)
    return feat


def _content_photo(row: dict[str, Any], width: int, height: int, resize_content: bool
                   ) -> tuple[torch.Tensor | None, str | None]:
    """The row's content photo [1, 3, height, width] in 0..1, resized to the output's size when `resize_content`
    (noted in the row); or None and why (unreadable, or of another size)."""
    try:
        img = load_image(Path(row["content_file"]))
    except ImageLoadError as e:
        return None, str(e)
    if img.size != (width, height):
        if not resize_content:
            return None, (f"size mismatch: content {img.size[0]}x{img.size[1]}, output {width}x{height} "
                          "(pass --resize-content to compare at the output's size)")
        row["resized_content"] = f"{img.size[0]}x{img.size[1]} -> {width}x{height}"
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return to_tensor(img), None


def _write_csv(path: Path, methods: list[MethodResult], metrics: list[str]) -> None:
    fields = ["method", "image", *metrics, "content_file", "styled_file", "error"]

    atomic_write_csv(path, fields, [{**r, "method": m.name} for m in methods for r in m.rows])


def _markdown(report: dict, methods: list[MethodResult], style_files: list[Path]) -> str:
    metrics = report["metrics"]
    lines = ["# Stylora evaluation", "",
             f"Content: `{report['config']['content']}`  ", f"Style set: `{report['config']['style']}` "
             f"({len(style_files)} images)", ""]
    head = ["method", "images"] + [f"{k} {arrow(k)}" for k in metrics]
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
    problems = _problems(report, methods)
    if problems:
        lines += ["", PROBLEMS, ""] + problems
    lines += ["", "Plots: `plot_<metric>.png`, `plot_content_vs_style.png`; examples: `grid.png`.", ""]
    return "\n".join(lines)


def _problems(report: dict, methods: list[MethodResult]) -> list[str]:
    """Why a cell of the table has no number ("n/a") or a mean over fewer images than its method counts: the
    set metrics' reasons, the partial means, then each row's error and each output without a content photo."""
    lines = []
    for m in methods:
        lines += [f"- {m.name}: {k}: n/a ({why})" for k, why in m.set_problems.items()
                  if k in report["metrics"] and k not in report["unavailable"]]
        partial: dict[int, list[str]] = {}
        for k in report["metrics"]:
            if k in PAIR_METRICS and k not in report["unavailable"]:
                scored = sum(r.get(k) is not None for r in m.rows)
                if scored < len(m.rows):
                    partial.setdefault(scored, []).append(k)
        for n, names in partial.items():
            what = f"mean over {n} of {len(m.rows)} images" if n else "n/a (no image scored)"
            lines.append(f"- {m.name}: {', '.join(names)}: {what} (see the rows below)")
    lines += [f"- {m.name}/{r['image']}: {r['error']}" for m in methods for r in m.rows if r.get("error")]
    lines += [f"- {m.name}/{s}: no content photo named {s}.*" for m in methods for s in m.unmatched]
    return lines


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
    stems = [r["image"] for r in methods[0].rows][:rows] if methods else []
    if not stems:
        return
    by_method = [{r["image"]: r for r in m.rows} for m in methods]
    cells = [[by_method[0][stem]["content_file"], style_files[i % len(style_files)] if style_files else None]
             + [bm[stem]["styled_file"] if stem in bm else None for bm in by_method] for i, stem in enumerate(stems)]
    titles = tuple(title[:28] for title in ["content", "style"] + [m.name for m in methods])
    canvas = image_grid(cells, cell, 2 + len(methods), column_titles=titles)
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
