"""Headless runs of the bundled API workflows against a ComfyUI server (`stylora run`).

Only the standard library talks to the server: POST /upload/image, POST /prompt, GET /history/<id> (polled;
GET /queue says whether the prompt waits or runs), GET /view for the outputs. Inputs are found by node title
(`_meta.title`); workflows/roles.py lists the titles and what each node does for the run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import mimetypes
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, atomic_write_text
from ..core.images import IMAGE_EXTENSIONS, ImageLoadError, load_image
from ..core.strength_rule import style_schedule
from .roles import (
    CHECKPOINT,
    COLOURS,
    CONTENT,
    CONTROLNET,
    SAMPLER,
    STRENGTH,
    STYLE,
    STYLE_CHECKPOINT,
    STYLE_IMAGE,
    TRAIN,
    WorkflowError,
    find,
    node_titled,
    require,
)

logger = logging.getLogger(__name__)

API_DIR = Path(__file__).resolve().parent / "api"
UPLOAD_SUBFOLDER = "stylora"  # uploads land in ComfyUI/input/stylora/


@dataclass(frozen=True)
class RunConfig:
    content: str = field(metadata={"help": "a photo, or a folder of photos (a batch; rerun to resume)"})
    out: str = field(
        metadata={"help": "output image (single photo) or folder (batch, or when the workflow saves several images)"})
    server: tuple[str, ...] = field(
        default=("http://127.0.0.1:8188",),
        metadata={"help": "ComfyUI server URL(s); photos are spread over them"})
    workflow: str = field(
        default="style_transfer", metadata={"help": "a bundled workflow name (see --list) or an API-format .json file"})
    style: tuple[str, ...] = field(
        default=(),
        metadata={"help": "style file(s) on the server, NAME or NAME:WEIGHT (up to 3); dreambooth: checkpoint"})
    strength: float | None = field(default=None, metadata={"help": "style strength 0..1 (default: the workflow's)"})
    mask: str | None = field(default=None, metadata={"help": "black/white mask image, white = styled (masked_style)"})
    style_image: str | None = field(default=None, metadata={"help": "style image for the Gram loss (style_metrics)"})
    checkpoint: str | None = field(
        default=None, metadata={"help": "SD1.5 checkpoint on the server (default: the workflow's)"})
    seed: int | None = field(default=None, metadata={"help": "sampler seed (default: the workflow's)"})
    controlnet: str | None = field(
        default=None, metadata={"help": "ControlNet file on the server, models/controlnet (layout_guard; default: "
                                        "the workflow's, control_v11p_sd15_canny_fp16.safetensors)"})
    keep_colours: float | None = field(
        default=None,
        metadata={"help": "0..1: how much of the photo's colours to keep under the style's luminance (0: the "
                          "style's colours, 1: the photo's; default: the workflow's)"})
    set: tuple[str, ...] = field(
        default=(),
        metadata={"help": "more overrides, \"Node title.input=value\" (value parsed as JSON when it can be)"})
    timeout: float = field(default=3600.0, metadata={"help": "seconds to wait for one image"})
    overwrite: bool = field(
        default=False, metadata={"help": "redo photos whose output exists (default: skip them, so a rerun resumes)"})

    def __post_init__(self) -> None:
        servers = (self.server,) if isinstance(self.server, str) else tuple(self.server)
        if not servers or not all(isinstance(s, str) and s for s in servers):
            raise ValueError(f"server: give at least one ComfyUI server URL, got {self.server!r}")
        object.__setattr__(self, "server", servers)
        if self.strength is not None and not (math.isfinite(self.strength) and 0 <= self.strength <= 1):
            raise ValueError(f"strength must be in 0..1, got {self.strength!r}")
        if self.keep_colours is not None and not (math.isfinite(self.keep_colours) and 0 <= self.keep_colours <= 1):
            raise ValueError(f"keep_colours must be in 0..1, got {self.keep_colours!r}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {self.timeout!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for url in servers:
            server_url(url)


class ServerError(RuntimeError):
    """The ComfyUI server is unreachable, lacks a node or a file, or failed to run the prompt."""


# --- Talking to the server ------------------------------------------------------------------------------------

def server_url(url: str) -> str:
    """`url` as http(s)://host[:port][/path] (http:// added when no scheme is given); ValueError naming --server
    for anything urllib could not open (a bad port, spaces, another scheme, no host)."""
    full = url if "://" in url else "http://" + url
    try:
        parts = urllib.parse.urlsplit(full)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as e:
        raise ValueError(f"--server {url!r}: not a valid URL ({e}); e.g. http://127.0.0.1:8188") from e
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in full):
        raise ValueError(f"--server {url!r}: not an http(s) URL with a host; e.g. http://127.0.0.1:8188")
    return full.rstrip("/")


class Server:
    def __init__(self, url: str, timeout: float = 60.0):
        self.url = server_url(url)
        self.timeout = timeout

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", "replace")
            raise ServerError(f"{self.url}{path}: HTTP {e.code}: {_error_text(body)}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:  # http.client.InvalidURL is a ValueError
            reason = getattr(e, "reason", e)
            raise ServerError(f"server {self.url}: cannot reach it ({reason}); is ComfyUI running there? "
                              "(python main.py --listen; or pass --server URL)") from e

    def get_json(self, path: str) -> Any:
        return json.loads(self.request(path))

    def post_json(self, path: str, payload: dict) -> Any:
        return json.loads(self.request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"}))

    def upload(self, name: str, data: bytes) -> str:
        """Upload an image into ComfyUI's input folder; returns the name LoadImage takes ("stylora/<name>")."""
        boundary = uuid.uuid4().hex
        parts = []
        for key, value in (("type", "input"), ("subfolder", UPLOAD_SUBFOLDER), ("overwrite", "true")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: {mime}\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        reply = json.loads(self.request("/upload/image", b"".join(parts),
                                        {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        return f"{reply['subfolder']}/{reply['name']}" if reply.get("subfolder") else reply["name"]


def _error_text(body: str) -> str:
    """ComfyUI's /prompt error JSON as one readable line per problem."""
    try:
        err = json.loads(body)
    except json.JSONDecodeError:
        return body[:500]
    lines = []
    if isinstance(err.get("error"), dict):
        lines.append(err["error"].get("message", "") + (": " + err["error"].get("details", "")
                                                         if err["error"].get("details") else ""))
    for node_id, ne in (err.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(x for x in lines if x) or body[:500]


# --- Workflows ----------------------------------------------------------------------------------------------

def bundled_workflows() -> list[str]:
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def load_workflow(name: str) -> dict[str, dict]:
    """A bundled workflow by name, or an API-format JSON file by path."""
    path = Path(name)
    if path.suffix != ".json":
        path = API_DIR / f"{name}.json"
        if not path.is_file():
            raise ValueError(f"workflow: no bundled workflow {name!r}; choose from {bundled_workflows()} or give "
                             "the path of an API-format .json")
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"workflow {path}: not a readable JSON file ({e})") from e
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise ValueError(f"workflow {path}: not in API format (export with 'Save (API)'); UI-format files have "
                         "'nodes' and 'links'")
    return graph


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, lists), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def substitute(graph: dict, cfg: RunConfig, content_name: str, style_image_name: str | None) -> dict:
    """The workflow with this run's inputs filled in (a copy). Raises ValueError naming what does not fit."""
    g = json.loads(json.dumps(graph))
    require(g, CONTENT, cfg.workflow)["inputs"]["image"] = content_name
    style = find(g, STYLE)
    if cfg.style:
        if style is not None and style["class_type"] == "LoadStyleLoRA":
            if len(cfg.style) > 3:
                raise ValueError(f"style: at most 3 styles per run, got {len(cfg.style)}")
            for i, spec in enumerate(cfg.style):
                name, _, weight = spec.partition(":")
                suffix = "" if i == 0 else f"_{i + 1}"
                style["inputs"]["style" + suffix] = name
                if i:
                    style["inputs"]["weight" + suffix] = float(weight) if weight else 1.0
                elif weight:
                    style["inputs"]["strength"] = float(weight)
        elif find(g, STYLE_CHECKPOINT) is not None:
            if len(cfg.style) != 1:
                raise ValueError(f"style: workflow {cfg.workflow} takes one checkpoint, got {list(cfg.style)}")
            find(g, STYLE_CHECKPOINT)["inputs"]["ckpt_name"] = cfg.style[0]
        else:
            raise WorkflowError(f"style: workflow {cfg.workflow!r} has no node titled {STYLE.title!r} (role: "
                                f"{STYLE.purpose}) or {STYLE_CHECKPOINT.title!r} (role: {STYLE_CHECKPOINT.purpose})")
    if cfg.strength is not None:
        strength = find(g, STRENGTH)
        if strength is not None:
            style_schedule(cfg.strength)  # validates 0..1
            strength["inputs"]["strength"] = cfg.strength
        else:  # no StyleStrength node (DreamBooth): the same mapping onto the sampler's denoise
            require(g, SAMPLER, cfg.workflow)["inputs"]["denoise"] = style_schedule(cfg.strength)[1]
    if cfg.seed is not None:
        require(g, SAMPLER, cfg.workflow)["inputs"]["seed"] = cfg.seed
    if cfg.controlnet is not None:
        require(g, CONTROLNET, cfg.workflow)["inputs"]["control_net_name"] = cfg.controlnet
    if cfg.keep_colours is not None:
        require(g, COLOURS, cfg.workflow)["inputs"]["amount"] = cfg.keep_colours
    if cfg.checkpoint is not None:
        require(g, CHECKPOINT, cfg.workflow)["inputs"]["ckpt_name"] = cfg.checkpoint
        if find(g, TRAIN) is not None:  # a style trained in the graph is trained on the checkpoint it samples with
            find(g, TRAIN)["inputs"]["ckpt_name"] = cfg.checkpoint
    if style_image_name is not None:
        require(g, STYLE_IMAGE, cfg.workflow)["inputs"]["image"] = style_image_name
    for item in cfg.set:
        target, eq, value = item.partition("=")
        title, dot, field = target.rpartition(".")
        node = node_titled(g, title) if dot and eq else None
        if node is None:
            raise ValueError(f"set: {item!r} must be 'Node title.input=value' with a title in the workflow "
                             f"({sorted(n.get('_meta', {}).get('title', '') for n in g.values())})")
        node["inputs"][field] = parse_value(value)
    return g


def check_against_server(graph: dict, object_info: dict, workflow: str) -> None:
    """Every node installed, every file name (checkpoints, styles) present on the server."""
    missing = sorted({n["class_type"] for n in graph.values()} - set(object_info))
    if missing:
        # heavy: the nodes package imports torch; only this error message needs the pack's node names
        from ..nodes import NODE_CLASS_MAPPINGS

        ours = [m for m in missing if m in NODE_CLASS_MAPPINGS]
        hint = (" (the Stylora pack: clone it into ComfyUI/custom_nodes, pip install -r requirements.txt, restart"
                " ComfyUI, and check its log for IMPORT FAILED)") if ours else ""
        raise ServerError(f"workflow {workflow}: node(s) {', '.join(missing)} not installed on the server{hint}")
    for node_id, node in graph.items():
        spec = object_info[node["class_type"]]["input"]
        for name, value in node["inputs"].items():
            options = (spec.get("required", {}).get(name) or spec.get("optional", {}).get(name) or [None])[0]
            if name in ("ckpt_name", "style", "style_2", "style_3", "control_net_name") and \
                    isinstance(options, list) and value not in options:
                what = {"ckpt_name": "checkpoint", "control_net_name": "ControlNet"}.get(name, "style")
                shown = ", ".join(o for o in options if o != "None")[:600] or "none"
                folder = {"ckpt_name": "models/checkpoints", "control_net_name": "models/controlnet"}.get(
                    name, "models/styles or models/loras")
                raise ServerError(f"{what} {value!r} is not on the server (node {node_id}, "
                                  f"{node['_meta'].get('title', node['class_type'])}); put it in {folder} "
                                  f"and refresh; available: {shown}")


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def content_upload(path: Path, mask_path: str | None) -> tuple[str, bytes]:
    """The photo as a clean PNG (EXIF-rotated, RGB), with the mask as alpha 0 where the style goes: the way
    ComfyUI's mask editor saves a painted mask, so LoadImage's MASK output carries it."""
    from PIL import Image, ImageOps

    img = load_image(path)
    if mask_path is not None:
        mask = ImageOps.exif_transpose(Image.open(mask_path)).convert("L")
        if mask.size != img.size:
            logger.warning("mask %s is %dx%d, the photo %dx%d: mask resized", mask_path, *mask.size, *img.size)
            mask = mask.resize(img.size, Image.Resampling.BILINEAR)
        img = img.convert("RGBA")
        img.putalpha(ImageOps.invert(mask))
    return f"{path.stem}.png", _png_bytes(img)


# --- The run --------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    done: list[tuple[str, list[str], float]] = field(metadata={"help": "(photo, outputs written, seconds)"})
    skipped: list[str] = field(metadata={"help": "photos whose output existed (resumed batch)"})
    failed: list[tuple[str, str]] = field(metadata={"help": "(photo, why)"})


def run_workflow(cfg: RunConfig, say: Callable[[str], None] = logger.info, poll: float = 0.5) -> RunResult:
    """Run a bundled (or given) API workflow on a ComfyUI server for one photo or a folder of photos."""
    # 1. The workflow and the inputs it needs.
    graph = load_workflow(cfg.workflow)
    masked = any(n["class_type"] == "MaskedStyleApply" for n in graph.values())
    if masked and cfg.mask is None:
        raise ValueError(f"mask: workflow {cfg.workflow} styles only a masked region; pass --mask IMAGE "
                         "(white = styled)")
    if cfg.mask is not None and not masked:
        raise ValueError(f"mask: workflow {cfg.workflow} has no MaskedStyleApply node; use --workflow masked_style")
    if cfg.mask is not None and not Path(cfg.mask).is_file():
        raise FileNotFoundError(f"mask: no such file {cfg.mask}")
    if find(graph, STYLE_IMAGE) is not None and cfg.style_image is None:
        raise ValueError(f"style_image: workflow {cfg.workflow} compares with a style image; pass --style-image")
    content = Path(cfg.content)
    if content.is_dir():
        photos = sorted(p for p in content.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                        and not p.name.startswith("."))
        if not photos:
            raise ValueError(f"content: no images in folder {content}")
        out_dir = Path(cfg.out)
        stems = [p.stem for p in photos]  # cat.jpg and cat.png must not share cat.png
        targets = {p: out_dir / (f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix[1:]}.png")
                   for p in photos}
    elif content.is_file():
        photos = [content]
        out = Path(cfg.out)
        targets = {content: out / f"{content.stem}.png" if out.is_dir() or not out.suffix else out}
    else:
        raise FileNotFoundError(f"content: no such file or folder {content}")
    # 2. The servers: reachable, with every node and every named file. With several, one that cannot be
    #    reached is left out (its photos go to the others); one server that cannot be reached is an error.
    placeholder = "placeholder.png" if cfg.style_image else None
    checked = substitute(graph, cfg, placeholder, placeholder)
    servers: list[Server] = []
    style_image_names: dict[str, str | None] = {}
    for url in cfg.server:
        server = Server(url)
        try:
            check_against_server(checked, server.get_json("/object_info"), cfg.workflow)
            style_image_names[server.url] = (server.upload(*content_upload(Path(cfg.style_image), None))
                                             if cfg.style_image is not None else None)
        except ServerError as e:
            if len(cfg.server) == 1 or not _unreachable(e):
                raise
            say(f"{server.url}: left out ({e})")
            continue
        servers.append(server)
    if not servers:
        raise ServerError(f"none of the servers {list(cfg.server)} can be reached")

    # 3. Each photo: upload, queue, wait, download, on whichever server is free (a work queue, one worker
    #    thread per server). A failing photo is reported and the others still run; a server that drops out
    #    puts its photo back for the others. Seeds come from the config, so the split does not change a result.
    result = RunResult([], [], [])
    todo: queue.Queue[tuple[int, Path]] = queue.Queue()
    for i, photo in enumerate(photos, 1):
        target = targets[photo]
        if target.exists() and not cfg.overwrite:
            result.skipped.append(str(photo))
            say(f"[{i}/{len(photos)}] {photo.name}: {target} exists, skipped (--overwrite redoes it)")
        else:
            todo.put((i, photo))
    lock = threading.Lock()
    lost: list[tuple[Server, ServerError]] = []

    def work(server: Server) -> None:
        where = f" on {server.url}" if len(cfg.server) > 1 else ""
        while True:
            try:
                i, photo = todo.get_nowait()
            except queue.Empty:
                return
            tag = f"[{i}/{len(photos)}] {photo.name}"
            try:
                name = server.upload(*content_upload(photo, cfg.mask))
                prompt = substitute(graph, cfg, name, style_image_names[server.url])
                start = time.monotonic()
                reply = server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
                entry = _wait(server, reply["prompt_id"], cfg.timeout, poll, lambda s, t=tag: say(f"{t}: {s}{where}"))
                written = _download(server, prompt, entry, targets[photo])
                seconds = time.monotonic() - start
                with lock:
                    result.done.append((str(photo), [str(w) for w in written], seconds))
                say(f"{tag}: wrote {', '.join(str(w) for w in written)} ({seconds:.1f} s){where}")
            except (ImageLoadError, ServerError, OSError) as e:
                if isinstance(e, ServerError) and _unreachable(e):
                    todo.put((i, photo))  # the server went away: another one takes the photo
                    with lock:
                        lost.append((server, e))
                    say(f"{tag}: {server.url} dropped out ({e})")
                    return
                with lock:
                    result.failed.append((str(photo), str(e)))
                say(f"{tag}: FAILED: {e}")

    alive = servers
    while not todo.empty() and alive:
        threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in alive]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = [s for s in alive if s not in {gone for gone, _ in lost}]
    if not todo.empty():
        raise lost[-1][1]  # every server went away: stop, the finished outputs are kept
    order = {str(p): k for k, p in enumerate(photos)}
    result.done.sort(key=lambda d: order[d[0]])
    result.failed.sort(key=lambda f: order[f[0]])
    return result


def _unreachable(e: ServerError) -> bool:
    return "cannot reach" in str(e)


def _wait(server: Server, prompt_id: str, timeout: float, poll: float, say: Callable[[str], None]) -> dict:
    """Poll /history until the prompt finished; report queued/running changes. Returns its history entry."""
    start, last = time.monotonic(), ""
    while time.monotonic() - start < timeout:
        history = server.get_json(f"/history/{prompt_id}")
        if prompt_id in history:
            entry = history[prompt_id]
            status = entry.get("status", {})
            if status.get("status_str") == "error":
                for kind, msg in status.get("messages", []):
                    if kind == "execution_error":
                        raise ServerError(f"node {msg.get('node_id')} ({msg.get('node_type')}) failed: "
                                          f"{msg.get('exception_type', '')}: {msg.get('exception_message', '')}"
                                          .strip())
                raise ServerError(f"prompt {prompt_id} failed: {status.get('messages')}")
            if status.get("completed", True):
                return entry
        queue = server.get_json("/queue")
        running = any(item[1] == prompt_id for item in queue.get("queue_running", []))
        ahead = sum(1 for item in queue.get("queue_pending", []) if item[1] != prompt_id)
        state = "running" if running else f"queued ({ahead} ahead)"
        if state != last:
            say(state)
            last = state
        time.sleep(poll)
    raise ServerError(f"prompt {prompt_id}: not finished after {timeout:.0f} s (raise --timeout)")


def _download(server: Server, prompt: dict, entry: dict, target: Path) -> list[Path]:
    """Save the 'Save' node's images to `target` (several: target_1.png, ...) and metrics beside them."""
    outputs = entry.get("outputs", {})
    save_id = next((i for i, n in prompt.items() if n["class_type"] == "SaveImage"), None)
    images = outputs.get(save_id, {}).get("images", []) if save_id else []
    if not images:
        raise ServerError("the prompt finished but saved no image")
    written = []
    for k, img in enumerate(images):
        query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                        "type": img.get("type", "output")})
        data = server.request(f"/view?{query}")
        flat = _flat_colour(data)
        if flat is not None:
            # Save Image writes NaN/inf pixels as 0: a decode that overflowed arrives as a black PNG, not an error.
            raise ServerError(f"output {img['filename']} is one flat colour {flat} (not written): the model gave "
                              "NaN/inf (saved as black) or a constant image; check the server log for 'invalid value "
                              "encountered in cast', try a float32 VAE (--fp32-vae on the server) or another "
                              "checkpoint")
        path = target if k == 0 else target.with_name(f"{target.stem}_{k}{target.suffix}")
        atomic_write(path, lambda tmp, d=data: Path(tmp).write_bytes(d))
        written.append(path)
    for node_id, node in prompt.items():
        if node["class_type"] == "StyleMetrics" and outputs.get(node_id, {}).get("stylora_metrics"):
            path = target.with_name(f"{target.stem}.metrics.json")
            atomic_write_text(path, json.dumps(outputs[node_id]["stylora_metrics"][0], indent=1))
            written.append(path)
    return written


def _flat_colour(data: bytes) -> tuple[int, ...] | None:
    """The colour of an image whose every pixel is the same (e.g. all black from NaN pixels), else None."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        extrema = img.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return tuple(lo for lo, _ in bands) if all(lo == hi for lo, hi in bands) else None
