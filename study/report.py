"""The study's report: the comparison table with the targets, per-style grids, strength sweeps and the trained
methods' loss curves (report.md, report.json, grid_<style>.png, sweep_<method>.png, loss_curves.png)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, atomic_write_text
from ..core.images import IMAGE_EXTENSIONS, image_grid
from ..eval.registry import BY_NAME, SET_METRICS, STUDY_METRICS, arrow
from ..trainer.loss_curve import read_loss_log
from .config import StudyConfig

logger = logging.getLogger(__name__)

BASE = "_base"  # plain img2img does not depend on the style: stylised once, scored against every style
METRICS = STUDY_METRICS
COLUMNS = METRICS + ("seconds_per_image", "train_seconds", "peak_memory_mb", "file_bytes")
HEADERS = {**{m: f"{BY_NAME[m].label} {arrow(m)}" for m in METRICS}, "seconds_per_image": "s / image",
           "train_seconds": "training time", "peak_memory_mb": "peak memory", "file_bytes": "file size"}
# The study's targets: FID < 60 against the style set, SSIM > 0.7 to the photo, LPIPS < 0.3 to the style images,
# under 5 s per 512x512 image on a T4.
TARGETS = {"fid": ("<", 60.0), "ssim": (">", 0.7), "lpips_style": ("<", 0.3), "seconds_per_image": ("<", 5.0)}
SSIM_TARGET = TARGETS["ssim"][1]
UNAVAILABLE = "unavailable"
NO_TRAINING = "none (no training)"


def _clean(value: Any) -> float | None:
    """A finite float, or None (NaN and infinities become None; the caller records why)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def collect(cfg: StudyConfig, jobs: list[tuple[str, str, float, int, str]], reports: dict[str, dict],
            stylize: dict[str, Any], costs: dict[str, dict | None], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """One row per method, style and strength: each metric's mean over seeds, or None with the reason."""
    rows = []
    for method in cfg.methods:
        for style, _ in cfg.styles:
            for strength in cfg.strengths:
                keys = [key for (s, m, st, _, key) in jobs if m == method and st == strength
                        and s == (BASE if method == "base" else style)]
                values: dict[str, float | None] = {}
                why: dict[str, str] = {}
                report = reports.get(style)
                for metric in METRICS:
                    found = []
                    for key in keys:
                        entry = (report or {}).get("methods", {}).get(key)
                        if entry is not None:
                            raw = entry["set" if metric in SET_METRICS else "mean"].get(metric)
                            found.append(_clean(raw))
                            if raw is not None and found[-1] is None:
                                why[metric] = "not a finite number"
                    values[metric] = _mean(found)
                    if values[metric] is None:
                        why.setdefault(metric, _reason(metric, keys, report, skipped))
                seconds = [s for key in keys for s in ((stylize.get(key) or {}).get("seconds") or {}).values()]
                values["seconds_per_image"] = _mean([_clean(s) for s in seconds])
                if values["seconds_per_image"] is None:
                    why["seconds_per_image"] = _reason("seconds", keys, report, skipped) if any(
                        k in skipped for k in keys) else "no image stylised and timed by this study"
                record = costs.get(f"{style}/{method}")
                for column, field in (("train_seconds", "train_seconds"), ("peak_memory_mb", "peak_memory_mb"),
                                      ("file_bytes", "bytes")):
                    values[column] = _clean(record.get(field)) if record else None
                    if values[column] is None:
                        why[column] = NO_TRAINING if method in ("base", "image", "adain") else "no resource record"
                rows.append({"method": method, "style": style, "strength": strength, "values": values,
                             "unavailable": why})
    return rows


def _reason(metric: str, keys: list[str], report: dict | None, skipped: dict[str, str]) -> str:
    for key in keys:
        if key in skipped:
            return f"skipped: {skipped[key]}"
    if report is None:
        return "not scored (nothing stylised for this style)"
    if metric in report.get("unavailable", {}):
        return report["unavailable"][metric]
    if not any(key in report.get("methods", {}) for key in keys):
        return "not stylised"
    if metric in SET_METRICS:
        return "needs at least 2 outputs and 2 style images (FID/KID)"
    return "not computed"


def mean_rows(cfg: StudyConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and strength: the mean over styles of each column (None, with a reason, if no style has it)."""
    out = []
    for method in cfg.methods:
        for strength in cfg.strengths:
            group = [r for r in rows if r["method"] == method and r["strength"] == strength]
            values = {c: _mean([r["values"][c] for r in group]) for c in COLUMNS}
            why = {c: next(r["unavailable"][c] for r in group) for c in COLUMNS if values[c] is None and group}
            out.append({"method": method, "style": "all styles (mean)", "strength": strength, "values": values,
                        "unavailable": why})
    return out


def targets(mean: list[dict[str, Any]], strength: float) -> dict[str, dict[str, str]]:
    """met / not met / unmeasured per method for each target, from the all-styles mean at `strength`."""
    out: dict[str, dict[str, str]] = {}
    for row in mean:
        if row["strength"] != strength:
            continue
        verdicts = {}
        for column, (op, limit) in TARGETS.items():
            v = row["values"][column]
            verdicts[column] = "unmeasured" if v is None else (
                "met" if (v < limit if op == "<" else v > limit) else "not met")
        out[row["method"]] = verdicts
    return out


def ssim_crossing(mean: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """The strength at which the method's all-styles mean SSIM falls to the target (linear between strengths)."""
    points = sorted((r["strength"], r["values"]["ssim"]) for r in mean if r["method"] == method
                    and r["values"]["ssim"] is not None)
    if len(points) < 1:
        return {"strength": None, "reason": "SSIM unavailable"}
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if (v0 - SSIM_TARGET) * (v1 - SSIM_TARGET) <= 0 and v0 != v1:
            return {"strength": s0 + (SSIM_TARGET - v0) * (s1 - s0) / (v1 - v0), "reason": None}
    above = all(v > SSIM_TARGET for _, v in points)
    return {"strength": None, "reason": f"SSIM stays {'above' if above else 'below'} {SSIM_TARGET} at every strength "
                                        f"({points[0][0]:g}..{points[-1][0]:g})"}


def _fmt(column: str, value: float | None, why: str | None) -> str:
    if value is None:
        return NO_TRAINING if why == NO_TRAINING else UNAVAILABLE
    if column == "train_seconds":
        return f"{value / 60:.1f} min"
    if column == "peak_memory_mb":
        return f"{value:.0f} MB"
    if column == "file_bytes":
        return f"{value / 1e6:.1f} MB"
    if column == "seconds_per_image":
        return f"{value:.2f}"
    return f"{value:.4g}"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | style | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [_fmt(c, r["values"][c], r["unavailable"].get(c)) for c in COLUMNS]
        lines.append(f"| {r['method']} | {r['style']} | " + " | ".join(cells) + " |")
    return lines


def write_report(folder: Path, cfg: StudyConfig, *, jobs: list[tuple[str, str, float, int, str]],
                 reports: dict[str, dict], stylize: dict[str, Any], costs: dict[str, dict | None],
                 skipped: dict[str, str], stage_seconds: dict[str, float], styled_root: Path,
                 photos: list[Path], loss_logs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Write report.md, report.json, a grid per style, a strength sweep per method and the loss curves into
    `folder`. `loss_logs`: "style/method" -> the trainer's loss log (CSV) of each trained artifact."""
    folder.mkdir(parents=True, exist_ok=True)
    strength = cfg.shown_strength
    rows = collect(cfg, jobs, reports, stylize, costs, skipped)
    mean = mean_rows(cfg, rows)
    verdicts = targets(mean, strength)
    crossings = {m: ssim_crossing(mean, m) for m in cfg.methods}
    total = sum(stage_seconds.values())
    stages = {k: {"seconds": v, "share": v / total if total else None} for k, v in stage_seconds.items()}

    # Markdown: the comparison table at one strength, the targets, the sweep, the costs of time.
    shown = []
    for method in cfg.methods:
        shown += [r for r in rows if r["method"] == method and r["strength"] == strength]
        shown += [r for r in mean if r["method"] == method and r["strength"] == strength]
    md = ["# Stylora study", "",
          f"{len(cfg.styles)} style(s) ({', '.join(n for n, _ in cfg.styles)}), {len(photos)} content photo(s), "
          f"methods {', '.join(cfg.methods)}, strengths {', '.join(f'{s:g}' for s in cfg.strengths)}, "
          f"seed(s) {', '.join(str(s) for s in cfg.seeds)} (metrics averaged over seeds).", "",
          f"## Comparison at strength {strength:g}", ""]
    md += _table(shown)
    by_reason: dict[str, list[str]] = {}
    for r in shown:
        for column, why in r["unavailable"].items():
            name = HEADERS[column].rstrip(" ↑↓")  # "LPIPS" and "LPIPS to style" stay apart
            if why != NO_TRAINING and name not in by_reason.setdefault(why, []):
                by_reason[why].append(name)
    if by_reason:
        md += ["", "Unavailable:", ""] + [f"- {', '.join(cols)}: {why}" for why, cols in by_reason.items()]
    md += ["", "Seconds per image are wall time per photo as `stylora run` sees it (upload, queue, sample, "
               "download) on the servers used; training time, peak memory and file size come from the trainers' "
               "resource records.", "",
           f"## Targets (all-styles mean at strength {strength:g})", "",
           "| method | FID < 60 | SSIM > 0.7 | LPIPS to style < 0.3 | < 5 s per image (T4, 512x512) |",
           "|---|---|---|---|---|"]
    for method, v in verdicts.items():
        md.append(f"| {method} | {v['fid']} | {v['ssim']} | {v['lpips_style']} | {v['seconds_per_image']} |")
    md += ["", "The time target is for a T4 at 512x512; a different GPU or image size measures something else.",
           "", "## Strength sweep (all-styles mean)", "",
           "| method | strength | SSIM | Gram | FID | s / image |", "|---|---|---|---|---|---|"]
    for r in mean:
        v = r["values"]
        md.append(f"| {r['method']} | {r['strength']:g} | " + " | ".join(
            _fmt(c, v[c], r["unavailable"].get(c)) for c in ("ssim", "gram", "fid", "seconds_per_image")) + " |")
    md += ["", "SSIM crosses 0.7 at:", ""]
    for method, c in crossings.items():
        md.append(f"- {method}: " + (f"strength {c['strength']:.2f}" if c["strength"] is not None else c["reason"]))
    if skipped:
        md += ["", "## Skipped", ""] + [f"- {k}: {w}" for k, w in sorted(skipped.items())]
    md += ["", "## Where the time went", "", "| stage | time | share |", "|---|---|---|"]
    for name, s in stages.items():
        share = f"{100 * s['share']:.0f}%" if s["share"] is not None else UNAVAILABLE
        md.append(f"| {name} | {s['seconds']:.1f} s | {share} |")
    md.append(f"| total | {total:.1f} s | |")
    curves = {key: read_loss_log(path) for key, path in (loss_logs or {}).items() if Path(path).is_file()}
    curves = {key: c for key, c in curves.items() if c[0]}
    md += ["", "## Loss curves", ""]
    if curves:
        md += ["Training loss (mean over each logging window) against the optimizer step, a panel per style and a "
               "line per trained method; the trainers' logs are `<artifact>.train_log.csv` beside each file.", "",
               "![loss curves](loss_curves.png)", "",
               "| style | method | steps | first loss | last loss |", "|---|---|---|---|---|"]
        for key, (steps, losses) in curves.items():
            style, method = key.split("/", 1)
            md.append(f"| {style} | {method} | {steps[-1]} | {losses[0]:.4g} | {losses[-1]:.4g} |")
    else:
        md.append("No trained method in this study, or no loss log found: no loss curves.")
    md += ["", "Files: `grid_<style>.png` (content | painting | each method at the table's strength), "
               "`sweep_<method>.png` (SSIM vs Gram loss, one point per strength), `loss_curves.png` (training "
               "loss per style and method), `report.json`.", ""]
    atomic_write_text(folder / "report.md", "\n".join(md))

    report = {"config": cfg.to_dict(), "table_strength": strength, "photos": len(photos), "rows": rows,
              "mean": mean, "targets": {"limits": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
                                        "verdicts": verdicts},
              "ssim_crossing": crossings, "skipped": skipped,
              "loss_curves": {k: {"steps": st, "loss": lo} for k, (st, lo) in curves.items()},
              "stages": stages, "total_seconds": total,
              "unavailable": {m: r.get("unavailable", {}) for m, r in reports.items()}}
    atomic_write_text(folder / "report.json", json.dumps(report, indent=1, allow_nan=False))

    # Pictures: a grid per style, a sweep per method.
    for style, style_folder in cfg.styles:
        _grid(folder / f"grid_{style}.png", cfg, jobs, style, Path(style_folder), styled_root, photos, strength)
    for method in cfg.methods:
        _sweep(folder / f"sweep_{method}.png", method, rows, mean, crossings[method])
    if curves:
        _loss_curves(folder / "loss_curves.png", [n for n, _ in cfg.styles], curves)
    return report


def _loss_curves(path: Path, styles: list[str], curves: dict[str, tuple[list[int], list[float]]]) -> None:
    """A panel per style, a line per trained method: training loss against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(styles), figsize=(4.5 * len(styles), 3.6), squeeze=False)
    for ax, style in zip(axes[0], styles):
        for key, (steps, losses) in curves.items():
            if key.split("/", 1)[0] == style:
                ax.plot(steps, losses, "o-" if len(steps) < 30 else "-", markersize=3, label=key.split("/", 1)[1])
        ax.set_title(style, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _grid(path: Path, cfg: StudyConfig, jobs: list[tuple[str, str, float, int, str]], style: str,
          style_folder: Path, styled_root: Path, photos: list[Path], strength: float, cell: int = 160) -> None:
    """content | painting sample | each method (first seed, the table's strength): a row per content photo."""
    paintings = sorted(p for p in style_folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    columns: list[tuple[str, Path | None]] = []
    for method in cfg.methods:
        key = next((k for (s, m, st, seed, k) in jobs if m == method and st == strength and seed == cfg.seeds[0]
                    and s == (BASE if method == "base" else style)), None)
        columns.append((method, styled_root / key if key else None))
    cells = [[photo, paintings[i % len(paintings)] if paintings else None]
             + [(f / f"{photo.stem}.png") if f is not None else None for _, f in columns]
             for i, photo in enumerate(photos[:cfg.grid_rows])]
    titles = tuple(title[:24] for title in ["content", f"{style} painting"] + [m for m, _ in columns])
    canvas = image_grid(cells, cell, 2 + len(columns), column_titles=titles, missing="not run")
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))


def _sweep(path: Path, method: str, rows: list[dict[str, Any]], mean: list[dict[str, Any]],
           crossing: dict[str, Any]) -> None:
    """Content preservation (SSIM) against style loss (Gram), one point per strength, a line per style and the
    mean; the SSIM target as a horizontal line. Without Gram values the x axis is the strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_gram = any(r["values"]["gram"] is not None for r in rows if r["method"] == method)
    xkey = "gram" if has_gram else None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups = {r["style"]: [] for r in rows if r["method"] == method}
    for r in rows:
        if r["method"] == method:
            groups[r["style"]].append(r)
    groups["all styles (mean)"] = [r for r in mean if r["method"] == method]
    for label, group in groups.items():
        pts = [((r["values"][xkey] if xkey else r["strength"]), r["values"]["ssim"], r["strength"]) for r in group]
        pts = [p for p in pts if p[0] is not None and p[1] is not None]
        if not pts:
            continue
        mean_line = label.startswith("all styles")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if mean_line else ".--", label=label,
                linewidth=2.5 if mean_line else 1, color="black" if mean_line else None)
        if mean_line:
            for x, y, s in pts:
                ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(SSIM_TARGET, color="red", linestyle=":", label=f"SSIM {SSIM_TARGET}")
    title = f"{method}: SSIM crosses {SSIM_TARGET} at " + (
        f"strength {crossing['strength']:.2f}" if crossing["strength"] is not None else "no strength run")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("Gram style loss (lower: closer to the style)" if xkey else "strength (Gram unavailable)")
    ax.set_ylabel("SSIM to the content photo")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
