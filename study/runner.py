"""`run_study`: train what the methods need, stylise every content photo with every method at every strength on
ComfyUI, score the outputs and write one report. Killed at any point and rerun, it continues where it stopped."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..baseline.adain import AdaIN, stylize_file
from ..core.files import atomic_write_text, list_images
from ..core.lora_file import read_metadata
from ..eval.config import EvalConfig
from ..eval.report import evaluate
from ..eval.weights import WeightsUnavailable
from ..trainer.checkpoint import checkpoint_root, complete_checkpoints
from ..trainer.dreambooth import train_dreambooth
from ..trainer.lora import train_lora
from ..trainer.loss_curve import loss_log_path
from ..trainer.textual_inversion import train_textual_inversion
from ..workflows.client import API_DIR, RunConfig, run_workflow
from .config import IN_PROCESS, TRAINED, StudyConfig
from .inputs import check_inputs, folder_fingerprint, missing_node, paintings, usable_servers
from .report import BASE, write_report

logger = logging.getLogger(__name__)

STAGES = ("train", "place", "stylize", "evaluate", "report")
IMAGE_NODE = "StyleFromImage"  # the training-free painting-style node the `image` method needs on the server
IMAGE_WORKFLOW = "style_from_image"
MODEL_FOLDERS = {"dreambooth": "checkpoints", "textual-inversion": "embeddings"}  # else styles
TI_PROMPT = "a painting in the style of embedding:{}"  # the first of the trainer's style templates
# Prompted methods sample with classifier-free guidance as their bundled workflows do: DreamBooth (and its LoRA)
# at 7, the usual SD1.5 guidance that the dreambooth workflow and the README use, since DreamBooth is trained and
# sampled with its identifier prompt; Textual Inversion at 5, its workflow's (a learned word over-saturates at 7).
DREAMBOOTH_CFG = 7.0
TEXTUAL_INVERSION_CFG = 5.0


@dataclass(frozen=True)
class Job:
    """One folder of outputs: a method at one strength and seed (for one style, or BASE)."""

    style: str
    method: str
    strength: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.style}/{self.method}/s{self.strength:.2f}_seed{self.seed}"


def run_study(cfg: StudyConfig, *, progress: bool = True, nets: dict | None = None) -> dict[str, Any]:
    """Run (or continue) the study `cfg` describes and write `<cfg.out>/report/`. Returns the report as a dict.

    `nets` may supply the metrics' feature networks (see eval.report.evaluate), e.g. with random weights in tests.
    """
    from tqdm.auto import tqdm

    # 1. Everything that can be checked before the first step: folders, metric names, server URLs, the servers
    #    themselves (one that cannot be reached or lacks the pack's nodes is left out with a warning), the
    #    paintings (an unreadable one is skipped, as training skips it). Then the study folder and its manifest.
    check_inputs(cfg)
    if any(m not in IN_PROCESS for m in cfg.methods):
        cfg = replace(cfg, server=usable_servers(cfg))
    content = Path(cfg.content)
    photos = _images(content, "content")
    styles = dict(cfg.styles)
    examples = {name: paintings(Path(folder), name)[0] for name, folder in styles.items()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / "study.json", cfg)
    models = [Path(d) for d in cfg.server_models] or [out / "models"]

    # 2. The work: trained artifacts per style and method, output folders per method, strength and seed.
    trained = [(style, m) for style in styles for m in cfg.methods if m in TRAINED]
    jobs = [Job(BASE, "base", s, seed) for s in cfg.strengths for seed in cfg.seeds if "base" in cfg.methods]
    jobs += [Job(style, m, s, seed) for style in styles for m in cfg.methods if m not in ("base",)
             for s in cfg.strengths for seed in cfg.seeds]
    bar = tqdm(total=len(trained) + len(jobs) * len(photos) + len(styles) + 1, desc="Study", unit="task",
               disable=not progress, dynamic_ncols=True)

    # 3. Train: reuse a finished artifact with the same settings, resume an interrupted one, else train.
    artifacts: dict[tuple[str, str], Path] = {}
    with manifest.stage("train"):
        for style, method in trained:
            bar.set_postfix_str(f"train {style} {method}")
            train_cfg = cfg.train_config(method, styles[style], str(out / "train" / style / f"{method}.safetensors"))
            artifacts[style, method] = train_artifact(method, train_cfg, progress)
            manifest.record("train", f"{style}/{method}", {"artifact": str(artifacts[style, method])})
            bar.update(1)

    # 4. Place trained files where the servers see them: styles in models/styles, checkpoints in models/checkpoints,
    #    embeddings in models/embeddings.
    with manifest.stage("place"):
        names = place_artifacts(artifacts, models)

    # 5. Stylise on the servers (a job at a time; run_workflow spreads its photos over the servers and skips
    #    outputs that exist, so a killed run loses at most the images in flight); AdaIN here, in-process.
    missing_nodes = missing_node(cfg.server, IMAGE_NODE) if "image" in cfg.methods else []
    adain = AdaINModel(cfg.eval_device)
    with manifest.stage("stylize"):
        for job in jobs:
            bar.set_postfix_str(f"stylize {job.style} {job.method} s={job.strength:g}")
            folder = out / "styled" / job.key
            if manifest.done("stylize", job.key) and _count_images(folder) >= len(photos):
                bar.update(len(photos))
                continue
            why = image_skip_reason(missing_nodes) if job.method == "image" else None
            if job.method in IN_PROCESS and adain.load() is None:
                why = adain.missing
            if why is not None:
                logger.warning("method %s, style %s: skipped: %s", job.method, job.style, why)
                manifest.record("skipped", job.key, why)
                bar.update(len(photos))
                continue
            if job.method in IN_PROCESS:
                result = stylize_adain(adain.load(), photos, examples[job.style], folder, job.strength,
                                       cfg.max_side or 512)
            else:
                result = run_workflow(job_run_config(cfg, job, styles, names, folder, examples), say=logger.info)
            earlier = manifest.get("stylize", job.key) or {}
            seconds = {**earlier.get("seconds", {}), **{Path(p).stem: s for p, _, s in result.done}}
            manifest.record("stylize", job.key, {"done": not result.failed, "seconds": seconds,
                                                 "failed": [list(f) for f in result.failed]})
            bar.update(len(photos))

    # 6. Score each style: every method, strength and seed folder against the style's paintings (skipped when
    #    no output changed since the last scoring).
    reports: dict[str, dict] = {}
    with manifest.stage("evaluate"):
        for style, style_folder in styles.items():
            bar.set_postfix_str(f"evaluate {style}")
            report = score_style(cfg, manifest, style, Path(style_folder), jobs, content, nets)
            if report is not None:
                reports[style] = report
            bar.update(1)

    # 7. The report: comparison table, targets, grids, strength sweeps, costs and where the time went.
    with manifest.stage("report"):
        bar.set_postfix_str("report")
        costs = {f"{style}/{method}": _resources(path) for (style, method), path in artifacts.items()}
        report = write_report(out / "report", cfg, jobs=[(j.style, j.method, j.strength, j.seed, j.key) for j in jobs],
                              reports=reports, stylize=manifest.section("stylize"), costs=costs,
                              skipped=manifest.section("skipped"), stage_seconds=manifest.stage_seconds(),
                              styled_root=out / "styled", photos=photos,
                              loss_logs={f"{s}/{m}": loss_log_path(p) for (s, m), p in artifacts.items()})
        bar.update(1)
    bar.close()
    return report


def place_artifacts(artifacts: dict[tuple[str, str], Path], models: list[Path]) -> dict[tuple[str, str], str]:
    """Copy each trained file into every server's models folder of its kind (styles, checkpoints, embeddings) under a
    name carrying its settings' digest; returns those names by (style, method)."""
    names: dict[tuple[str, str], str] = {}
    for (style, method), path in artifacts.items():
        kind = MODEL_FOLDERS.get(method, "styles")
        names[style, method] = f"stylora-study-{style}-{method}-{_settings_digest(path)}.safetensors"
        for root in models:
            place(path, root / kind / names[style, method])
    return names


