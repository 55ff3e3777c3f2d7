"""The one training loop every recipe runs: the run's start (fresh or resumed), accelerate set-up, data scan, base
model, optimizer and LR schedule, the step loop with progress, periodic checkpoints and a checkpoint on Ctrl-C, and
the output and resource record at the end.

A recipe (style LoRA, DreamBooth, textual inversion) is one `Recipe` object: what it trains, its micro-batch loss,
its trainable state for checkpoints and how to load it back, and how it writes its output file. Noise, timesteps
and batches are drawn from generators seeded by the micro-batch index (trainer/seeds.py), so a resumed run
continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from tqdm.auto import tqdm

from ..core.files import Skipped
from ..core.resources import peak_memory_mb, write_resource_record
from .base_model import BaseModel, load_base_model, resolve_source
from .checkpoint import RunCheckpoints, check_finite, start_or_resume
from .config import AdapterSettings, TrainingSettings
from .dataset import StyleDataset, load_style_dataset
from .loss_curve import loss_log_path, write_loss_curve
from .seeds import stream

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf: the run stops before the bad step changes the weights."""


class StopTraining(Exception):
    """Raised by a step callback (`train_lora(on_step=...)`) to stop a run early, e.g. on a user's cancel: the loop
    writes a checkpoint of the last completed step, as on Ctrl-C, and re-raises; the same run resumes from it."""


# Called with (steps completed, total steps): once before the first step of a run (the resumed step, or 0) and after
# every optimizer step. It may raise StopTraining to stop the run at that step.
StepCallback = Callable[[int, int], None]


@dataclass
class TrainResult:
    output: Path  # the written file
    steps: int  # optimizer steps completed in total (including resumed ones)
    resumed_from: int  # step the run resumed from (0: fresh start)
    final_loss: float  # mean loss over the last logging window
    losses: list[float] = field(default_factory=list)  # per-step loss of this run (mean over processes)
    skipped: list[Skipped] = field(default_factory=list)  # data files not used, with reasons
    seconds: float = 0.0  # wall time of this run
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step of this run
    peak_memory_mb: float = 0.0  # CUDA peak allocated, or the process's peak RSS on CPU


