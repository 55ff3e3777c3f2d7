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
from stylora.core.lora_file import kohya_modules, read_lora
from stylora.trainer.checkpoint import checkpoint_root
from stylora.trainer.config import LoraTrainConfig
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
    """kill -9 a real training process after its step-10 checkpoint, resume, compare with an unbroken run."""
    steps = 40
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
    (checkpoint_root(out) / "step-00000039").mkdir()

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


def test_ctrl_c_writes_a_checkpoint_that_resume_continues_from(tiny_model, style_folder, tmp_path):
    """SIGINT (Ctrl-C) a real `stylora train lora` mid-run: it exits 130 with a checkpoint of the last completed
    step, although --checkpoint-every 0 writes none on its own, and `--resume` finishes the run from there.

    The run is long enough (a few seconds of steps) that a loaded machine, which may leave this test process waiting
    while the run goes on, cannot let it finish before the signal arrives."""
    steps = 40
    out = tmp_path / "stopped.safetensors"
    cmd = [sys.executable, "-m", "stylora.cli", "train", "lora", "--data", str(style_folder), "--output", str(out),
           "--base-model", str(tiny_model["diffusers"]), "--steps", str(steps), "--resolution", "64",
           "--batch-size", "1", "--warmup-steps", "0", "--checkpoint-every", "0", "--log-every", "1",
           "--min-images", "4", "--rank", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "stopped.train_log.csv"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and \
            (not log.is_file() or len(log.read_text().splitlines()) < 2):  # the header and step 1
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be stopped: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert "interrupted" in proc.stderr.read().decode()
    assert not out.exists()
    saved = [int(d.name.split("-")[1]) for d in checkpoint_root(out).glob("step-*") if (d / "COMPLETE").is_file()]
    assert len(saved) == 1 and 1 <= saved[0] < steps

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resumed from step {saved[0]}; finished at step {steps}." in resumed.stdout
    assert read_lora(out)[1]["stylora.steps"] == str(steps)


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