def image_skip_reason(missing_nodes: list[str]) -> str | None:
    """Why the Style From Image method cannot run on these servers (the node or its bundled workflow missing), or
    None."""
    if missing_nodes:
        return f"node {IMAGE_NODE} not available on this server ({', '.join(missing_nodes)})"
    if not (API_DIR / f"{IMAGE_WORKFLOW}.json").is_file():
        return f"no bundled workflow {IMAGE_WORKFLOW!r} for node {IMAGE_NODE}"
    return None


class AdaINModel:
    """AdaIN's network, loaded at its first use; `missing` says why it cannot be (its weights not found)."""

    def __init__(self, device: str | None):
        self.device, self.net, self.missing = device, None, None

    def load(self) -> AdaIN | None:
        if self.net is None and self.missing is None:
            try:
                self.net = AdaIN().to(_device(self.device))
            except WeightsUnavailable as e:
                self.missing = str(e).splitlines()[0]
        return self.net


def score_style(cfg: StudyConfig, manifest: Manifest, style: str, style_folder: Path, jobs: list[Job], content: Path,
                nets: dict | None) -> dict | None:
    """The evaluation report of one style's stylised folders (and the base model's) against its paintings, reused
    when no output changed since the last scoring; None when nothing was stylised."""
    out = Path(cfg.out)
    style_jobs = [j for j in jobs if j.style in (style, BASE) and _count_images(out / "styled" / j.key)]
    eval_out = out / "eval" / style
    if not style_jobs:
        logger.warning("style %s: nothing stylised to score", style)
        return None
    folders = [out / "styled" / j.key for j in style_jobs]
    fingerprint = _folders_fingerprint(folders + [style_folder, content], cfg.metrics)
    if manifest.get("evaluate", style) == fingerprint and (eval_out / "report.json").is_file():
        return json.loads((eval_out / "report.json").read_text(encoding="utf-8"))
    eval_cfg = EvalConfig(content=str(content), styled=tuple(str(f) for f in folders), out=str(eval_out),
                          style=str(style_folder), names=tuple(j.key for j in style_jobs), metrics=cfg.metrics,
                          device=cfg.eval_device, grid_rows=cfg.grid_rows,
                          resize_content=True)  # the workflows shrink photos above max_side
    report = evaluate(eval_cfg, nets=nets, progress=False)
    manifest.record("evaluate", style, fingerprint)
    return report


