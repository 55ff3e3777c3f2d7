"""Headless runs of the bundled API workflows against a ComfyUI server (`stylora run`).

Only the standard library talks to the server: POST /upload/image, POST /prompt, GET /history/<id> (polled;
GET /queue says whether the prompt waits or runs), GET /view for the outputs. Inputs are found by node title
(`_meta.title`); workflows/roles.py lists the titles and what each node does for the run.
"""

from __future__ import annotations

import functools
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, atomic_write_text, list_images
from ..core.images import ImageLoadError, load_image, load_mask
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
    mask: str | None = field(
        default=None,
        metadata={"help": "mask image, white = styled (masked_style); a mask with transparency, as ComfyUI's mask "
                          "editor saves it, is read from its alpha: transparent = styled"})
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


class ServerUnreachable(ServerError):
    """No answer from the server (refused, dropped, timed out): with several servers, it is left out."""


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
            raise ServerUnreachable(f"server {self.url}: cannot reach it ({reason}); is ComfyUI running there? "
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
                    style["inputs"]["weight" + suffix] = _weight(spec, weight) if weight else 1.0
                elif weight:
                    style["inputs"]["strength"] = _weight(spec, weight)
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


def _weight(spec: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"style: the weight in {spec!r} is not a number; give NAME or NAME:WEIGHT, e.g. "
                         "ukiyo-e.safetensors:0.5") from None


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


# Inputs whose options are files: checked by check_against_server with the folder to put them in (LoadImage's
# image is this run's upload, not yet on the server).
FILE_INPUTS = {"ckpt_name", "style", "style_2", "style_3", "control_net_name", "image"}
PY_TYPES = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}


def _is_link(value: Any, graph: dict) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in graph
            and isinstance(value[1], int))


def _accepted(kind: Any, opts: dict) -> str:
    """What an input takes, in words: its choices, or its type and range."""
    if isinstance(kind, (list, tuple)) or kind == "COMBO":
        choices = list(kind) if kind != "COMBO" else list(opts.get("options", []))
        return "one of " + ", ".join(map(str, choices[:20])) + (", ..." if len(choices) > 20 else "")
    if kind in ("INT", "FLOAT"):
        whole = "a whole number" if kind == "INT" else "a finite number"
        return f"{kind}, {whole} in {opts.get('min', '-inf')}..{opts.get('max', 'inf')}"
    return kind if kind in PY_TYPES else f"a link from a {kind} output"


def _value_fits(kind: Any, opts: dict, value: Any) -> bool:
    """Whether `value` is one ComfyUI accepts for an input of this type and options."""
    if isinstance(kind, (list, tuple)) or kind == "COMBO":
        choices = list(kind) if kind != "COMBO" else list(opts.get("options", []))
        return not choices or value in choices  # an empty list: the choices were not saved (the offline fixture)
    if kind not in PY_TYPES or isinstance(value, bool) != (kind == "BOOLEAN"):
        return False
    if not isinstance(value, PY_TYPES[kind]):
        return False
    if kind in ("INT", "FLOAT"):
        return math.isfinite(value) and opts.get("min", value) <= value <= opts.get("max", value)
    return True


def check_values(graph: dict, object_info: dict) -> None:
    """Every value the run sends (the workflow's, the flags', each --set) is one the node takes: the input exists,
    has the type, lies in the range, is one of the choices. ComfyUI drops an unknown input without a word, so
    `--set "Sampler.stepz=30"` would otherwise run with the default. ValueError naming node, input, value and
    what is accepted. File names are check_against_server's."""
    for node_id, node in graph.items():
        spec = object_info[node["class_type"]]["input"]
        specs = {**spec.get("required", {}), **spec.get("optional", {})}
        where = f"node {node.get('_meta', {}).get('title', node_id)!r} ({node['class_type']})"
        for name, value in node["inputs"].items():
            if name not in specs:
                raise ValueError(f"{where} has no input {name!r} (ComfyUI would ignore it); its inputs: "
                                 f"{', '.join(specs)}")
            if name in FILE_INPUTS or _is_link(value, graph):
                continue
            kind, opts = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if not _value_fits(kind, opts, value):
                raise ValueError(f"{where} input {name!r}: {value!r} is not accepted; it takes {_accepted(kind, opts)}")


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def content_upload(path: Path, mask=None) -> tuple[str, bytes]:
    """The photo as a clean PNG (EXIF-rotated, RGB), with `mask` (an "L" image, 255 = styled; core.images.load_mask)
    as alpha 0 where the style goes: the way ComfyUI's mask editor saves a painted mask, so LoadImage's MASK output
    (1 - alpha) carries it."""
    from PIL import Image, ImageOps

    img = load_image(path)
    if mask is not None:
        if mask.size != img.size:
            logger.warning("the mask is %dx%d, the photo %s %dx%d: mask resized", *mask.size, path.name, *img.size)
            mask = mask.resize(img.size, Image.Resampling.BILINEAR)
        img = img.convert("RGBA")
        img.putalpha(ImageOps.invert(mask))
    return f"{path.stem}.png", _png_bytes(img)


