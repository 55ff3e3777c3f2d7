"""Atomic file writes (a crash or kill leaves either the old file or the new one, never half of one) and image
folder indexing."""

from __future__ import annotations

import csv
import functools
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS, SIDECAR_EXTENSIONS

logger = logging.getLogger(__name__)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file in the target's folder, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 (and writers may recreate the file); use the umask
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_csv_rows(fields: list[str], rows: list[dict], tmp: str) -> None:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def atomic_write_csv(path: str | Path, fields: list[str], rows: list[dict]) -> Path:
    """A CSV with header `fields` and one line per row (keys outside `fields` left out, missing ones empty),
    written atomically."""
    return atomic_write(path, functools.partial(_write_csv_rows, list(fields), list(rows)))


@dataclass(frozen=True)
class Skipped:
    path: str  # the file, relative to the data folder
    reason: str  # why it was not used


def scan_folder(root: Path) -> tuple[list[Path], list[Skipped]]:
    """Candidate image files under `root` (recursive, sorted) and the non-image files found."""
    candidates, skipped = [], []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        ext = p.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            candidates.append(p)
        elif ext not in SIDECAR_EXTENSIONS:
            skipped.append(Skipped(rel, "not an image (extension)"))
    return candidates, skipped


def list_images(folder: Path) -> list[Path]:
    """Image files (by extension) directly in `folder`, sorted; hidden files and subfolders are left out."""
    return [f for f in sorted(folder.iterdir())
            if not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]


def image_files(folder: Path, flag: str) -> list[Path]:
    """Image files anywhere under `folder` (recursive, sorted, hidden ones left out), as the trainers read a style
    folder. `flag` names the option the folder came from, for the error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: not a folder")
    return scan_folder(folder)[0]


def index_by_stem(folder: Path, flag: str) -> dict[str, Path]:
    """Image files directly in `folder`, by stem (subfolders, e.g. other methods' outputs, are not entered).
    `flag` names the option the folder came from, for the error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder}: not a folder")
    index: dict[str, Path] = {}
    for f in list_images(folder):
        if f.stem in index:
            logger.warning("%s: %s and %s share a stem; using the first", folder, index[f.stem].name, f.name)
            continue
        index[f.stem] = f
    return index
