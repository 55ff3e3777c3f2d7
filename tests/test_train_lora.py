"""The style-LoRA trainer on a tiny SD1.5-shaped model: it learns, it writes a standard file, it resumes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from stylora.core.lora_file import kohya_modules, read_lora
from stylora.trainer.checkpoint import checkpoint_root
from stylora.trainer.config import LoraTrainConfig
from stylora.trainer.loop import Recipe
from stylora.trainer.lora import train_lora

TRAIN = dict(resolution=64, batch_size=2, learning_rate=1e-3, warmup_steps=0, log_every=5, seed=0, min_images=4)


def _pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(tiny_model["diffusers"]), safety_checker=None,
                                                   requires_safety_checker=False)


def _fixed_batch(pipe, style_folder, n=4, seed=123):
    """Latents of the training images with fixed noise and timesteps: a loss that does not jitter."""
    from stylora.trainer.dataset import load_style_dataset

    ds = load_style_dataset(style_folder, resolution=64, min_images=1)
    x = torch.stack(ds.pixels[:n]).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([""] * n, padding="max_length", max_length=77, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(50, 950, (n,), generator=g)
    return latents, noise, t, cond


def _denoise_loss(pipe, batch):
    from diffusers import DDPMScheduler

    latents, noise, t, cond = batch
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pred = pipe.unet(sched.add_noise(latents, noise, t), t, cond).sample
    return torch.nn.functional.mse_loss(pred, noise).item()


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A LoRA trained for 20 steps on six texture 'paintings'."""
    from conftest import skimage_textures

    root = tmp_path_factory.mktemp("trained")
    style = root / "style"
    style.mkdir()
    for name, arr in skimage_textures().items():
        Image.fromarray(arr).resize((96, 96), Image.Resampling.LANCZOS).save(style / f"{name}.png")
    # A high constant learning rate: 20 steps must move a random tiny UNet measurably.
    cfg = LoraTrainConfig(data=str(style), output=str(root / "style.safetensors"),
                          base_model=str(tiny_model["diffusers"]), steps=20, checkpoint_every=0,
                          **{**TRAIN, "learning_rate": 1e-2, "lr_scheduler": "constant"})
    result = train_lora(cfg, progress=False)
    return {"cfg": cfg, "result": result, "style": style, "path": root / "style.safetensors"}


def test_twenty_steps_lower_the_loss(trained, tiny_model):
    pipe = _pipe(tiny_model)
    batch = _fixed_batch(pipe, trained["style"])
    before = _denoise_loss(pipe, batch)
    pipe.load_lora_weights(str(trained["path"]), adapter_name="style")
    after = _denoise_loss(pipe, batch)
    assert after < before * 0.98, (before, after)
    assert trained["result"].steps == 20 and len(trained["result"].losses) == 20


def test_lora_changes_output_and_scale_zero_restores_base(trained, tiny_model):
    pipe = _pipe(tiny_model)
    latents, noise, t, cond = _fixed_batch(pipe, trained["style"], n=2)
    with torch.no_grad():
        base = pipe.unet(latents, t, cond).sample
        pipe.load_lora_weights(str(trained["path"]), adapter_name="style")
        styled = pipe.unet(latents, t, cond).sample
        pipe.set_adapters(["style"], adapter_weights=[0.0])
        zero = pipe.unet(latents, t, cond).sample
    assert (styled - base).abs().max() > 1e-3
    torch.testing.assert_close(zero, base, rtol=0, atol=1e-6)