# --- The run --------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    done: list[tuple[str, list[str], float]] = field(
        default_factory=list, metadata={"help": "(photo, outputs written, seconds)"})
    skipped: list[str] = field(default_factory=list, metadata={"help": "photos whose output existed (resumed batch)"})
    failed: list[tuple[str, str]] = field(default_factory=list, metadata={"help": "(photo, why)"})


def _check_run_inputs(cfg: RunConfig, graph: dict):
    """The inputs the workflow needs are given and readable; returns the mask ("L", 255 = styled) or None."""
    masked = any(n["class_type"] == "MaskedStyleApply" for n in graph.values())
    if masked and cfg.mask is None:
        raise ValueError(f"mask: workflow {cfg.workflow} styles only a masked region; pass --mask IMAGE "
                         "(white = styled)")
    if cfg.mask is not None and not masked:
        raise ValueError(f"mask: workflow {cfg.workflow} has no MaskedStyleApply node; use --workflow masked_style")
    if find(graph, STYLE_IMAGE) is not None and cfg.style_image is None:
        raise ValueError(f"style_image: workflow {cfg.workflow} compares with a style image; pass --style-image")
    if cfg.mask is None:
        return None
    if not Path(cfg.mask).is_file():
        raise FileNotFoundError(f"mask: no such file {cfg.mask}")
    try:
        return load_mask(cfg.mask)
    except ImageLoadError as e:
        raise ValueError(f"mask: {e}") from e


def _photos_and_targets(cfg: RunConfig) -> dict[Path, Path]:
    """Each photo of --content (a file, or a folder's images) and the output it is written to."""
    content = Path(cfg.content)
    if content.is_dir():
        photos = list_images(content)
        if not photos:
            raise ValueError(f"content: no images in folder {content}")
        stems = [p.stem for p in photos]  # cat.jpg and cat.png must not share cat.png
        return {p: Path(cfg.out) / (f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.stem}_{p.suffix[1:]}.png")
                for p in photos}
    if content.is_file():
        out = Path(cfg.out)
        return {content: out / f"{content.stem}.png" if out.is_dir() or not out.suffix else out}
    raise FileNotFoundError(f"content: no such file or folder {content}")


def _usable_servers(cfg: RunConfig, graph: dict, say: Callable[[str], None]) -> dict[str, tuple[Server, str | None]]:
    """Server URL -> (server, the style image's name there), for every server that answers and has every node,
    file and input the run names. With several, one that cannot be reached is left out (its photos go to the
    others); one server that cannot be reached is an error."""
    placeholder = "placeholder.png" if cfg.style_image else None
    checked = substitute(graph, cfg, placeholder, placeholder)
    usable = {}
    for url in cfg.server:
        server = Server(url)
        try:
            object_info = server.get_json("/object_info")
            check_against_server(checked, object_info, cfg.workflow)
            check_values(checked, object_info)
            style_image = (server.upload(*content_upload(Path(cfg.style_image)))
                           if cfg.style_image is not None else None)
        except ServerUnreachable as e:
            if len(cfg.server) == 1:
                raise
            say(f"{server.url}: left out ({e})")
            continue
        usable[server.url] = (server, style_image)
    if not usable:
        raise ServerUnreachable(f"none of the servers {list(cfg.server)} can be reached")
    return usable


def _say_state(say: Callable[[str], None], tag: str, where: str, state: str) -> None:
    say(f"{tag}: {state}{where}")


