"""What a study reads, checked before its first step: the folders and their images, the metric names, the server
URLs and what each server can run. Free of torch, so that `stylora study` refuses a mistyped path at once."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..core.files import scan_folder
from ..core.images import ImageLoadError, load_image
from ..eval.config import EvalConfig
from ..workflows.client import API_DIR, Server, ServerError, server_url
from .config import IN_PROCESS, StudyConfig

logger = logging.getLogger(__name__)

# The bundled workflow each method samples with on a server (`image` is optional: skipped where its node is missing).
WORKFLOWS = {"base": "dreambooth", "lora": "style_transfer", "dreambooth": "dreambooth",
             "dreambooth-lora": "style_transfer", "textual-inversion": "textual_inversion",
             "image": "style_from_image"}
OPTIONAL_METHODS = ("image",)


def check_inputs(cfg: StudyConfig) -> None:
    """Refuse, naming the setting, what would otherwise fail hours into a study: a content or style folder that is
    missing or holds no images, an unknown metric or device, a malformed server URL. Reads no image."""
    # 1. The folders: content photos directly in `content`; paintings anywhere under each style folder, as the
    #    trainers read them.
    content = Path(cfg.content)
    if not content.is_dir():
        raise FileNotFoundError(f"content: not a folder: {content} (a folder of photos, e.g. `stylora prepare coco`)")
    for name, folder in cfg.styles:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"styles.{name}: not a folder: {folder} (a folder of paintings, searched "
                                    "recursively, e.g. `stylora prepare wikiart`)")
        if not scan_folder(Path(folder))[0]:
            raise ValueError(f"styles.{name}: no images in {folder} (searched recursively)")
    # 2. The metric names, device and grid rows, as the scoring step will read them.
    EvalConfig(content=str(content), styled=(str(content),), out=cfg.out, style=cfg.styles[0][1],
               metrics=cfg.metrics, device=cfg.eval_device, grid_rows=cfg.grid_rows)
    # 3. The server URLs (only methods stylised on a server need one).
    if any(m not in IN_PROCESS for m in cfg.methods):
        for url in cfg.server:
            server_url(url)


def usable_servers(cfg: StudyConfig) -> tuple[str, ...]:
    """The servers of `cfg.server` that can stylise the study: reachable, with every node its workflows need.
    Each other one is left out with a warning; none left is an error (before any training). A server lacking only
    the optional `image` method's node stays; that method is then skipped (see `missing_node`)."""
    needed = {WORKFLOWS[m] for m in cfg.methods if m in WORKFLOWS and m not in OPTIONAL_METHODS}
    nodes = set()
    for workflow in sorted(needed):
        graph = json.loads((API_DIR / f"{workflow}.json").read_text(encoding="utf-8"))
        nodes |= {n["class_type"] for n in graph.values()}
    usable, why = [], []
    for url in cfg.server:
        try:
            info = Server(url).get_json("/object_info")
        except ServerError as e:
            why.append(str(e))
            logger.warning("server %s: left out: %s", url, e)
            continue
        missing = sorted(nodes - set(info))
        if missing:
            reason = (f"server {url}: node(s) {', '.join(missing)} not installed (the Stylora pack in "
                      "ComfyUI/custom_nodes, pip install -r requirements.txt, restart ComfyUI)")
            why.append(reason)
            logger.warning("server %s: left out: %s", url, reason)
            continue
        usable.append(url)
    if not usable:
        raise ServerError(f"server: none of {list(cfg.server)} can stylise the study: {'; '.join(why)}")
    return tuple(usable)


def missing_node(servers: tuple[str, ...], node: str) -> list[str]:
    """The servers that lack `node` (or cannot be reached)."""
    missing = []
    for url in servers:
        try:
            if node not in Server(url).get_json("/object_info"):
                missing.append(url)
        except ServerError:
            missing.append(url)
    return missing


def paintings(folder: Path, name: str) -> list[Path]:
    """The usable paintings under `folder` (recursive, sorted), as training reads them: a file that cannot be read
    as an image (truncated, corrupt, over the pixel limit) is skipped with a warning. Raises ValueError when none
    is usable."""
    files, usable = scan_folder(folder)[0], []
    for f in files:
        try:
            load_image(f).close()
        except ImageLoadError as e:
            logger.warning("styles.%s: %s skipped: %s", name, f, e.reason)
            continue
        usable.append(f)
    if not usable:
        raise ValueError(f"styles.{name}: no readable image in {folder} (searched recursively)")
    return usable


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 of the names and bytes of every file under `folder` (recursive; hidden files left out): the same
    paintings and captions give the same value wherever the folder is, another painting under the same name
    does not."""
    h = hashlib.sha256()
    root = Path(folder)
    for f in sorted(root.rglob("*")) if root.is_dir() else []:
        rel = f.relative_to(root)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(rel.as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
