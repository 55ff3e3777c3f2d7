"""The multi-GPU path (`accelerate launch -m stylora.cli train lora ...`), run as two CPU processes with gloo.

accelerate's `--cpu` with `--num_processes 2` starts a single process unless an MPI hostfile is given, so the
processes are started the way a multi-GPU launch starts them (`--multi_gpu`, torch.distributed.run) with
ACCELERATE_USE_CPU=true, which makes accelerate choose its multi-CPU mode and the gloo backend.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import stylora
import torch
from safetensors.torch import load_file
from stylora.core.lora_file import read_lora
from stylora.trainer.checkpoint import WEIGHTS_FILE, checkpoint_root
from stylora.trainer.config import LoraTrainConfig
from stylora.trainer.lora import train_lora

TRAINER_MODULE = "stylora.cli"  # what `accelerate launch -m` runs

STEPS = 8
SETTINGS = dict(resolution=64, batch_size=1, learning_rate=1e-3, warmup_steps=0, seed=0, min_images=4, log_every=1,
                save_dtype="fp32", checkpoint_every=1, keep_checkpoints=STEPS)


def _free_port() -> int:
    with socket.socket() as s:  # torch.distributed's default port may be taken by another run on this machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, cfg: LoraTrainConfig, *extra: str) -> list[str]:
    args = ["--data", cfg.data, "--base-model", cfg.base_model, "--output", cfg.output, "--steps", str(cfg.steps),
            "--no-progress", *extra]
    for key, value in SETTINGS.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", TRAINER_MODULE, "train", "lora", *args]


def _env() -> dict[str, str]:
    # The processes import this checkout's package, whatever is installed.
    package_parent = str(Path(stylora.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=480)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _logged_losses(output: Path) -> list[float]:
    with open(output.parent / f"{output.stem}.train_log.csv", newline="", encoding="utf-8") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = read_lora(a_path)[0], read_lora(b_path)[0]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def _step_weights(output: str | Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_root(output) / f"step-{step:08d}" / WEIGHTS_FILE))


@pytest.mark.slow
def test_two_processes_write_once_match_one_process_and_resume_after_kill(tiny_model, style_folder, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    cfg = LoraTrainConfig(data=str(style_folder), output=str(runs / "two.safetensors"),
                          base_model=str(tiny_model["diffusers"]), steps=STEPS, **SETTINGS)

    # 1. Two processes, one micro-batch of 1 each: one output, one set of checkpoints, written by the main process.
    done = _run(_launch(2, cfg))
    assert done.stdout.count("Wrote ") == 1, done.stdout
    assert sorted(p.name for p in runs.iterdir()) == ["two.checkpoints", "two.loss_curve.png", "two.resources.json",
                                                      "two.safetensors", "two.train_log.csv"]
    assert sorted(p.name for p in checkpoint_root(cfg.output).iterdir()) == [f"step-{s:08d}" for s in
                                                                             range(1, STEPS + 1)]
    assert json.loads((runs / "two.resources.json").read_text())["processes"] == 2
    assert read_lora(cfg.output)[1]["stylora.steps"] == str(STEPS)

    # 2. One process with 2 accumulation steps trains on the same global batches: micro-batch k of the run (its
    #    images, noise and timesteps) is the same whichever process draws it, and DDP's gradient mean equals
    #    accumulation's. (One process with batch 2 is an equally valid but different sample: its noise is drawn
    #    per micro-batch of 2.) The gradients agree to float round-off, not bit for bit (DDP sums in another
    #    order), and AdamW's first step, lr * g / (|g| + eps), turns round-off in the few near-zero gradient
    #    entries (e.g. the 1x1 mid-block's self-attention q/k, see test_eval) into +-lr steps. So: the first step's
    #    loss is the same, the first update the same except in a few entries (by at most 2 lr), and the losses
    #    stay within 1%.
    one = runs.parent / "one.safetensors"
    train_lora(LoraTrainConfig(**{**cfg.to_dict(), "target_modules": cfg.target_modules, "output": str(one),
                                  "grad_accum": 2}), progress=False)
    two_losses, one_losses = _logged_losses(Path(cfg.output)), _logged_losses(one)
    assert len(two_losses) == len(one_losses) == STEPS
    assert one_losses[0] == pytest.approx(two_losses[0], rel=1e-6)
    assert one_losses == pytest.approx(two_losses, rel=1e-2)
    a, b = _step_weights(one, 1), _step_weights(cfg.output, 1)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff > 1e-5).float().mean() < 0.02 and diff.max() <= 2 * SETTINGS["learning_rate"] + 1e-6

    # 3. kill -9 the whole launch (launcher and both workers) after the first checkpoint; --resume continues it.
    killed = LoraTrainConfig(**{**cfg.to_dict(), "target_modules": cfg.target_modules,
                                "output": str(runs.parent / "killed.safetensors")})
    proc = subprocess.Popen(_launch(2, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
                            start_new_session=True)
    marker = checkpoint_root(killed.output) / "step-00000002" / "COMPLETE"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-3000:]}"
    # The launcher starts its workers in process groups of their own: kill the whole tree, or orphaned workers
    # would finish the run behind the test's back.
    launcher = psutil.Process(proc.pid)
    tree = [*launcher.children(recursive=True), launcher]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=60)
    proc.wait()
    proc.stderr.close()
    assert not Path(killed.output).exists()
    resumed = _run(_launch(2, killed, "--resume"))
    assert resumed.stdout.count("Resumed from step ") == 1, resumed.stdout
    _assert_same_weights(Path(killed.output), Path(cfg.output))
    assert _logged_losses(Path(killed.output)) == pytest.approx(two_losses, rel=1e-6)