@dataclass
class _Batch:
    """The photos still to do and what became of the others, shared by one worker per server."""
    cfg: RunConfig
    graph: dict
    mask: Any  # PIL "L" image or None
    targets: dict[Path, Path]
    servers: dict[str, tuple[Server, str | None]]
    say: Callable[[str], None]
    poll: float
    done: dict[Path, tuple[list[str], float]] = field(default_factory=dict)  # photo -> (outputs written, seconds)
    failed: dict[Path, str] = field(default_factory=dict)  # photo -> why
    todo: queue.Queue = field(default_factory=queue.Queue)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def drain(self, url: str) -> ServerUnreachable | None:
        """Take photos until none is left; the error that took the server away (its photo put back), or None."""
        while True:
            try:
                i, photo = self.todo.get_nowait()
            except queue.Empty:
                return None
            try:
                self.run_photo(url, i, photo)
            except ServerUnreachable as e:
                self.todo.put((i, photo))  # the server went away: another one takes the photo
                self.say(f"[{i}/{len(self.targets)}] {photo.name}: {url} dropped out ({e})")
                return e
            except (ImageLoadError, ServerError, OSError) as e:
                with self.lock:
                    self.failed[photo] = str(e)
                self.say(f"[{i}/{len(self.targets)}] {photo.name}: FAILED: {e}")

    def run_photo(self, url: str, i: int, photo: Path) -> None:
        """Upload, queue, wait, download one photo on one server."""
        server, style_image = self.servers[url]
        tag, where = f"[{i}/{len(self.targets)}] {photo.name}", f" on {url}" if len(self.cfg.server) > 1 else ""
        name = server.upload(*content_upload(photo, self.mask))
        prompt = substitute(self.graph, self.cfg, name, style_image)
        start = time.monotonic()
        reply = server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        entry = _wait(server, reply["prompt_id"], self.cfg.timeout, self.poll,
                      functools.partial(_say_state, self.say, tag, where))
        written = _download(server, prompt, entry, self.targets[photo])
        seconds = time.monotonic() - start
        with self.lock:
            self.done[photo] = ([str(w) for w in written], seconds)
        self.say(f"{tag}: wrote {', '.join(str(w) for w in written)} ({seconds:.1f} s){where}")


def run_workflow(cfg: RunConfig, say: Callable[[str], None] = logger.info, poll: float = 0.5) -> RunResult:
    """Run a bundled (or given) API workflow on a ComfyUI server for one photo or a folder of photos."""
    # 1. The workflow and the inputs it needs, the mask read and checked once, before anything is queued.
    graph = load_workflow(cfg.workflow)
    mask = _check_run_inputs(cfg, graph)
    targets = _photos_and_targets(cfg)
    # 2. The servers: reachable, with every node, every named file and every input value the run sends.
    servers = _usable_servers(cfg, graph, say)
    # 3. The work: photos whose output exists are skipped (a rerun resumes), unless --overwrite.
    batch, skipped = _Batch(cfg, graph, mask, targets, servers, say, poll), []
    for i, (photo, target) in enumerate(targets.items(), 1):
        if target.exists() and not cfg.overwrite:
            skipped.append(str(photo))
            say(f"[{i}/{len(targets)}] {photo.name}: {target} exists, skipped (--overwrite redoes it)")
        else:
            batch.todo.put((i, photo))
    # 4. One worker per server takes photos from the queue until it is empty. A failing photo is reported and the
    #    others still run; a server that drops out puts its photo back and the others share it (another round).
    #    Seeds come from the config, so the split does not change a result.
    alive, gone = list(servers), None
    with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="stylora-run") as pool:
        while not batch.todo.empty() and alive:
            futures = {pool.submit(batch.drain, url): url for url in alive}
            lost = {futures[f]: f.result() for f in as_completed(futures) if f.result() is not None}
            alive = [url for url in alive if url not in lost]
            gone = next(iter(lost.values()), gone)
    if not batch.todo.empty():
        raise gone  # every server went away: stop, the finished outputs are kept
    # 5. Results in the order of the photos, whichever server finished first.
    return RunResult(done=[(str(p), *batch.done[p]) for p in targets if p in batch.done], skipped=skipped,
                     failed=[(str(p), batch.failed[p]) for p in targets if p in batch.failed])


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