@dataclass
class RunContext:
    """What the loop has set up when a recipe is built: the settings, devices, the scanned images, the base model."""

    cfg: TrainingSettings
    accelerator: Accelerator
    weight_dtype: torch.dtype  # dtype of the frozen weights (the mixed-precision dtype)
    show: bool  # whether this process shows progress
    dataset: StyleDataset
    base: BaseModel

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Recipe(ABC):
    """One training recipe, as `run_training` runs it. Subclasses build what they train in `__init__` (adapters,
    cached latents and prompts) and set `params` (the trained parameters) and `model` (the module accelerate
    accumulates gradients for)."""

    kind: str  # the resource record's and the metadata's kind, e.g. "style_lora"
    title: str  # the progress bar's label
    invariants: tuple[str, ...]  # settings a resumed run must share with its checkpoint
    log_with: str = "csv"
    params: list[torch.nn.Parameter]
    model: torch.nn.Module

    @classmethod
    def scan(cls, cfg: TrainingSettings, show: bool) -> StyleDataset:
        """The training images: square centre crops, no captions (a style-LoRA recipe reads more settings)."""
        return load_style_dataset(cfg.data, cfg.resolution, "center", use_captions=False, min_images=cfg.min_images,
                                  max_image_pixels=cfg.max_image_pixels, progress=show)

    @property
    def fingerprint(self) -> str:
        """What identifies the training images: a resumed run must have the same."""
        return self.run.dataset.fingerprint

    def __init__(self, run: RunContext):
        self.run = run

    @abstractmethod
    def prepare(self, optimizer: torch.optim.Optimizer, lr_schedule: Any) -> tuple[torch.optim.Optimizer, Any]:
        """Hand the trained modules, the optimizer and the schedule to accelerate; keep the wrapped modules."""

    def train_mode(self) -> None:
        """Put the trained modules in training mode before the first step (default: as loaded)."""
        return None

    @abstractmethod
    def loss(self, index: int, g: torch.Generator) -> torch.Tensor:
        """The scalar loss of micro-batch `index` (global across processes), every random draw taken from `g`."""

    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights, as checkpoints hold them."""

    @abstractmethod
    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Put the weights of `trainable_state` (from a checkpoint) back into the model."""

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based), e.g. for previews (default: nothing)."""
        return None

    @abstractmethod
    def write(self, steps: int, seconds: float, peak_mb: float) -> None:
        """Write the output file (main process only)."""

    def record(self) -> dict[str, Any]:
        """More entries of the resource record."""
        return {}


def run_training(cfg: TrainingSettings, recipe_type: type[Recipe], *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, on_step: StepCallback | None = None, **options: Any) -> TrainResult:
    """Train `recipe_type` as `cfg` says and write `cfg.output`; `options` go to the recipe's constructor."""
    t_start = time.time()
    cfg = dataclasses.replace(cfg, base_model=resolve_source(cfg.base_model))  # found again however it was typed
    output = Path(cfg.output)

    # 1. Fresh run or resumption, and a writable --output; nothing is deleted here (an earlier run's
    #    checkpoints go when this run writes its first one, after the data and base model loaded).
    resume_from = start_or_resume(output, resume, overwrite, cfg.steps)

    # 2. Accelerator: device placement, mixed precision, gradient accumulation, multi-GPU.
    accelerator, weight_dtype, show = start_accelerator(cfg.mixed_precision, cfg.grad_accum, progress)

    # 3. Scan the training images: every file either used or reported with a reason.
    dataset = recipe_type.scan(cfg, show)
    logger.info("%d usable images in %d bucket(s), %d skipped", len(dataset), len(dataset.buckets),
                len(dataset.skipped))

    # 4. The frozen base model.
    base = load_base_model(cfg.base_model, cfg.base_config)

    # 5. The recipe: what is trained, and what it computes once (latents, prompt embeddings).
    recipe = recipe_type(RunContext(cfg, accelerator, weight_dtype, show, dataset, base), **options)

    # 6. Optimizer and learning-rate schedule over the trained parameters.
    optimizer, lr_schedule = optimizer_and_schedule(accelerator, recipe.params, cfg, cfg.lr)
    optimizer, lr_schedule = recipe.prepare(optimizer, lr_schedule)

    # 7. Resume: trained weights, optimizer moments and schedule position from the newest complete checkpoint.
    checkpoints = RunCheckpoints(accelerator, output, recipe.trainable_state, optimizer, lr_schedule,
                                 {"config": cfg.to_dict(), "dataset_fingerprint": recipe.fingerprint},
                                 cfg.keep_checkpoints)
    start_step = checkpoints.resume(resume_from, cfg, recipe.invariants, recipe.load_trainable, show)

    # 8. The steps: backward, optimizer step, logs, checkpoints, the recipe's and the caller's per-step work.
    track = TrainProgress(output, cfg.steps, start_step, cfg.log_every, recipe.title, show, recipe.log_with,
                          enabled=accelerator.is_main_process)
    recipe.train_mode()
    if on_step is not None:
        on_step(start_step, cfg.steps)
    step = train_steps(accelerator, recipe, optimizer, lr_schedule, checkpoints, track, cfg, start_step, on_step)

    # 9. The output with its metadata, the resource record and the loss curve; a last checkpoint.
    return finish_run(accelerator, checkpoints, track, cfg, recipe, start_step, step, t_start)


def release_accelerator_state() -> None:
    """Forget the accelerator settings of an earlier run in this process (a second style, a ComfyUI session), so
    this run may choose another mixed precision. accelerate keeps them in class-level singletons that refuse a
    changed setting; its own test-suite clears them the same way between runs. The distributed process state
    (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def add_lora_adapters(unet: torch.nn.Module, cfg: AdapterSettings) -> list[torch.nn.Parameter]:
    """LoRA adapters (rank `cfg.rank`, scale alpha/rank, Gaussian init seeded by `cfg.seed`) on the UNet layers
    `cfg.target_modules`; the trainable weights stay fp32 under mixed precision (diffusers' recipe). Returns them."""
    torch.manual_seed(cfg.seed)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.target_modules)))
    if cfg.mixed_precision != "no":
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"target_modules {list(cfg.target_modules)} matched no UNet layer")
    return params