# --- Training -------------------------------------------------------------------------------------------------

def data_record(artifact: Path) -> Path:
    """`<artifact>.data.json`: the fingerprint of the paintings the artifact was trained on (folder_fingerprint)."""
    return artifact.parent / f"{artifact.stem}.data.json"


def same_settings(artifact: Path, train_cfg: Any) -> bool:
    """Whether a finished artifact was trained with exactly these settings (its metadata's stylora.config) on
    exactly the paintings now in its data folder (their names and bytes, not the folder's path) and its resource
    record was written (the trainer's last step)."""
    record = artifact.parent / f"{artifact.stem}.resources.json"
    if not artifact.is_file() or not record.is_file():
        return False
    try:
        trained_on = json.loads(data_record(artifact).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return False
    if trained_on != folder_fingerprint(Path(train_cfg.data)):
        return False
    try:
        saved = json.loads(read_metadata(artifact).get("stylora.config", "null"))
    except (OSError, ValueError):
        return False
    wanted = json.loads(json.dumps(train_cfg.to_metadata()))  # as the trainer saved it: paths by name
    if not isinstance(saved, dict):
        return False
    # Where the file is written does not change what is trained: a copied study folder reuses its files.
    return {k: v for k, v in saved.items() if k != "output"} == {k: v for k, v in wanted.items() if k != "output"}


def train_artifact(method: str, train_cfg: Any, progress: bool) -> Path:
    """The trained file of `method` for one style: reused when finished with these settings, resumed from its
    newest complete checkpoint when interrupted, trained afresh otherwise (replacing one with other settings)."""
    output = Path(train_cfg.output)
    if same_settings(output, train_cfg):
        logger.info("%s: finished with these settings, reused", output)
        return output
    train = {"lora": train_lora, "dreambooth": train_dreambooth, "dreambooth-lora": train_dreambooth,
             "textual-inversion": train_textual_inversion}[method]
    if complete_checkpoints(checkpoint_root(output)) and not output.exists():
        try:
            logger.info("%s: resuming the interrupted run", output)
            train(train_cfg, resume=True, progress=progress)
            _write_data_record(output, train_cfg)
            return output
        except ValueError as e:  # the checkpoints belong to other settings or images
            logger.warning("%s: cannot resume (%s); training afresh", output, e)
    elif output.exists():
        logger.warning("%s: trained with other settings; training afresh", output)
    train(train_cfg, overwrite=True, progress=progress)
    _write_data_record(output, train_cfg)
    return output


def _write_data_record(output: Path, train_cfg: Any) -> None:
    atomic_write_text(data_record(output), json.dumps({"data": Path(train_cfg.data).name,
                                                       "sha256": folder_fingerprint(Path(train_cfg.data))}))


def _settings_digest(artifact: Path) -> str:
    """8 hex digits of the artifact's training settings: files of different settings get different names on the
    server, and a rerun finds its own copy."""
    config = read_metadata(artifact).get("stylora.config", "")
    return hashlib.sha256(config.encode()).hexdigest()[:8]


def place(source: Path, target: Path) -> None:
    """Make `target` (in a server's models folder) a copy of `source`, atomically: a hard link when both are on
    one file system, else a copy; an existing target of the same size is kept."""
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    logger.info("placed %s as %s", source, target)


def _resources(artifact: Path) -> dict[str, Any] | None:
    path = artifact.parent / f"{artifact.stem}.resources.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# --- Stylising ------------------------------------------------------------------------------------------------

def job_run_config(cfg: StudyConfig, job: Job, styles: dict[str, str], names: dict[tuple[str, str], str],
                   folder: Path, examples: dict[str, Path]) -> RunConfig:
    """The `stylora run` settings of one job. Every method samples with the same seed and strength-to-denoise
    mapping (Style Strength's); base, lora and image with the same conditioning (the style's trigger, empty for
    promptless styles, at CFG 1), the DreamBooth methods with their instance prompt, as they were trained.
    `examples`: each style's first readable painting, the `image` method's style example."""
    sets = list(cfg.set)
    if cfg.max_side is not None:
        sets.append(f"Content encode.max_side={cfg.max_side}")
    if cfg.sampler_steps is not None:
        sets.append(f"Sampler.steps={cfg.sampler_steps}")
    common = dict(content=cfg.content, out=str(folder), server=cfg.server, strength=job.strength, seed=job.seed,
                  timeout=cfg.timeout)
    if job.method == "base":  # plain img2img: the base checkpoint in the DreamBooth graph, sampled as the LoRA
        #                       graph samples a promptless style (empty prompt, CFG 1)
        return RunConfig(workflow="dreambooth", style=(cfg.checkpoint,), **common,
                         set=(*sets, "Positive prompt.text=", "Negative prompt.text=", "Sampler.cfg=1.0"))
    if job.method == "lora":
        return RunConfig(workflow="style_transfer", style=(names[job.style, "lora"],), checkpoint=cfg.checkpoint,
                         set=tuple(sets), **common)
    if job.method == "textual-inversion":  # the embedding is a prompt word, sampled with CFG like DreamBooth
        word = Path(names[job.style, "textual-inversion"]).stem
        return RunConfig(workflow="textual_inversion", checkpoint=cfg.checkpoint, **common,
                         set=(*sets, f"Positive prompt.text={TI_PROMPT.format(word)}",
                              f"Sampler.cfg={TEXTUAL_INVERSION_CFG}"))
    trigger = cfg.train_config(job.method, styles[job.style], "x.safetensors").instance_prompt \
        if job.method in ("dreambooth", "dreambooth-lora") else ""
    if job.method == "dreambooth":
        return RunConfig(workflow="dreambooth", style=(names[job.style, "dreambooth"],), **common,
                         set=(*sets, f"Positive prompt.text={trigger}", f"Sampler.cfg={DREAMBOOTH_CFG}"))
    if job.method == "dreambooth-lora":
        return RunConfig(workflow="style_transfer", style=(names[job.style, "dreambooth-lora"],),
                         checkpoint=cfg.checkpoint,
                         set=(*sets, f"Positive prompt.text={trigger}", f"Sampler.cfg={DREAMBOOTH_CFG}"),
                         **common)
    return RunConfig(workflow=IMAGE_WORKFLOW, style_image=str(examples[job.style]), checkpoint=cfg.checkpoint,
                     set=tuple(sets), **common)


@dataclass
class InProcessResult:
    """What an in-process method did, in run_workflow's terms: (photo, output, seconds) done, (photo, why) failed."""

    done: list[tuple[str, str, float]]
    failed: list[tuple[str, str]]


def stylize_adain(model: AdaIN, photos: list[Path], painting: Path, folder: Path, strength: float, max_side: int
                  ) -> InProcessResult:
    """AdaIN outputs of every photo in the style of `painting` (the style's first painting, as the `image` method
    uses), with alpha = strength (the paper's content-style trade-off, eq. 14); existing outputs are kept."""
    device = next(model.parameters()).device
    result = InProcessResult([], [])
    for photo in photos:
        out = folder / f"{photo.stem}.png"
        if out.is_file():
            continue
        try:
            seconds = stylize_file(model, photo, painting, out, strength, max_side, device)
        except (ValueError, RuntimeError) as e:  # an unreadable photo fails alone, as on a server
            result.failed.append((str(photo), " ".join(str(e).split())[:300]))
            continue
        result.done.append((str(photo), str(out), seconds))
    return result


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# --- Files and state ------------------------------------------------------------------------------------------

def _images(folder: Path, name: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{name}: not a folder: {folder}")
    files = list_images(folder)
    if not files:
        raise ValueError(f"{name}: no images in {folder}")
    return files


def _count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return len(list_images(folder))


def _folders_fingerprint(folders: list[Path], metrics: tuple[str, ...]) -> str:
    """Names and sizes of every file in the folders (the study never rewrites an output in place, so a new,
    removed or replaced output changes it; modification times alone do not)."""
    h = hashlib.sha256(json.dumps(sorted(metrics)).encode())
    for folder in folders:
        for f in sorted(folder.iterdir()) if folder.is_dir() else []:
            if f.is_file() and not f.name.startswith("."):
                h.update(f"{f}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


class Manifest:
    """`<out>/study.json`: finished work per stage and the time spent in each stage, rewritten atomically after
    every change, so a killed study knows on rerun what it need not redo."""

    def __init__(self, path: Path, cfg: StudyConfig):
        self.path = path
        self.data: dict[str, Any] = {"config": cfg.to_dict(), "sections": {}, "stage_seconds": {}}
        self._running: tuple[str, float] | None = None
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                self.data["sections"] = saved.get("sections", {})
                self.data["stage_seconds"] = saved.get("stage_seconds", {})
            except (OSError, json.JSONDecodeError) as e:
                logger.warning("%s unreadable (%s): starting a new manifest; finished files are still reused",
                               path, e)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, allow_nan=False))

    def record(self, section: str, key: str, value: Any) -> None:
        self.data["sections"].setdefault(section, {})[key] = value
        self.save()

    def get(self, section: str, key: str) -> Any:
        return self.data["sections"].get(section, {}).get(key)

    def section(self, section: str) -> dict[str, Any]:
        return dict(self.data["sections"].get(section, {}))

    def done(self, section: str, key: str) -> bool:
        value = self.get(section, key)
        return bool(value and value.get("done"))

    def stage_seconds(self) -> dict[str, float]:
        """Seconds per stage over every run of this study, the running stage's time so far included."""
        seconds = dict(self.data["stage_seconds"])
        if self._running is not None:
            name, start = self._running
            seconds[name] = seconds.get(name, 0.0) + time.monotonic() - start
        return seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (added up over reruns) and copy the library's log records to `<out>/logs/<name>.log`."""
        log_dir = self.path.parent / "logs"
        log_dir.mkdir(exist_ok=True)
        handler = logging.FileHandler(log_dir / f"{name}.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        package = logging.getLogger(__name__.split(".")[0])
        level = package.level
        if package.getEffectiveLevel() > logging.INFO:
            package.setLevel(logging.INFO)
        package.addHandler(handler)
        start = time.monotonic()
        self._running = (name, start)
        try:
            yield
        finally:
            self._running = None
            seconds = self.data["stage_seconds"]
            seconds[name] = seconds.get(name, 0.0) + time.monotonic() - start
            self.save()
            package.removeHandler(handler)
            package.setLevel(level)
            handler.close()

