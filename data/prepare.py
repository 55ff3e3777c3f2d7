"""Dataset preparation: WikiArt style folders for training, COCO content sets for evaluation, and the EDA.

WikiArt comes in two common layouts:
- Kaggle (steubk/wikiart): `<root>/<Style_Name>/<artist-name>_<title>.jpg`
- Hugging Face (huggan/wikiart): parquet files with an `image` column ({bytes, path}) and `style`, `artist`,
  `genre` columns, either strings or ClassLabel ids whose names are in the parquet's `huggingface` schema
  metadata or a `dataset_info(s).json` beside the data.
Selection is deterministic (a seeded hash order), near-duplicates are removed by perceptual hash, every kept
image is cropped to the training resolution, and a manifest records where each came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..core.files import atomic_write, atomic_write_csv, atomic_write_text, scan_folder
from ..core.images import ImageLoadError, image_grid, load_image, resize_cover

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareConfig:
    source: str = field(
        metadata={"help": "WikiArt root (Kaggle folders or parquet files), or a COCO val2017 image folder"})
    out: str = field(metadata={"help": "folder to write the prepared images and manifest into"})
    count: int = field(default=100, metadata={"help": "images to keep"})
    style: str | None = field(
        default=None,
        metadata={"help": "WikiArt style to select, e.g. \"Impressionism\" (case, spaces, '_' and '-' ignored)"})
    artist: str | None = field(
        default=None, metadata={"help": "optional WikiArt artist filter, e.g. \"claude-monet\" (same matching)"})
    resolution: int = field(default=512, metadata={"help": "side of the square centre crops written"})
    min_side: int = field(
        default=256, metadata={"help": "smaller source images are skipped (upscaling smears strokes)"})
    dedupe_distance: int = field(
        default=6, metadata={"help": "two images whose 64-bit dHashes differ in <= this many bits are duplicates"})
    seed: int = field(default=0, metadata={"help": "selection order; same seed, same selection"})
    quality: int = field(default=95, metadata={"help": "JPEG quality of the written images"})

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")
        if self.resolution < 64:
            raise ValueError(f"resolution must be >= 64, got {self.resolution}")
        if not 0 <= self.dedupe_distance <= 64:
            raise ValueError(f"dedupe_distance must be in 0..64, got {self.dedupe_distance}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100 (JPEG quality), got {self.quality}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclass
class Candidate:
    """One source image: where it is and its labels."""

    source: str  # file path, or "<parquet file>#<row>"
    style: str = ""
    artist: str = ""
    genre: str = ""
    title: str = ""
    data: bytes | None = field(default=None, repr=False)  # encoded image bytes (parquet rows)


def normalise_label(text: str) -> str:
    """'Abstract_Expressionism', 'abstract expressionism', 'Abstract-Expressionism' -> 'abstractexpressionism'."""
    return re.sub(r"[\s_\-]+", "", text.strip().lower())


def dhash(img: Image.Image) -> int:
    """64-bit difference hash (Krawetz): robust to rescaling and recompression, so near-duplicates collide."""
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _order_key(seed: int, candidate: Candidate, root: Path) -> str:
    """Seeded pseudo-random order over the candidates' identities relative to the source root, so moving the
    dataset folder does not change which images are selected."""
    path, _, row = candidate.source.partition("#")
    try:
        ident = Path(path).relative_to(root).as_posix()
    except ValueError:
        ident = Path(path).name
    return hashlib.sha256(f"{seed}:{ident}#{row}".encode()).hexdigest()


# --- WikiArt layouts ---

def kaggle_candidates(root: Path) -> Iterator[Candidate]:
    """`<root>/<Style>/<artist>_<title>.<ext>` (the Kaggle WikiArt layout); also accepts `<root>/wikiart/...`."""
    files, _ = scan_folder(root)
    for f in files:
        rel = f.relative_to(root).parts
        if len(rel) < 2:
            continue
        artist, _, title = f.stem.partition("_")
        yield Candidate(str(f), style=rel[-2], artist=artist, title=title or f.stem)


def _parquet_label_names(pf, root: Path) -> dict[str, list[str]]:
    """ClassLabel names per column from the parquet's schema metadata or a dataset_info json nearby."""
    names: dict[str, list[str]] = {}
    meta = pf.schema_arrow.metadata or {}
    if b"huggingface" in meta:
        names.update(_class_label_names(json.loads(meta[b"huggingface"]).get("info", {}).get("features", {})))
    for folder in (root, root.parent):
        for fname in ("dataset_info.json", "dataset_infos.json"):
            if not names and (folder / fname).is_file():
                info = json.loads((folder / fname).read_text(encoding="utf-8"))
                info = next(iter(info.values())) if fname == "dataset_infos.json" and info else info
                names.update(_class_label_names(info.get("features", {})))
    return names