def test_kohya_file_round_trips_through_diffusers_with_every_key_used(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    state, meta = read_lora(trained["path"])
    modules = kohya_modules(state)
    assert len(modules) == 128  # 16 transformer blocks x 2 attentions x (q, k, v, out)
    assert all(k.startswith("lora_unet_") for k in state)
    assert all(set(m) == {"down", "up", "alpha"} for m in modules.values())
    converted, alphas = StableDiffusionPipeline.lora_state_dict(str(trained["path"]))
    assert len(converted) == 2 * len(modules)  # every down/up pair converted, nothing dropped

    pipe = _pipe(tiny_model)
    pipe.load_lora_weights(str(trained["path"]), adapter_name="style")
    loaded = {name: m for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "style" in m.lora_A}
    assert len(loaded) == len(modules)
    for name, module in loaded.items():
        file_module = modules["lora_unet_" + name.replace(".", "_")]
        rank = file_module["down"].shape[0]
        expected = file_module["up"].float() @ file_module["down"].float() * (file_module["alpha"].float() / rank)
        got = module.lora_B["style"].weight @ module.lora_A["style"].weight * module.scaling["style"]
        torch.testing.assert_close(got.float(), expected, rtol=1e-3, atol=1e-5)


def test_metadata_describes_the_file(trained, tiny_model):
    from stylora.core.lora_file import describe

    _, meta = read_lora(trained["path"])
    # Local paths by name only (a shared file must not carry the trainer's folders); the images and the base model
    # are identified by the dataset fingerprint and the base model's sha256.
    assert meta["stylora.base_model"] == tiny_model["diffusers"].name
    config = json.loads(meta["stylora.config"])
    assert (config["data"], config["output"], config["base_model"]) == ("style", "style.safetensors", "diffusers")
    assert not [k for k, v in meta.items() if "/tmp" in v or str(trained["style"].parent) in v]
    assert len(meta["stylora.base_model_sha256"]) == 64
    assert meta["stylora.rank"] == "4" and meta["stylora.alpha"] == "4.0"
    assert meta["stylora.resolution"] == "64" and meta["stylora.steps"] == "20"
    assert meta["stylora.dataset_size"] == "6" and len(meta["stylora.dataset_fingerprint"]) == 64
    assert json.loads(meta["stylora.loss_weights"])["mse"] == 1.0
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["stylora.config"])["steps"] == 20
    assert "stylora.version" in meta and "stylora.trigger" in meta
    text = describe(trained["path"])
    assert "128 modules, rank 4" in text and "stylora.base_model_sha256" in text
    assert trained["path"].stat().st_size < 1_000_000


def test_single_file_base_model_trains(tiny_model, style_folder, tmp_path):
    from stylora.trainer.base_model import file_sha256

    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "sf.safetensors"),
                          base_model=str(tiny_model["single_file"]), base_config=str(tiny_model["config"]),
                          steps=2, checkpoint_every=0, **TRAIN)
    train_lora(cfg, progress=False)
    _, meta = read_lora(tmp_path / "sf.safetensors")
    assert meta["stylora.base_model_sha256"] == file_sha256(tiny_model["single_file"])
    assert len(meta["ss_sd_model_hash"]) == 8


def test_broken_files_are_reported_and_training_goes_on(tiny_model, style_folder, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (9, 9, 9)).save(buf, "JPEG")
    (style_folder / "truncated.jpg").write_bytes(buf.getvalue()[:150])
    Image.new("CMYK", (96, 96), (0, 255, 0, 0)).save(style_folder / "magenta.tif")
    (style_folder / "readme.doc").write_bytes(b"\0\1")
    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "b.safetensors"),
                          base_model=str(tiny_model["diffusers"]), steps=2, checkpoint_every=0, **TRAIN)
    result = train_lora(cfg, progress=False)
    assert {s.path for s in result.skipped} == {"truncated.jpg", "readme.doc"}
    assert read_lora(tmp_path / "b.safetensors")[1]["stylora.dataset_size"] == "7"  # 6 textures + the CMYK TIFF


def test_all_broken_folder_fails_clearly(tiny_model, tmp_path):
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    cfg = LoraTrainConfig(data=str(data), output=str(tmp_path / "x.safetensors"),
                          base_model=str(tiny_model["diffusers"]), steps=2, **TRAIN)
    with pytest.raises(ValueError, match=r"only 0 usable image\(s\), at least 4 needed \(3 skipped: 0.jpg"):
        train_lora(cfg, progress=False)
    assert not (tmp_path / "x.safetensors").exists()


def test_existing_output_is_not_overwritten(trained):
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_lora(trained["cfg"], progress=False)


def test_resume_after_kill_gives_full_step_count_and_same_weights(tiny_model, style_folder, tmp_path):
    """kill -9 a real training process after its step-10 checkpoint, resume, compare with an unbroken run. 100
    steps leave seconds between that checkpoint and the run's end, for a loaded machine's delays."""
    steps = 100
    args = ["--data", str(style_folder), "--base-model", str(tiny_model["diffusers"]), "--steps", str(steps),
            "--resolution", "64", "--batch-size", "2", "--learning-rate", "1e-3", "--warmup-steps", "0",
            "--checkpoint-every", "10", "--seed", "0", "--min-images", "4", "--no-progress"]
    out = tmp_path / "killed.safetensors"
    cmd = [sys.executable, "-m", "stylora.cli", "train", "lora", *args, "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    marker = checkpoint_root(out) / "step-00000010" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # A half-written checkpoint from the crash must be skipped, not loaded.
    (checkpoint_root(out) / "step-00000099").mkdir()

    cfg = LoraTrainConfig(data=str(style_folder), output=str(out), base_model=str(tiny_model["diffusers"]),
                          steps=steps, checkpoint_every=10, **TRAIN)
    resumed = train_lora(cfg, resume=True, progress=False)
    assert resumed.resumed_from >= 10 and resumed.resumed_from % 10 == 0
    assert resumed.steps == steps
    assert read_lora(out)[1]["stylora.steps"] == str(steps)

    whole = train_lora(LoraTrainConfig(**{**cfg.to_dict(), "target_modules": cfg.target_modules,
                                          "output": str(tmp_path / "whole.safetensors"), "checkpoint_every": 0}),
                       progress=False)
    assert whole.steps == steps
    a, _ = read_lora(out)
    b, _ = read_lora(tmp_path / "whole.safetensors")
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4)
    rows = (tmp_path / "killed.train_log.csv").read_text().splitlines()
    assert rows[-1].startswith(f"{steps},")


