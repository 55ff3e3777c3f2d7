"""Resumable training checkpoints, written so that a crash or `kill -9` never leaves a half one in use.

<output stem>.checkpoints/
    step-00000500/         complete: renamed into place only after every file and COMPLETE were written
        trainable.safetensors   the trained weights: LoRA adapters (peft keys) or a whole UNet
        state.pt              optimizer and LR-schedule state (loaded with weights_only=True)
        info.json             step, config, dataset fingerprint
        COMPLETE              marker
    .step-00001000.tmp-123  an interrupted write: ignored, removed on the next save
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

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


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    info: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint `step` into a temporary folder, mark it complete, rename it into place, prune old ones."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
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
    for _, old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trained weights, optimizer/schedule state, info) of a complete checkpoint folder."""
    from safetensors.torch import load_file

    if not (folder / MARKER).is_file():
        raise ValueError(f"{folder}: incomplete checkpoint (no {MARKER} marker)")
    weights = load_file(str(folder / "trainable.safetensors"))
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
    return weights, state, info


def start_or_resume(output: Path, resume: bool, overwrite: bool) -> tuple[int, Path] | None:
    """The checkpoint to resume from (None: a fresh run). Refuses to replace an earlier run's output or
    checkpoints unless `overwrite`; with `overwrite`, clears that run's checkpoints."""
    ckpt_root = checkpoint_root(output)
    if resume:
        found = latest_checkpoint(ckpt_root)
        if found is None:
            logger.warning("--resume: no complete checkpoint in %s, starting from step 0", ckpt_root)
        return found
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output {output} already exists; pass --overwrite to replace it")
    if complete_checkpoints(ckpt_root) and not overwrite:
        raise FileExistsError(f"{ckpt_root} holds checkpoints of an earlier run; pass --resume to continue it "
                              "or --overwrite to start again")
    if overwrite and ckpt_root.is_dir():  # a later --resume must not pick up the replaced run's steps
        shutil.rmtree(ckpt_root, ignore_errors=True)  # every process of a multi-GPU run clears it at once
    return None


def check_resumable(cfg: Any, info: dict[str, Any], fingerprint: str, folder: Path,
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

    def save(self, step: int) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.root, step, self.weights(),
                            {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_schedule.state_dict()},
                            self.info, keep=self.keep)
        self.accelerator.wait_for_everyone()

    def restore(self, folder: Path, cfg: Any, invariants: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Check `folder` belongs to this run (settings and images), restore optimizer and schedule, and return
        the trained weights for the caller to load."""
        weights, state, info = load_checkpoint(folder)
        check_resumable(cfg, info, self.info["dataset_fingerprint"], folder, invariants)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_scheduler"])
        logger.info("resumed from %s", folder)
        return weights

    def resume(self, found: tuple[int, Path] | None, cfg: Any, invariants: tuple[str, ...],
               load_weights: Callable[[dict[str, torch.Tensor]], None], show: bool) -> int:
        """The step to start from: 0 for a fresh run (`found` None), else the checkpoint's step after restoring
        it (`load_weights` puts the trained weights back into the model)."""
        if found is None:
            return 0
        step, folder = found
        load_weights(self.restore(folder, cfg, invariants))
        if show:
            tqdm.write(f"Resuming from step {step} of {cfg.steps} ({folder})")
        return step