def start_accelerator(mixed_precision: str, grad_accum: int, progress: bool) -> tuple[Accelerator, torch.dtype, bool]:
    """(accelerator, dtype of the frozen weights, whether this process shows progress) for a fresh run:
    device placement, mixed precision, gradient accumulation, multi-GPU."""
    release_accelerator_state()
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    return accelerator, weight_dtype, progress and accelerator.is_local_main_process


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, use_8bit: bool
                   ) -> torch.optim.Optimizer:
    """AdamW over `params`; bitsandbytes' 8-bit AdamW when `use_8bit` and it is installed with a CUDA device
    (Dettmers et al. 2022: a quarter of the optimizer memory)."""
    if use_8bit:
        try:
            import bitsandbytes as bnb

            if params and params[0].device.type == "cuda":
                return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
            logger.info("use_8bit_adam: 8-bit AdamW needs CUDA; using torch AdamW")
        except ImportError:
            logger.info("use_8bit_adam: bitsandbytes is not installed; using torch AdamW")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_and_schedule(accelerator: Accelerator, params: list[torch.nn.Parameter], cfg: TrainingSettings,
                           lr: float) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (see make_optimizer) and the diffusers LR schedule `cfg.lr_scheduler` with `cfg.warmup_steps` of
    linear warm-up over `cfg.steps`; accelerate steps the schedule once per process, hence the scaling."""
    if cfg.warmup_steps > cfg.steps:
        logger.warning("warmup_steps %d is more than steps %d: the learning rate never reaches %g",
                       cfg.warmup_steps, cfg.steps, lr)
    optimizer = make_optimizer(params, lr, cfg.adam_weight_decay, cfg.use_8bit_adam)
    lr_schedule = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
                                num_training_steps=cfg.steps * accelerator.num_processes)
    return optimizer, lr_schedule


def optimizer_step(accelerator: Accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter],
                   optimizer: torch.optim.Optimizer, lr_schedule: Any, max_grad_norm: float) -> None:
    """Backward; on the last micro-batch of an accumulation (accelerate decides) clip, step, advance the LR."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)


def train_steps(accelerator: Accelerator, recipe: Recipe, optimizer: torch.optim.Optimizer, lr_schedule: Any,
                checkpoints: RunCheckpoints, track: TrainProgress, cfg: TrainingSettings, start_step: int,
                on_step: StepCallback | None = None) -> int:
    """Run optimizer steps `start_step`..`cfg.steps` and return the last step reached.

    Each optimizer step is `cfg.grad_accum` micro-steps, each `recipe.loss(index, g)` of micro-batch `index`
    (global across processes) with its randomness drawn from `g`. A checkpoint is written every
    `cfg.checkpoint_every` steps and when interrupted (Ctrl-C, or StopTraining raised by `on_step`), so `--resume`
    loses nothing.
    """
    step = start_step
    try:
        while step < cfg.steps:
            track.begin_step()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                index = (step * cfg.grad_accum + micro) * accelerator.num_processes + accelerator.process_index
                with accelerator.accumulate(recipe.model):
                    loss = recipe.loss(index, stream(cfg.seed, index))
                    if not torch.isfinite(loss.detach()).all():  # before backward: the weights stay as they were
                        kept = checkpoints.last_saved or "none written yet"
                        raise TrainingDiverged(
                            f"training diverged: the loss is {loss.detach().item()} at step {step + 1}; nothing "
                            f"written (last good checkpoint: {kept}). Lower --learning-rate or --noise-offset, "
                            "keep --max-grad-norm > 0, then --resume")
                    optimizer_step(accelerator, loss, recipe.params, optimizer, lr_schedule, cfg.max_grad_norm)
                # The mean over processes: the loss of the global batch, whatever the process count.
                step_loss += accelerator.reduce(loss.detach(), "mean").item() / cfg.grad_accum
            step += 1
            track.end_step(step, step_loss, lr_schedule.get_last_lr()[0])
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoints.save(step)
            recipe.after_step(step)
            if on_step is not None:
                on_step(step, cfg.steps)
    except (KeyboardInterrupt, StopTraining):
        if step > start_step:
            checkpoints.save(step)
            logger.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
        raise
    finally:
        track.close()
    return step


def finish_run(accelerator: Accelerator, checkpoints: RunCheckpoints, track: TrainProgress, cfg: TrainingSettings,
               recipe: Recipe, start_step: int, step: int, t_start: float) -> TrainResult:
    """Write the trained output (`recipe.write`, main process only), its resource record and its loss-curve plot,
    then a last checkpoint for reference (every process: it ends on a barrier)."""
    accelerator.wait_for_everyone()
    output = Path(cfg.output)
    peak_mb = peak_memory_mb(accelerator.device)
    seconds = time.time() - t_start
    if accelerator.is_main_process:
        check_finite(checkpoints.weights(), f"--output {output}")
        recipe.write(step, seconds, peak_mb)
        write_resource_record(output, run_record(recipe.kind, cfg, accelerator.device, track, start_step, seconds,
                                                 peak_mb, processes=accelerator.num_processes, **recipe.record()))
        if track.enabled:
            write_loss_curve(output, f"{recipe.kind}: {output.name}")
        logger.info("wrote %s (%d steps)", output, step)
    if cfg.checkpoint_every:
        checkpoints.save(step)
    checkpoints.drop_earlier()
    return TrainResult(output, step, start_step, track.final_loss, track.losses, recipe.run.dataset.skipped, seconds,
                       track.step_seconds, peak_mb)


def run_record(kind: str, cfg: TrainingSettings, device: torch.device, track: TrainProgress, start_step: int,
               seconds: float, peak_mb: float, **extra: Any) -> dict[str, Any]:
    """The resource record every recipe writes beside its output (see core.resources.write_resource_record)."""
    return {"kind": kind, "steps": start_step + len(track.step_seconds), "train_seconds": seconds,
            "loop_seconds": sum(track.step_seconds), "resumed_from": start_step, "peak_memory_mb": peak_mb,
            "device": str(device), "mixed_precision": cfg.mixed_precision, "resolution": cfg.resolution,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, **extra}


class TrainProgress:
    """A run's progress bar, per-step losses and timings, and `<output stem>.train_log.csv` (step, loss, lr,
    steps/s, elapsed; mean loss over each logging window), with TensorBoard when asked for. The loss curve is
    drawn from that CSV when the run finishes (trainer.loss_curve)."""

    FIELDS = ("step", "loss", "lr", "steps_per_s", "elapsed_s")

    def __init__(self, output: Path, total: int, start_step: int, log_every: int, desc: str, show: bool,
                 log_with: str = "csv", enabled: bool = True):
        self.total, self.start_step, self.log_every, self.enabled = total, start_step, log_every, enabled
        self.losses: list[float] = []  # per-step loss of this run (mean over processes)
        self.step_seconds: list[float] = []  # wall time of each optimizer step of this run
        self._window: list[float] = []
        self._t0, self._t_step = time.time(), time.perf_counter()
        self.bar = tqdm(total=total, initial=start_step, desc=desc, unit="step", disable=not show)
        self.path = loss_log_path(output)
        self.tb = None
        if not enabled:
            return
        kept = []
        if start_step and self.path.is_file():  # a resumed run: keep the rows up to the resumed step
            with open(self.path, newline="", encoding="utf-8") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        if log_with == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output.parent / f"{output.stem}.tensorboard"))
            except ImportError:
                logger.warning("log_with=tensorboard: the tensorboard package is not installed; logging CSV only")

    def begin_step(self) -> None:
        self._t_step = time.perf_counter()

    def end_step(self, step: int, loss: float, lr: float) -> None:
        """Record optimizer step `step` (1-based): bar, timing, and a CSV row every `log_every` steps."""
        self.step_seconds.append(time.perf_counter() - self._t_step)
        self.losses.append(loss)
        self._window.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.enabled and (step % self.log_every == 0 or step == self.total):
            mean = sum(self._window) / len(self._window)
            rate = len(self.step_seconds) / max(sum(self.step_seconds), 1e-9)
            self.writer.writerow({"step": step, "loss": f"{mean:.6f}", "lr": f"{lr:.3e}",
                                  "steps_per_s": f"{rate:.4f}", "elapsed_s": f"{time.time() - self._t0:.1f}"})
            self.file.flush()
            if self.tb is not None:
                self.tb.add_scalar("train/loss", mean, step)
                self.tb.add_scalar("train/lr", lr, step)
            self._window = []

    @property
    def final_loss(self) -> float:
        """Mean loss of the last logging window's steps (NaN when no step ran)."""
        tail = self.losses[-self.log_every:]
        return sum(tail) / len(tail) if tail else float("nan")

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.file.closed:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