def _sigint_as_at_a_terminal() -> None:
    """In the child before exec: Ctrl-C's default action. A shell that starts a job in the background (`cmd &`,
    nohup) makes it ignore SIGINT, and children inherit that, so under such a test runner the run would not see
    the signal this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_log_step(proc: subprocess.Popen, log, step: int, output) -> None:
    """Wait (at most 240 s) until training `proc` has logged optimizer step `step` in its CSV `log`."""
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        rows = log.read_text().splitlines()[1:] if log.is_file() else []
        if any(r.split(",")[0] == str(step) for r in rows):
            return
        time.sleep(0.02)
    raise AssertionError(f"waited for step {step} in {log}: the run " + (
        f"ended with {proc.poll()}: {output.read_text()[-2000:]}" if proc.poll() is not None else "timed out"))


def test_ctrl_c_writes_a_checkpoint_that_resume_continues_from(tiny_model, style_folder, tmp_path):
    """SIGINT (Ctrl-C) a real `stylora train lora` mid-run: it exits 130 with a checkpoint of the last completed
    step, although --checkpoint-every 0 writes none on its own; `--resume` restores that checkpoint and goes on
    from the step after it (stopped by a second Ctrl-C, which saves a later checkpoint).

    The run is far too long to finish (100000 steps), so however long a loaded machine keeps this test process
    waiting, the signal lands inside the training loop. Finishing a resumed run is pinned by the kill -9 test."""
    steps = 100_000
    out = tmp_path / "stopped.safetensors"
    cmd = [sys.executable, "-m", "stylora.cli", "train", "lora", "--data", str(style_folder), "--output", str(out),
           "--base-model", str(tiny_model["diffusers"]), "--steps", str(steps), "--resolution", "64",
           "--batch-size", "1", "--warmup-steps", "0", "--checkpoint-every", "0", "--log-every", "1",
           "--min-images", "4", "--rank", "1"]
    log, printed = tmp_path / "stopped.train_log.csv", tmp_path / "printed.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(printed, "w") as sink:
        proc = subprocess.Popen([*cmd, "--no-progress"], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_sigint_as_at_a_terminal)
        try:
            _wait_for_log_step(proc, log, 1, printed)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130
        finally:
            proc.kill()
    assert "interrupted" in printed.read_text()
    assert not out.exists()
    saved = [int(d.name.split("-")[1]) for d in checkpoint_root(out).glob("step-*") if (d / "COMPLETE").is_file()]
    assert len(saved) == 1 and saved[0] >= 1
    first_rows = log.read_text().splitlines()

    # The resumed run says where it starts (its progress on) and logs the step after the checkpoint next.
    with open(printed, "w") as sink:
        proc = subprocess.Popen([*cmd, "--resume"], stdout=sink, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_sigint_as_at_a_terminal)
        try:
            _wait_for_log_step(proc, log, saved[0] + 1, printed)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130
        finally:
            proc.kill()
    assert f"Resuming from step {saved[0]} of {steps}" in printed.read_text()
    later = [int(d.name.split("-")[1]) for d in checkpoint_root(out).glob("step-*") if (d / "COMPLETE").is_file()]
    assert max(later) > saved[0]
    logged = [int(r.split(",")[0]) for r in log.read_text().splitlines()[1:]]
    assert logged == list(range(1, logged[-1] + 1)) and logged[-1] > saved[0]
    assert log.read_text().splitlines()[:len(first_rows)] == first_rows  # the first run's rows kept as they were


def test_resume_refuses_changed_settings(tiny_model, style_folder, tmp_path):
    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "r.safetensors"),
                          base_model=str(tiny_model["diffusers"]), steps=4, checkpoint_every=2, **TRAIN)
    train_lora(cfg, progress=False)
    cfg_output = tmp_path / "r.safetensors"
    cfg_output.unlink()  # a run killed after its last checkpoint: checkpoints, no output
    changed = LoraTrainConfig(**{**cfg.to_dict(), "target_modules": cfg.target_modules, "rank": 8, "steps": 4})
    with pytest.raises(ValueError, match="rank: 4 -> 8"):
        train_lora(changed, resume=True, progress=False)


def test_overwrite_clears_the_replaced_runs_checkpoints(tiny_model, style_folder, tmp_path):
    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "o.safetensors"),
                          base_model=str(tiny_model["diffusers"]), steps=4, checkpoint_every=2, **TRAIN)
    train_lora(cfg, progress=False)
    assert (checkpoint_root(cfg.output) / "step-00000004").is_dir()
    shorter = LoraTrainConfig(**{**cfg.to_dict(), "target_modules": cfg.target_modules, "steps": 2,
                                 "checkpoint_every": 0})
    train_lora(shorter, overwrite=True, progress=False)
    assert not (checkpoint_root(cfg.output) / "step-00000004").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_lora(cfg, progress=False)


def test_buckets_flip_uncached_latents_accumulation_and_bf16(tiny_model, tmp_path):
    """The less-travelled options together: aspect buckets, mirrored copies, per-step VAE encoding,
    gradient accumulation and bf16 autocast."""
    from conftest import skimage_photos

    data = tmp_path / "mixed"
    data.mkdir()
    for i, (name, arr) in enumerate(skimage_photos().items()):
        img = Image.fromarray(arr)
        size = (160, 96) if i % 2 else (96, 160)  # landscape and portrait
        img.resize(size, Image.Resampling.LANCZOS).save(data / f"{name}.png")
        img.resize(size[::-1], Image.Resampling.LANCZOS).save(data / f"{name}-turned.png")
    cfg = LoraTrainConfig(data=str(data), output=str(tmp_path / "m.safetensors"),
                          base_model=str(tiny_model["diffusers"]),
                          steps=3, checkpoint_every=0, crop="buckets", flip=True, cache_latents=False, grad_accum=2,
                          mixed_precision="bf16", **{**TRAIN, "resolution": 192})
    result = train_lora(cfg, progress=False)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    from stylora.trainer.dataset import load_style_dataset

    buckets = load_style_dataset(data, 192, crop="buckets", min_images=1).buckets
    assert len(buckets) == 2 and all(h != w for h, w in buckets)
    _, meta = read_lora(tmp_path / "m.safetensors")
    assert meta["ss_enable_bucket"] == "True" and meta["ss_mixed_precision"] == "bf16"


def test_previews_are_written_during_training(tiny_model, style_folder, tmp_path):
    from conftest import skimage_photos

    content = tmp_path / "content"
    content.mkdir()
    for name, arr in list(skimage_photos().items())[:2]:
        Image.fromarray(arr).save(content / f"{name}.png")
    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "p.safetensors"),
                          base_model=str(tiny_model["diffusers"]), steps=2, checkpoint_every=0, preview_every=2,
                          preview_content=str(content), preview_steps=2, **TRAIN)
    train_lora(cfg, progress=False)
    preview = tmp_path / "p.previews" / "step-00000002.png"
    assert preview.is_file()
    assert Image.open(preview).size == (2 * 64, 2 * 64)  # two columns of (content over styled)


# ComfyUI's model extensions (folder_paths.supported_pt_extensions): every such file under a models folder is
# listed in its dropdowns, recursively.
COMFYUI_MODEL_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


def test_training_into_a_comfyui_models_folder_adds_only_the_lora_to_its_lists(tiny_model, style_folder, tmp_path):
    loras = tmp_path / "ComfyUI" / "models" / "loras"
    out = loras / "x.safetensors"
    cfg = LoraTrainConfig(data=str(style_folder), output=str(out), base_model=str(tiny_model["diffusers"]),
                          steps=2, checkpoint_every=1, **TRAIN)
    train_lora(cfg, progress=False)

    def listed() -> list[str]:
        return sorted(str(p.relative_to(loras)) for p in loras.rglob("*")
                      if p.is_file() and p.suffix.lower() in COMFYUI_MODEL_EXTENSIONS)

    assert (checkpoint_root(out) / "step-00000002" / "COMPLETE").is_file()  # the checkpoints are there...
    assert listed() == ["x.safetensors"]  # ...but only the LoRA is in ComfyUI's list
    out.unlink()  # as if killed after the last checkpoint: --resume still finds them
    resumed = train_lora(cfg, resume=True, progress=False)
    assert resumed.resumed_from == 2 and listed() == ["x.safetensors"]


def test_the_loss_curve_is_drawn_beside_the_output_and_the_csv_kept(trained):
    """The plotted points are the CSV's rows: each the mean of the per-step losses of its logging window."""
    from stylora.trainer.loss_curve import read_loss_log

    out, every = trained["path"], trained["cfg"].log_every
    png, log = out.parent / "style.loss_curve.png", out.parent / "style.train_log.csv"
    assert log.is_file() and png.is_file()
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.size[0] >= 300 and len(set(im.convert("L").getdata())) > 10  # axes and a curve, not blank
    losses = trained["result"].losses
    steps, means = read_loss_log(log)
    assert steps == list(range(every, 21, every)) + ([] if 20 % every == 0 else [20])
    for step, mean in zip(steps, means):
        window = losses[(step - 1) // every * every:step]
        assert mean == pytest.approx(sum(window) / len(window), rel=1e-5)


# --- The loop itself (trainer/loop.py) with a one-weight recipe: no model, every value worked out ----------------

class _Line(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))


def _slope(seed: int, index: int) -> float:
    """a_index of micro-batch `index`: the first normal draw of its stream (seed * 1_000_003 + index)."""
    return torch.randn((), generator=torch.Generator().manual_seed(seed * 1_000_003 + index)).item()


class LineRecipe(Recipe):
    """Stand-in for a recipe: one weight w, micro-batch loss a_index * w (gradient a_index), a NaN loss at micro-batch
    `nan_at`; writes w to the output."""

    kind, title, invariants = "line", "Training a line", ("seed", "steps", "grad_accum", "learning_rate")
    nan_at: int | None = None
    pause = 0.0  # seconds each micro-batch takes

    def __init__(self, run):
        super().__init__(run)
        self.model = _Line()
        self.params = [self.model.w]

    def prepare(self, optimizer, lr_schedule):
        self.model, optimizer, lr_schedule = self.run.accelerator.prepare(self.model, optimizer, lr_schedule)
        return optimizer, lr_schedule

    def loss(self, index, g):
        time.sleep(self.pause)
        a = torch.randn((), generator=g)
        return a * self.model.w * (float("nan") if index == self.nan_at else 1.0)

    def trainable_state(self):
        return {"w": self.model.w.detach().clone()}

    def load_trainable(self, state):
        with torch.no_grad():
            self.model.w.copy_(state["w"])

    def write(self, steps, seconds, peak_mb):
        save_file(self.trainable_state(), self.run.cfg.output)


def _adamw_reference(seed, steps, grad_accum, lr, lrs, weight_decay=1e-2, max_norm=1.0, w=1.0):
    """AdamW (Loshchilov & Hutter 2019; torch's defaults betas 0.9, 0.999, eps 1e-8) on loss a * w, written out:
    the step's gradient is the mean of its micro-batches' a, clipped to norm `max_norm`; lr x lrs[k] at step k.
    Returns (w after each step, each step's mean loss)."""
    m = v = 0.0
    ws, losses = [], []
    for k in range(steps):
        a = [_slope(seed, k * grad_accum + j) for j in range(grad_accum)]
        losses.append(sum(x * w for x in a) / grad_accum)
        g = sum(a) / grad_accum
        if max_norm > 0:
            g *= min(1.0, max_norm / (abs(g) + 1e-6))
        step_lr = lr * lrs[k]
        w *= 1 - step_lr * weight_decay
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w -= step_lr / (1 - 0.9 ** (k + 1)) * m / ((v / (1 - 0.999 ** (k + 1))) ** 0.5 + 1e-8)
        ws.append(w)
    return ws, losses


def _line_data(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (200, 100, 50)).save(folder / f"{name}.png")
    return folder


def _line_cfg(tmp_path, **changes):
    from stylora.trainer.config import TrainingSettings

    settings = dict(data=str(_line_data(tmp_path / "data")), output=str(tmp_path / "line.safetensors"),
                    base_model="none", resolution=64, min_images=2, steps=5, grad_accum=2, learning_rate=0.1,
                    lr_scheduler="linear", warmup_steps=2, seed=3, checkpoint_every=2, keep_checkpoints=0,
                    log_every=2)
    return TrainingSettings(**{**settings, **changes})


@pytest.fixture
def line_run(monkeypatch):
    """run_training of the one-weight recipe; the base model is not loaded."""
    from stylora.trainer import loop

    monkeypatch.setattr(loop, "load_base_model", lambda *args: None)
    def run(cfg, **kw):
        return loop.run_training(cfg, LineRecipe, progress=False, **kw)

    return run


def _written_w(path) -> float:
    from safetensors.torch import load_file

    return load_file(str(path))["w"].item()


def test_the_loop_steps_accumulates_schedules_logs_and_checkpoints_as_worked_out(line_run, tmp_path):
    """5 steps of 2 micro-batches each (indices 0..9), linear schedule with 2 warm-up steps: lr x 0, 0.5, 1, 2/3,
    1/3 at steps 1..5 (and 1/2, 1, 2/3, 1/3, 0 after them); AdamW over the clipped mean gradient; a CSV row every 2
    steps and at the end; checkpoints at steps 2 and 4 and the last one at 5."""
    from stylora.trainer.checkpoint import load_checkpoint

    cfg = _line_cfg(tmp_path)
    calls = []
    result = line_run(cfg, on_step=lambda done, total: calls.append((done, total)))
    ws, losses = _adamw_reference(3, 5, 2, 0.1, [0, 0.5, 1, 2 / 3, 1 / 3])
    assert calls == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert (result.steps, result.resumed_from, len(result.step_seconds)) == (5, 0, 5)
    assert result.losses == pytest.approx(losses, rel=1e-5)
    assert result.final_loss == pytest.approx((losses[3] + losses[4]) / 2, rel=1e-5)
    assert _written_w(cfg.output) == pytest.approx(ws[-1], rel=1e-5)
    assert ws[0] == 1.0 and len(set(ws)) == 5  # lr 0 at step 1; every later step moves w

    rows = (tmp_path / "line.train_log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,steps_per_s,elapsed_s"
    logged = [r.split(",") for r in rows[1:]]
    assert [(r[0], r[2]) for r in logged] == [("2", "1.000e-01"), ("4", "3.333e-02"), ("5", "0.000e+00")]
    means = [(losses[0] + losses[1]) / 2, (losses[2] + losses[3]) / 2, losses[4]]  # each logging window's
    assert [float(r[1]) for r in logged] == pytest.approx(means, rel=1e-4, abs=2e-6)
    root = checkpoint_root(cfg.output)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004", "step-00000005"]
    assert load_checkpoint(root / "step-00000004")[0]["w"].item() == pytest.approx(ws[3], rel=1e-5)
    record = json.loads((tmp_path / "line.resources.json").read_text())
    assert (record["kind"], record["steps"], record["resumed_from"], record["grad_accum"]) == ("line", 5, 0, 2)
    assert (tmp_path / "line.loss_curve.png").is_file()


def test_a_stopped_run_keeps_its_last_step_and_resumes_to_the_uninterrupted_result(line_run, tmp_path):
    from stylora.trainer.loop import StopTraining

    cfg = _line_cfg(tmp_path, checkpoint_every=0)

    def stop_at_3(done, total):
        if done == 3:
            raise StopTraining

    with pytest.raises(StopTraining):
        line_run(cfg, on_step=stop_at_3)
    assert not (tmp_path / "line.safetensors").exists()
    assert sorted(p.name for p in checkpoint_root(cfg.output).iterdir()) == ["step-00000003"]
    calls = []
    resumed = line_run(cfg, resume=True, on_step=lambda done, total: calls.append(done))
    ws, losses = _adamw_reference(3, 5, 2, 0.1, [0, 0.5, 1, 2 / 3, 1 / 3])
    assert (resumed.resumed_from, resumed.steps, calls) == (3, 5, [3, 4, 5])
    assert resumed.losses == pytest.approx(losses[3:], rel=1e-5)
    assert _written_w(cfg.output) == pytest.approx(ws[-1], rel=1e-5)
    rows = (tmp_path / "line.train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "5"]  # the rows up to step 3, then this run's
    record = json.loads((tmp_path / "line.resources.json").read_text())
    assert (record["steps"], record["resumed_from"]) == (5, 3)
    # checkpoint_every 0: the stop's checkpoint was the only one, and the end writes none.
    assert sorted(p.name for p in checkpoint_root(cfg.output).iterdir()) == ["step-00000003"]


def test_no_checkpoints_at_checkpoint_every_0_and_an_overwrite_drops_the_earlier_runs(line_run, tmp_path):
    cfg = _line_cfg(tmp_path, checkpoint_every=0, steps=2)
    line_run(cfg)
    assert not checkpoint_root(cfg.output).exists()
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite to replace it"):
        line_run(cfg)  # neither resume nor overwrite by default
    line_run(_line_cfg(tmp_path, checkpoint_every=1, steps=2), overwrite=True)
    assert sorted(p.name for p in checkpoint_root(cfg.output).iterdir()) == ["step-00000001", "step-00000002"]
    line_run(cfg, overwrite=True)
    assert not checkpoint_root(cfg.output).exists()


def test_each_step_is_timed_from_its_own_start(line_run, tmp_path, monkeypatch):
    """A step's time lies between the callbacks around it, whatever the steps before it took."""
    monkeypatch.setattr(LineRecipe, "pause", 0.02)
    marks = []
    result = line_run(_line_cfg(tmp_path, steps=3, grad_accum=1, checkpoint_every=0),
                      on_step=lambda done, total: marks.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    assert len(result.step_seconds) == len(gaps) == 3
    assert all(0.02 <= s <= gap for s, gap in zip(result.step_seconds, gaps)), (result.step_seconds, gaps)


def test_a_nan_loss_stops_the_run_before_the_step_naming_the_last_checkpoint(line_run, tmp_path, monkeypatch):
    from stylora.trainer.loop import TrainingDiverged

    cfg = _line_cfg(tmp_path, grad_accum=1, checkpoint_every=1)
    monkeypatch.setattr(LineRecipe, "nan_at", 2)  # step 3's only micro-batch
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at step 3; .*step-00000002"):
        line_run(cfg)
    assert not (tmp_path / "line.safetensors").exists()


def test_the_base_recipe_scans_square_crops_without_captions(tmp_path):
    cfg = _line_cfg(tmp_path)
    (tmp_path / "data" / "a.txt").write_text("a caption")
    ds = Recipe.scan(cfg, False)
    assert ds.captions == ["", ""] and [tuple(p.shape) for p in ds.pixels] == [(3, 64, 64)] * 2


def test_the_lr_schedule_counts_every_process_step():
    """accelerate steps a prepared schedule once per process: with 2 processes, 4 steps and 1 warm-up step are 8 and
    2 schedule steps. Linear: k/2 for k < 2, then (8 - k) / 6."""
    from types import SimpleNamespace

    from stylora.trainer.config import TrainingSettings
    from stylora.trainer.loop import optimizer_and_schedule

    cfg = TrainingSettings(data="d", output="o.safetensors", steps=4, warmup_steps=1, lr_scheduler="linear",
                           learning_rate=0.6)
    w = torch.nn.Parameter(torch.zeros(1))
    optimizer, schedule = optimizer_and_schedule(SimpleNamespace(num_processes=2), [w], cfg, cfg.lr)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 1e-2
    lrs = []
    for _ in range(9):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.6 * x for x in (0, 1 / 2, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0)])


def test_start_accelerator_forgets_the_previous_runs_settings():
    from stylora.trainer.loop import start_accelerator

    accelerator, dtype, show = start_accelerator("no", 1, progress=False)
    assert (dtype, show, accelerator.gradient_accumulation_steps) == (torch.float32, False, 1)
    accelerator, dtype, show = start_accelerator("bf16", 3, progress=True)
    assert (dtype, show, accelerator.gradient_accumulation_steps) == (torch.bfloat16, True, 3)
    assert accelerator.mixed_precision == "bf16"
    accelerator, dtype, show = start_accelerator("no", 1, progress=True)
    assert (dtype, accelerator.mixed_precision) == (torch.float32, "no")


def test_lora_adapters_train_in_fp32_over_bf16_frozen_weights(tmp_path):
    from conftest import TINY_CONFIG
    from diffusers import UNet2DConditionModel
    from stylora.trainer.loop import add_lora_adapters

    for precision in ("bf16", "no"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_CONFIG / "unet"))
        unet.requires_grad_(False)
        unet.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        cfg = LoraTrainConfig(data="d", output="o.safetensors", rank=2, mixed_precision=precision)
        params = add_lora_adapters(unet, cfg)
        assert len(params) == 2 * 128 and all(p.dtype == torch.float32 and p.requires_grad for p in params)
        frozen = [p for n, p in unet.named_parameters() if "lora" not in n]
        assert {p.dtype for p in frozen} == {torch.bfloat16 if precision == "bf16" else torch.float32}


class _FakeTensorBoard:
    """torch.utils.tensorboard's SummaryWriter, recorded (the package is optional)."""

    writers: list = []

    class SummaryWriter:
        def __init__(self, folder):
            self.folder, self.scalars, self.closed = folder, [], False
            _FakeTensorBoard.writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, round(value, 6), step))

        def close(self):
            self.closed = True


def _progress(tmp_path, monkeypatch, **kw):
    import types

    from stylora.trainer.loop import TrainProgress

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _FakeTensorBoard.SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    _FakeTensorBoard.writers = []
    args = dict(output=tmp_path / "new" / "deeper" / "o.safetensors", total=5, start_step=0, log_every=2,
                desc="t", show=False)
    return TrainProgress(**{**args, **kw})


def test_train_progress_rows_windows_and_final_loss(tmp_path, monkeypatch):
    track = _progress(tmp_path, monkeypatch)  # its folders are made
    assert track.tb is None and _FakeTensorBoard.writers == []  # CSV only unless asked
    for step, loss in enumerate([1.0, 2.0, 3.0, 5.0, 8.0], start=1):
        track.begin_step()
        track.end_step(step, loss, 0.5)
    assert track.final_loss == 6.5 and track.losses == [1.0, 2.0, 3.0, 5.0, 8.0] and len(track.step_seconds) == 5
    track.close()
    assert track.file.closed
    rows = (tmp_path / "new" / "deeper" / "o.train_log.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in rows[1:]] == [["2", "1.500000", "5.000e-01"], ["4", "4.000000", "5.000e-01"],
                                                   ["5", "8.000000", "5.000e-01"]]
    empty = _progress(tmp_path, monkeypatch, output=tmp_path / "e.safetensors")
    assert empty.final_loss != empty.final_loss  # NaN: no step ran
    empty.close()


def test_train_progress_times_each_step_from_its_own_start(tmp_path, monkeypatch):
    track = _progress(tmp_path, monkeypatch)
    start = time.perf_counter()
    for step in (1, 2, 3):
        track.begin_step()
        time.sleep(0.05)
        track.end_step(step, 1.0, 0.1)
    wall = time.perf_counter() - start
    track.close()
    assert all(s >= 0.05 for s in track.step_seconds) and sum(track.step_seconds) <= wall


def test_train_progress_of_a_resumed_run_keeps_the_rows_up_to_its_step(tmp_path, monkeypatch):
    log = tmp_path / "o.train_log.csv"
    log.write_text("step,loss,lr,steps_per_s,elapsed_s\n2,1.0,0.1,1,1\nbroken,,,,\n4,2.0,0.1,1,2\n6,3.0,0.1,1,3\n")
    track = _progress(tmp_path, monkeypatch, output=tmp_path / "o.safetensors", start_step=4)
    track.end_step(5, 7.0, 0.1)
    track.close()
    assert [r.split(",")[:2] for r in log.read_text().splitlines()[1:]] == [["2", "1.0"], ["4", "2.0"],
                                                                           ["5", "7.000000"]]
    fresh = _progress(tmp_path, monkeypatch, output=tmp_path / "o.safetensors", start_step=0)
    fresh.close()
    assert log.read_text() == "step,loss,lr,steps_per_s,elapsed_s\n"  # a fresh run starts a new log


def test_train_progress_logs_to_tensorboard_when_asked_and_closes_it(tmp_path, monkeypatch):
    track = _progress(tmp_path, monkeypatch, output=tmp_path / "o.safetensors", log_with="tensorboard", total=2,
                      log_every=1)
    (writer,) = _FakeTensorBoard.writers
    assert writer.folder == str(tmp_path / "o.tensorboard")
    track.end_step(1, 1.5, 0.25)
    track.end_step(2, 2.5, 0.5)
    track.close()
    assert writer.scalars == [("train/loss", 1.5, 1), ("train/lr", 0.25, 1), ("train/loss", 2.5, 2),
                              ("train/lr", 0.5, 2)]
    assert writer.closed


def test_train_progress_bar_and_a_process_that_does_not_log(tmp_path, monkeypatch):
    track = _progress(tmp_path, monkeypatch, output=tmp_path / "o.safetensors", show=True, total=3)
    for step in (1, 2, 3):
        track.end_step(step, 1.0, 0.1)
    assert track.bar.n == 3
    track.close()
    quiet = _progress(tmp_path, monkeypatch, output=tmp_path / "q.safetensors", enabled=False, total=2,
                      log_with="tensorboard")
    quiet.end_step(1, 1.0, 0.1)
    quiet.end_step(2, 1.0, 0.1)
    quiet.close()
    assert quiet.losses == [1.0, 1.0] and not (tmp_path / "q.train_log.csv").exists()
    assert _FakeTensorBoard.writers == []
