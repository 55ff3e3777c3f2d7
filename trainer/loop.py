"""The one training loop both trainers run: accelerate set-up, optimizer and LR schedule, the step loop with
progress, periodic checkpoints and a checkpoint on Ctrl-C, and the resource record at the end.

Each trainer supplies what differs: a micro-step callable (one micro-batch -> its loss) and a callable that
writes its output file. Noise, timesteps and batches are drawn from generators seeded by the micro-step index,
so a resumed run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import csv
import logging
import time
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
from .checkpoint import RunCheckpoints, check_finite
from .loss_curve import loss_log_path, write_loss_curve

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
    output: Path  # the written LoRA file
    steps: int  # optimizer steps completed in total (including resumed ones)
    resumed_from: int  # step the run resumed from (0: fresh start)
    final_loss: float  # mean loss over the last logging window
    losses: list[float] = field(default_factory=list)  # per-step loss of this run (mean over processes)
    skipped: list[Skipped] = field(default_factory=list)  # data files not used, with reasons
    seconds: float = 0.0  # wall time of this run
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step of this run
    peak_memory_mb: float = 0.0  # CUDA peak allocated, or the process's peak RSS on CPU


def release_accelerator_state() -> None:
    """Forget the accelerator settings of an earlier `train_lora` in this process (a second style, a ComfyUI
    session), so this run may choose another mixed precision. accelerate keeps them in class-level singletons
    that refuse a changed setting; its own test-suite clears them the same way between runs. The distributed
    process state (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def add_lora_adapters(unet: torch.nn.Module, cfg: Any) -> None:
    """LoRA adapters (rank `cfg.rank`, scale alpha/rank, Gaussian init seeded by `cfg.seed`) on the UNet layers
    `cfg.target_modules`; the trainable weights stay fp32 under mixed precision (diffusers' recipe)."""
    torch.manual_seed(cfg.seed)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.target_modules)))
    if cfg.mixed_precision != "no":
        cast_training_params(unet, dtype=torch.float32)


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


def optimizer_and_schedule(accelerator: Accelerator, params: list[torch.nn.Parameter], cfg: Any, lr: float
                           ) -> tuple[torch.optim.Optimizer, Any]:
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


def optimizer_step(accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, lr_schedule,
                   max_grad_norm: float) -> None:
    """Backward; on the last micro-batch of an accumulation (accelerate decides) clip, step, advance the LR."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)


def train_steps(accelerator: Accelerator, model: torch.nn.Module, params: list[torch.nn.Parameter], optimizer,
                lr_schedule, checkpoints: RunCheckpoints, track: TrainProgress, cfg: Any, start_step: int,
                micro_step: Callable[[int, torch.Generator], torch.Tensor],
                after_step: Callable[[int], None] | None = None) -> int:
    """Run optimizer steps `start_step`..`cfg.steps` and return the last step reached.

    Each optimizer step is `cfg.grad_accum` micro-steps; `micro_step(index, g)` returns the loss (a scalar tensor)
    of micro-batch `index` (global across processes) with all its randomness drawn from `g`. A checkpoint is
    written every `cfg.checkpoint_every` steps and when interrupted (Ctrl-C, or StopTraining raised by `after_step`),
    so `--resume` loses nothing.
    """
    step = start_step
    try:
        while step < cfg.steps:
            track.begin_step()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                index = (step * cfg.grad_accum + micro) * accelerator.num_processes + accelerator.process_index
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
                with accelerator.accumulate(model):
                    loss = micro_step(index, g)
                    if not torch.isfinite(loss.detach()).all():  # before backward: the weights stay as they were
                        kept = checkpoints.last_saved or "none written yet"
                        raise TrainingDiverged(
                            f"training diverged: the loss is {loss.detach().item()} at step {step + 1}; nothing "
                            f"written (last good checkpoint: {kept}). Lower --learning-rate or --noise-offset, "
                            "keep --max-grad-norm > 0, then --resume")
                    optimizer_step(accelerator, loss, params, optimizer, lr_schedule, cfg.max_grad_norm)
                # The mean over processes: the loss of the global batch, whatever the process count.
                step_loss += accelerator.reduce(loss.detach(), "mean").item() / cfg.grad_accum
            step += 1
            track.end_step(step, step_loss, lr_schedule.get_last_lr()[0])
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoints.save(step)
            if after_step is not None:
                after_step(step)
    except (KeyboardInterrupt, StopTraining):
        if step > start_step:
            checkpoints.save(step)
            logger.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
        raise
    finally:
        track.close()
    return step


def finish_run(accelerator: Accelerator, checkpoints: RunCheckpoints, track: TrainProgress, cfg: Any, kind: str,
               start_step: int, step: int, t_start: float, skipped: list[Skipped],
               write_output: Callable[[float, float], None], **extra: Any) -> TrainResult:
    """Write the trained output (`write_output(seconds, peak_mb)`, main process only), its resource record and its
    loss-curve plot, then a last checkpoint for reference (every process: it ends on a barrier)."""
    accelerator.wait_for_everyone()
    output = Path(cfg.output)
    peak_mb = peak_memory_mb(accelerator.device)
    seconds = time.time() - t_start
    if accelerator.is_main_process:
        check_finite(checkpoints.weights(), f"--output {output}")
        write_output(seconds, peak_mb)
        write_resource_record(output, run_record(kind, cfg, accelerator.device, track, start_step, seconds, peak_mb,
                                                 processes=accelerator.num_processes, **extra))
        if track.enabled:
            write_loss_curve(output, f"{kind}: {output.name}")
        logger.info("wrote %s (%d steps)", output, step)
    if cfg.checkpoint_every:
        checkpoints.save(step)
    checkpoints.drop_earlier()
    return TrainResult(output, step, start_step, track.final_loss, track.losses, skipped, seconds,
                       track.step_seconds, peak_mb)


def run_record(kind: str, cfg: Any, device: torch.device, track: TrainProgress, start_step: int, seconds: float,
               peak_mb: float, **extra: Any) -> dict[str, Any]:
    """The resource record both trainers write beside their output (see core.resources.write_resource_record)."""
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