def _class_label_names(features: dict[str, Any] | None) -> dict[str, list[str]]:
    """{column: names} of the ClassLabel features in a datasets `features` mapping."""
    return {col: list(feat["names"]) for col, feat in (features or {}).items()
            if isinstance(feat, dict) and feat.get("names")}


def _label(value: Any, names: list[str] | None) -> str:
    """A label cell: a string as it is, a ClassLabel id through its names."""
    if value is None:
        return ""
    if isinstance(value, int) and names:
        return names[value] if 0 <= value < len(names) else str(value)
    return str(value)


def parquet_candidates(root: Path) -> Iterator[Candidate]:
    """Rows of the Hugging Face WikiArt parquet files under `root` (or `root` itself if it is one file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise RuntimeError("reading the Hugging Face WikiArt parquet layout needs pyarrow: pip install pyarrow") from e
    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    for path in files:
        pf = pq.ParquetFile(str(path))
        names = _parquet_label_names(pf, path.parent if path.is_file() else root)
        missing = {"image", "style"} - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"--source {path}: parquet has no {sorted(missing)} column(s); "
                             f"columns: {pf.schema_arrow.names}")

        row = 0
        for batch in pf.iter_batches(batch_size=64, columns=[c for c in ("image", "style", "artist", "genre")
                                                              if c in pf.schema_arrow.names]):
            for rec in batch.to_pylist():
                image = rec.get("image") or {}
                data = image.get("bytes") if isinstance(image, dict) else image
                yield Candidate(f"{path}#{row}", style=_label(rec.get("style"), names.get("style")),
                                artist=_label(rec.get("artist"), names.get("artist")),
                                genre=_label(rec.get("genre"), names.get("genre")),
                                title=Path(image.get("path") or f"row{row}").stem if isinstance(image, dict) else "",
                                data=data)
                row += 1


def wikiart_candidates(root: Path) -> Iterator[Candidate]:
    if not root.exists():
        raise FileNotFoundError(f"--source {root}: no such folder or file")
    if root.suffix == ".parquet" or (root.is_dir() and next(root.rglob("*.parquet"), None) is not None):
        return parquet_candidates(root)
    return kaggle_candidates(root)


def wikiart_styles(root: Path) -> dict[str, int]:
    """Style label -> number of images, for error messages and stats."""
    counts: dict[str, int] = {}
    for c in wikiart_candidates(root):
        counts[c.style] = counts.get(c.style, 0) + 1
    return dict(sorted(counts.items()))


# --- selection ---

def prepare(cfg: PrepareConfig, kind: str, progress: bool = True) -> dict[str, Any]:
    """Select, validate, de-duplicate and crop images from cfg.source into cfg.out; write manifest.json/.csv.

    kind: "wikiart" (filtered by cfg.style / cfg.artist) or "coco" (any image under cfg.source).
    Returns the manifest.
    """
    from tqdm.auto import tqdm

    source, out = Path(cfg.source), Path(cfg.out)
    # 1. Enumerate and filter candidates; order them deterministically by a seeded hash.
    if kind == "wikiart":
        if not cfg.style:
            raise ValueError("--style is required for WikiArt (e.g. --style Impressionism)")
        want_style, want_artist = normalise_label(cfg.style), normalise_label(cfg.artist or "")
        candidates = [c for c in wikiart_candidates(source) if normalise_label(c.style) == want_style
                      and (not want_artist or want_artist in normalise_label(c.artist))]
        if not candidates:
            found = ", ".join(f"{s} ({n})" for s, n in wikiart_styles(source).items()) or "none"
            asked = f"--style {cfg.style!r}" + (f" --artist {cfg.artist!r}" if cfg.artist else "")
            raise ValueError(f"{asked}: no images in {source}; styles found: {found}")
    elif kind == "coco":
        if not source.is_dir():
            raise FileNotFoundError(f"--source {source}: not a folder of COCO images (e.g. coco/val2017)")
        files, _ = scan_folder(source)
        candidates = [Candidate(str(f), title=f.stem) for f in files]
        if not candidates:
            raise ValueError(f"--source {source}: no images found")
    else:
        raise ValueError(f"kind must be 'wikiart' or 'coco', got {kind!r}")
    root = source if source.is_dir() else source.parent
    candidates.sort(key=lambda c: _order_key(cfg.seed, c, root))

    # 2. Walk the order: validate, skip near-duplicates of kept images, crop and write, until `count` are kept.
    out.mkdir(parents=True, exist_ok=True)
    kept: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    hashes: list[tuple[int, str]] = []
    bar = tqdm(total=cfg.count, desc=f"Preparing {kind}", unit="img", disable=not progress)
    for c in candidates:
        if len(kept) >= cfg.count:
            break
        try:
            img = load_image(c.data if c.data is not None else c.source, name=c.source)
        except ImageLoadError as e:
            skipped.append({"source": c.source, "reason": e.reason})
            continue
        if min(img.size) < cfg.min_side:
            skipped.append({"source": c.source, "reason": f"too small ({img.size[0]}x{img.size[1]})"})
            continue
        h = dhash(img)
        twin = next((src for other, src in hashes if bin(h ^ other).count("1") <= cfg.dedupe_distance), None)
        if twin is not None:
            skipped.append({"source": c.source, "reason": f"near-duplicate of {twin}"})
            continue
        hashes.append((h, c.source))
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(p for p in (c.artist, c.title) if p))[:80].strip("-._")
        name = f"{len(kept):04d}_{stem or 'image'}.jpg"
        crop = resize_cover(img, cfg.resolution, cfg.resolution)
        atomic_write(out / name, lambda tmp, im=crop: im.save(tmp, format="JPEG", quality=cfg.quality))
        kept.append({"file": name, "source": c.source, "style": c.style, "artist": c.artist, "genre": c.genre,
                     "title": c.title, "width": img.size[0], "height": img.size[1], "dhash": f"{h:016x}"})
        bar.update(1)
    bar.close()
    if not kept:
        raise ValueError(f"--source {source}: none of {len(candidates)} candidate image(s) was usable "
                         f"({'; '.join(s['reason'] for s in skipped[:3])})")
    if len(kept) < cfg.count:
        logger.warning("only %d usable images for --count %d", len(kept), cfg.count)

    # 3. The manifest: every kept image with its source and labels, every skipped one with its reason.
    manifest = {"kind": kind, "config": asdict(cfg), "count": len(kept), "candidates": len(candidates),
                "images": kept, "skipped": skipped}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    atomic_write_csv(out / "manifest.csv", list(kept[0]), kept)
    return manifest


# --- statistics (what a style set holds before training on it) ---

def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _spread(values: np.ndarray) -> dict[str, float]:
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}


def dataset_stats(folders: list[str | Path], out: str | Path, grid_per_folder: int = 8) -> dict[str, Any]:
    """Counts per style, size and aspect histograms and a sample grid of image folders, as PNGs and summary.md.

    A folder written by `prepare` is described by its manifest (original sizes, labels); any other folder by
    its files, with the folder name as the style; a file that is not a usable image is not counted and is listed
    in the summary's `skipped` ({"file", "reason"}).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    samples: dict[str, list[Path]] = {}
    skipped: list[dict[str, str]] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder")
        manifest = folder / "manifest.json"
        if manifest.is_file():
            images = json.loads(manifest.read_text(encoding="utf-8"))["images"]
            for r in images:
                records.append({"folder": folder.name, "style": r.get("style") or folder.name,
                                "artist": r.get("artist", ""), "width": r["width"], "height": r["height"]})
            samples[folder.name] = [folder / r["file"] for r in images]
        else:
            # Each file decoded through the image guard, as training reads it: a truncated file, a non-image or a
            # decompression bomb is named with its reason, not counted (and never a crash).
            files, not_images = scan_folder(folder)
            skipped += [{"file": str(folder / s.path), "reason": s.reason} for s in not_images]
            usable = []
            for f in files:
                try:
                    w, h = load_image(f).size
                except ImageLoadError as e:
                    skipped.append({"file": str(f), "reason": e.reason})
                    continue
                usable.append(f)
                records.append({"folder": folder.name, "style": folder.name, "artist": "", "width": w, "height": h})
            samples[folder.name] = usable
    for s in skipped:
        logger.warning("%s: skipped: %s", s["file"], s["reason"])
    if not records:
        raise ValueError(f"no usable images in {[str(f) for f in folders]} ({len(skipped)} file(s) skipped)")

    per_style: dict[str, int] = {}
    for r in records:
        per_style[r["style"]] = per_style.get(r["style"], 0) + 1
    widths = np.array([r["width"] for r in records])
    heights = np.array([r["height"] for r in records])
    aspects = widths / heights

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(per_style) + 2), 3.6))
    ax.bar(list(per_style), list(per_style.values()), color="#4c72b0")
    ax.set_ylabel("images")
    ax.set_title("Images per style")
    ax.tick_params(axis="x", rotation=45)
    _save_figure(fig, out / "style_counts.png")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.hist([widths, heights], bins=20, label=["width", "height"])
    ax.set_xlabel("pixels")
    ax.legend()
    ax.set_title("Source image sizes")
    _save_figure(fig, out / "size_hist.png")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.hist(aspects, bins=20, color="#dd8452")
    ax.set_xlabel("width / height")
    ax.set_title("Aspect ratios")
    _save_figure(fig, out / "aspect_hist.png")

    rows = [(name, files[:grid_per_folder]) for name, files in samples.items()]
    canvas = image_grid([files for _, files in rows], 128, grid_per_folder,
                        row_titles=tuple(name for name, _ in rows), unreadable=None)
    atomic_write(out / "sample_grid.png", lambda tmp: canvas.save(tmp, format="PNG"))

    summary = {"images": len(records), "per_style": per_style, "width": _spread(widths), "height": _spread(heights),
               "aspect": _spread(aspects), "skipped": skipped}
    lines = ["# Dataset statistics", "", f"{len(records)} images in {len(samples)} folder(s).", "",
             "| style | images |", "|---|---|", *[f"| {s} | {n} |" for s, n in per_style.items()], "",
             "| | min | median | max |", "|---|---|---|---|",
             *[f"| {k} | {v['min']:.4g} | {v['median']:.4g} | {v['max']:.4g} |"
               for k, v in summary.items() if isinstance(v, dict) and "min" in v],
             "", "Plots: `style_counts.png`, `size_hist.png`, `aspect_hist.png`; samples: `sample_grid.png`.", "",
             *([f"Skipped (not counted): {len(skipped)} file(s).", "", "| file | reason |", "|---|---|",
                *[f"| {s['file']} | {s['reason']} |" for s in skipped], ""] if skipped else [])]
    atomic_write_text(out / "summary.md", "\n".join(lines))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary

