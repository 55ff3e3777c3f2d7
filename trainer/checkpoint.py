"""Resumable training checkpoints, written so that a crash or `kill -9` never leaves a half one in use.

<output stem>.checkpoints/
    step-00000500/         complete: renamed into place only after every file and COMPLETE were written
        trainable.weights     the trained weights (safetensors format): LoRA adapters (peft keys) or a whole UNet
        optimizer.state       optimizer and LR-schedule state (torch format, loaded with weights_only=True)
        info.json             step, config, dataset fingerprint
        COMPLETE              marker
    .step-00001000.tmp-123  an interrupted write: ignored, removed on the next save

The two files' names end outside ComfyUI's model extensions (.safetensors, .pt, .ckpt, .bin, .pth, .sft, ...):
ComfyUI lists every such file under a models folder recursively, so a run whose --output is in
ComfyUI/models/loras would otherwise add its checkpoints to the LoRA list. Checkpoints written by earlier
versions (trainable.safetensors, state.pt) are still read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import TrainingSettings

logger = logging.getLogger(__name__)

WEIGHTS_FILE, STATE_FILE = "trainable.weights", "optimizer.state"
_OLD_NAMES = {WEIGHTS_FILE: "trainable.safetensors", STATE_FILE: "state.pt"}  # before the rename above
_STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = "COMPLETE"


def checkpoint_root(output: str | Path) -> Path:
    output = Path(output)
    return output.parent / f"{output.stem}.checkpoints"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first; incomplete ones are logged and skipped."""
    found = []
    if not root.is_dir():
        return found
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if not m or not d.is_dir():
            continue
        if (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
        else:
            logger.warning("skipping incomplete checkpoint %s (no %s marker)", d, MARKER)
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `weights` holding NaN or inf."""
    return [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(weights: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write NaN/inf weights: a diverged run must not leave a file that loads and draws noise."""
    bad = non_finite(weights)
    if bad:
        raise FloatingPointError(f"{what}: {len(bad)} trained tensor(s) hold NaN or inf (e.g. {bad[0]}); "
                                 "not written")


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    info: dict[str, Any], keep: int = 3, replace_all: bool = False) -> Path:
    """Write checkpoint `step` into a temporary folder, mark it complete, rename it into place, prune old ones.
    `replace_all`: afterwards remove every other checkpoint folder (an earlier run's, under --overwrite)."""
    from safetensors.torch import save_file

    check_finite(weights, f"checkpoint step {step}")
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
    torch.save(state, tmp / STATE_FILE)
    (tmp / "info.json").write_text(json.dumps({"step": step, **info}, indent=2), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / MARKER).write_text(f"{step}\n", encoding="utf-8")
    _fsync_dir(tmp)
    final = root / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if replace_all:
        for old in root.iterdir():
            if old != final and _STEP_DIR.match(old.name) and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


class DamagedCheckpoint(ValueError):
    """A checkpoint folder whose files cannot be read back (truncated, unparsable, NaN/inf, not fitting)."""


def _file_name(folder: Path, new: str) -> str:
    """The name of file `new` in `folder`: `new`, or its name before the rename when only that one is there."""
    return new if (folder / new).exists() or not (folder / _OLD_NAMES[new]).exists() else _OLD_NAMES[new]


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trained weights, optimizer/schedule state, info) of a complete checkpoint folder. A ValueError names the
    folder and the damaged file (truncated, unparsable, NaN/inf weights, a step that does not match)."""
    from safetensors.torch import load_file

    if not (folder / MARKER).is_file():
        raise DamagedCheckpoint(f"{folder}: incomplete checkpoint (no {MARKER} marker)")
    name = _file_name(folder, WEIGHTS_FILE)
    try:
        weights = load_file(str(folder / name))
        check_finite(weights, str(folder / name))
        name = _file_name(folder, STATE_FILE)
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"optimizer", "lr_scheduler"} <= set(state):
            raise ValueError("no optimizer and lr_scheduler state in it")
        name = "info.json"
        info = json.loads((folder / name).read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            raise ValueError("no step number in it")
    except Exception as e:  # safetensors, torch.load and json each raise their own types for a damaged file
        raise DamagedCheckpoint(f"{folder / name}: damaged ({type(e).__name__}: {str(e)[:200]})") from e
    return weights, state, info


@dataclass
class RunStart:
    """How a run starts: the checkpoints to try resuming from (newest first; empty for a fresh run), and whether an
    earlier run's checkpoints are replaced once this run writes its first one (--overwrite)."""

    candidates: list[tuple[int, Path]] = field(default_factory=list)
    replace_earlier: bool = False


def check_output_path(output: Path, flag: str = "--output") -> None:
    """Fail now, not after hours of training, when `output` cannot be written: a folder in its place, or a parent
    folder that is not a folder or not writable."""
    if output.is_dir():
        raise IsADirectoryError(f"{flag} {output} is a folder; give a file path such as {output / 'style.safetensors'}")
    parent = output.parent
    while not parent.exists() and parent != parent.parent:  # the first existing ancestor is where mkdir starts
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {output}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {output}: the folder {parent} is not writable; choose another --output "
                              "or fix its permissions")
    if output.exists() and not os.access(output, os.W_OK) and not os.access(output.parent, os.W_OK):
        raise PermissionError(f"{flag} {output} is not writable")


def start_or_resume(output: Path, resume: bool, overwrite: bool, steps: int | None = None) -> RunStart:
    """How the run at `output` starts. Deletes nothing: an earlier run's checkpoints are replaced only when this
    run writes its first checkpoint (or its output), after its data and base model were loaded.

    Refuses to replace an earlier run's output or checkpoints unless `overwrite`; `resume` never replaces a
    finished output (one whose run has no checkpoint left below `steps`)."""
    check_output_path(output)
    ckpt_root = checkpoint_root(output)
    if ckpt_root.exists() and not ckpt_root.is_dir():
        raise NotADirectoryError(f"{ckpt_root} (where --output's checkpoints go) is a file; move it away")
    done = complete_checkpoints(ckpt_root)
    if resume:
        finished = not done or (steps is not None and done[-1][0] >= steps)
        if output.exists() and finished:
            raise FileExistsError(f"--output {output} is already finished (no checkpoint of an unfinished run in "
                                  f"{ckpt_root}); nothing to resume. Pass --overwrite instead of --resume to "
                                  "train it again, or choose another --output")
        if output.exists() and not overwrite:
            raise FileExistsError(f"--output {output} exists and the checkpoints in {ckpt_root} would replace it "
                                  "when the resumed run finishes; pass --resume --overwrite to allow that")
        if not done:
            logger.warning("--resume: no complete checkpoint in %s, starting from step 0", ckpt_root)
        return RunStart(candidates=done[::-1])
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output {output} already exists; pass --overwrite to replace it")
    if done and not overwrite:
        raise FileExistsError(f"{ckpt_root} holds checkpoints of an earlier run; pass --resume to continue it "
                              "or --overwrite to start again")
    return RunStart(replace_earlier=overwrite and ckpt_root.is_dir())


def check_resumable(cfg: TrainingSettings, info: dict[str, Any], fingerprint: str, folder: Path,
                    invariants: tuple[str, ...]) -> None:
    """Refuse to resume when settings that change what is trained, or the images, differ from the checkpoint's."""
    saved = info.get("config", {})
    now = cfg.to_dict()
    changed = [k for k in invariants if k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume: settings differ from the run in {folder} ({detail}); "
                         "use the same settings, or start a new run with --overwrite")
    if info.get("dataset_fingerprint") != fingerprint:
        raise ValueError(f"--resume: the images in {cfg.data} changed since {folder} was written; "
                         "restore them or start a new run with --overwrite")


class RunCheckpoints:
    """The resumable checkpoints of one run: the trained weights (whatever `weights()` returns), the optimizer's
    and the LR schedule's state. `save` writes on the main process and ends on a barrier for every process."""

    def __init__(self, accelerator, output: Path, weights, optimizer, lr_schedule, info: dict[str, Any], keep: int):
        self.accelerator, self.root, self.weights = accelerator, checkpoint_root(output), weights
        self.optimizer, self.lr_schedule, self.info, self.keep = optimizer, lr_schedule, info, keep
        self.replace_earlier = False  # set by `resume` from the RunStart (--overwrite of an earlier run)
        self.last_saved: Path | None = None

    def save(self, step: int) -> None:
        if self.accelerator.is_main_process:
            self.last_saved = save_checkpoint(
                self.root, step, self.weights(),
                {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_schedule.state_dict()},
                self.info, keep=self.keep, replace_all=self.replace_earlier)
            self.replace_earlier = False
        self.accelerator.wait_for_everyone()

    def drop_earlier(self) -> None:
        """At the end of a run that wrote no checkpoint: remove the replaced run's, so a later --resume cannot
        pick up its steps."""
        if self.replace_earlier and self.accelerator.is_main_process and self.root.is_dir():
            shutil.rmtree(self.root)
        self.replace_earlier = False

    def restore(self, folder: Path, cfg: TrainingSettings, invariants: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Check `folder` belongs to this run (settings and images), restore optimizer and schedule, and return
        the trained weights for the caller to load."""
        weights, state, info = load_checkpoint(folder)
        check_resumable(cfg, info, self.info["dataset_fingerprint"], folder, invariants)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_schedule.load_state_dict(state["lr_scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise DamagedCheckpoint(f"{folder / STATE_FILE}: optimizer state does not fit ({e})") from e
        logger.info("resumed from %s", folder)
        return weights

    def resume(self, start: RunStart, cfg: TrainingSettings, invariants: tuple[str, ...],
               load_weights: Callable[[dict[str, torch.Tensor]], None], show: bool) -> int:
        """The step to start from: 0 for a fresh run, else the step of the newest intact checkpoint after restoring
        it (`load_weights` puts the trained weights back into the model). A damaged checkpoint is logged with the
        reason and the next older one is tried; one from different settings or images is an error."""
        self.replace_earlier = start.replace_earlier
        for step, folder in start.candidates:
            try:
                load_weights(self.restore(folder, cfg, invariants))
            except DamagedCheckpoint as e:
                logger.warning("--resume: skipping checkpoint step %d: %s", step, e)
                continue
            except (RuntimeError, KeyError) as e:  # weights whose names or shapes do not fit the model
                logger.warning("--resume: skipping checkpoint step %d (%s): its weights do not fit the model (%s)",
                               step, folder, str(e)[:200])
                continue
            if show:
                tqdm.write(f"Resuming from step {step} of {cfg.steps} ({folder})")
            return step
        if start.candidates:
            logger.warning("--resume: no intact checkpoint in %s; starting from step 0", self.root)
        return 0
