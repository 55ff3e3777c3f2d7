"""Checks against a real ComfyUI. Skipped unless COMFYUI_DIR points at a ComfyUI checkout.

COMFYUI_PYTHON: the python of ComfyUI's environment (default: this one).
COMFYUI_PYTHONPATH: extra entries for that process (e.g. a torchvision stand-in on CPU-only machines).
COMFYUI_SD15_CKPT: a full-size SD1.5 .safetensors; default: one with random weights built here (about 2 GB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfyui_env import comfyui_pythonpath
from conftest import REPO, place_controlnet

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (see ../shared/comfyui/README.md)")]


def run_in_comfyui(script: Path, *args: str, limit_s: float) -> dict:
    """Run a check script with ComfyUI's python in a fresh ComfyUI base folder; its last stdout line as JSON.

    Fails, saying what it waited for, when the script runs past `limit_s`, is killed (e.g. by the kernel when
    memory runs out) or prints no JSON result."""
    import tempfile

    env = dict(os.environ)
    env["PYTHONPATH"] = comfyui_pythonpath(COMFYUI_DIR, env.get("PYTHONPATH", ""))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    with tempfile.TemporaryDirectory(prefix="comfy-base-") as base:
        env["COMFYUI_BASE_DIRECTORY"] = base
        try:
            proc = subprocess.run([python, str(script), *args], cwd=COMFYUI_DIR, env=env, capture_output=True,
                                  text=True, timeout=limit_s)
        except subprocess.TimeoutExpired as e:
            err = (e.stderr or b"")[-3000:]
            pytest.fail(f"{script.name}: no result within {limit_s:.0f} s (waiting for ComfyUI's python to load the "
                        f"checkpoint and run the check); its stderr ends with:\n{err!s}")
    if proc.returncode < 0:
        pytest.fail(f"{script.name}: killed by signal {-proc.returncode} (9: the kernel's out-of-memory killer?); "
                    f"stderr ends with:\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, f"{script.name} exited with {proc.returncode}:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"{script.name}: its last stdout line is not the JSON result: {lines[-3:]!r}")


def test_trained_lora_loads_in_stock_comfyui_with_every_key_mapped(sd15_checkpoint, style_folder, tmp_path):
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    out = tmp_path / "style.safetensors"
    train_lora(LoraTrainConfig(data=str(style_folder), output=str(out), base_model=str(sd15_checkpoint),
                               resolution=64, steps=1, batch_size=1, min_images=1, checkpoint_every=0),
               progress=False)
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_lora.py", str(sd15_checkpoint), str(out), limit_s=600)
    assert report["is_sd15"]
    assert report["unmapped"] == []
    assert report["lora_tensors"] == 3 * 128
    assert report["patched_unet_weights"] == 128 and report["patched_clip_weights"] == 0


def test_load_style_lora_node_in_comfyui(sd15_checkpoint, style_folder, tmp_path):
    from safetensors.torch import save_file
    from stylora.core.lora_file import read_lora
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    loras = tmp_path / "loras"
    for name, seed in (("good.safetensors", 0), ("other.safetensors", 1)):
        train_lora(LoraTrainConfig(data=str(style_folder), output=str(loras / name), base_model=str(sd15_checkpoint),
                                   resolution=64, steps=1, batch_size=1, min_images=1, checkpoint_every=0, seed=seed),
                   progress=False)
    state, meta = read_lora(loras / "good.safetensors")
    # A third style: the same modules with other random weights (one training run fewer).
    gen = torch.Generator().manual_seed(2)
    save_file({k: v if k.endswith(".alpha") else (torch.randn(v.shape, generator=gen) * 0.05).to(v.dtype)
               for k, v in state.items()}, str(loras / "third.safetensors"), metadata=meta)
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd2 = {**state, f"{k}.lora_down.weight": torch.zeros(4, 1024, dtype=torch.float16)}
    save_file(sd2, str(loras / "sd2like.safetensors"))
    sdxl = {**state, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}
    save_file(sdxl, str(loras / "sdxllike.safetensors"))
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_style_node.py", str(REPO), str(sd15_checkpoint),
                            str(loras), "good.safetensors", "other.safetensors", "third.safetensors",
                            "sd2like.safetensors", "sdxllike.safetensors", limit_s=900)
    assert report["registered"] and {"good.safetensors", "other.safetensors"} <= set(report["listed"])
    assert report["patched"] == 128 and report["strength"] == pytest.approx(0.8)
    assert report["blend_patches_per_key"] == 2 and report["blend_strengths"] == pytest.approx([0.25, 0.75])
    # Every one of the 128 patched weights carries the three styles at strength x normalised weight.
    assert report["blend3_keys"] == 128 and report["blend3_strengths"] == [[0.1, 0.3, 0.4]]
    assert report["compared"] == 128 and report["strength0_max_diff"] == 0.0 and report["strength05_max_diff"] > 0
    print("Load Style LoRA check: peak memory of ComfyUI's process", report["peak_rss_gb"], "GB")
    assert report["base_untouched"] == 0
    assert "wrong shape" in report["refused"]["sd2like.safetensors"]
    assert "no matching model layer" in report["refused"]["sdxllike.safetensors"]


def test_content_encode_with_comfyui_vae(sd15_checkpoint):
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_encode.py", str(REPO), str(sd15_checkpoint), limit_s=600)
    assert report["latent"] == [1, 4, 38, 25] and report["image"] == [1, 304, 200, 3]
    assert report["info"] == "200x300 -> 200x304, stretched +0x+4 px to a multiple (aspect 0.6667 -> 0.6579)"
    assert report["tiled"] == report["latent"] and report["tiled_info"].endswith("tiled 256px")
    assert report["fp32_dtype"] == "torch.float32" and report["fp32_vs_plain"] < 1e-3

# --- The bundled workflows end to end on a real server ------------------------------------------------------

def _content(tmp_path: Path) -> tuple[Path, Path]:
    """A 256x256 photo (encoded at its own size) and a mask over its left part (white = styled)."""
    from PIL import Image

    photo, mask = tmp_path / "content.png", tmp_path / "mask.png"
    Image.open(REPO / "examples" / "stylora_content.jpg").resize((256, 256), Image.Resampling.LANCZOS).save(photo)
    Image.open(REPO / "examples" / "stylora_mask.png").resize((256, 256), Image.Resampling.NEAREST).save(mask)
    return photo, mask


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


FAST = ("Sampler.steps=2", "Content encode.max_side=256")  # 256x256, 2 steps: a CPU-sized end-to-end run


def test_every_bundled_workflow_runs_headless(comfy_server, sd15_controlnet, tmp_path):
    import shutil
    import time

    import numpy as np
    from stylora.workflows.client import RunConfig, bundled_workflows, run_workflow

    photo, mask = _content(tmp_path)
    place_controlnet(comfy_server, sd15_controlnet)
    per_workflow = {
        "style_transfer": dict(style=("mystyle.safetensors",)),
        "masked_style": dict(style=("mystyle.safetensors",), mask=str(mask)),
        "style_blend": dict(style=("mystyle.safetensors", "strong.safetensors:0.5")),
        "style_metrics": dict(style=("mystyle.safetensors",), style_image=str(REPO / "examples" / "stylora_style.jpg")),
        "style_from_image": dict(style_image=str(REPO / "examples" / "stylora_style.jpg")),
        "layout_guard": dict(style=("mystyle.safetensors",), strength=1.0),  # denoise 1, the random ControlNet
        "dreambooth": dict(style=("sd15.safetensors",)),  # any SD1.5 checkpoint stands in for a DreamBooth one
        "textual_inversion": dict(),  # the shipped prompt's embedding is absent: ComfyUI warns and samples
        "train_style": dict(set=("Train style.folder=paintings", "Train style.name=headless", "Train style.steps=1",
                                 "Train style.resolution=64")),
    }
    shutil.copytree(comfy_server["base"] / "paintings", comfy_server["base"] / "input" / "paintings",
                    dirs_exist_ok=True)
    assert sorted(per_workflow) == bundled_workflows()
    timings = {}
    for name, extra in per_workflow.items():
        ckpt = {} if name == "dreambooth" else {"checkpoint": "sd15.safetensors"}
        start = time.monotonic()
        sets = FAST + extra.pop("set", ())
        cfg = RunConfig(content=str(photo), out=str(tmp_path / f"{name}.png"), server=comfy_server["url"],
                        workflow=name, seed=1, set=sets, timeout=600, **ckpt, **extra)
        result = run_workflow(cfg, poll=0.2)
        timings[name] = round(time.monotonic() - start, 1)
        assert not result.failed and (tmp_path / f"{name}.png").is_file(), result.failed
        # Finite and not flat: Save Image writes NaN as 0, so an overflowing model would come back all black.
        out = _pixels(tmp_path / f"{name}.png")
        assert out.std() > 5 and len(np.unique(out.reshape(-1, 3), axis=0)) > 100, f"{name}: a flat output"
    print("workflow wall times (s, 256x256, 2 steps, CPU):", json.dumps(timings))
    # Pixels outside the mask are the content's, exactly (after the 8-bit round trip of SaveImage).
    outside = _pixels(mask)[..., 0] == 0
    diff = abs(_pixels(tmp_path / "masked_style.png") - _pixels(photo))
    assert outside.sum() > 10000 and diff[outside].max() == 0 and diff[~outside].mean() > 1
    metrics = json.loads((tmp_path / "style_metrics.metrics.json").read_text())
    assert 0 < metrics["metrics"]["ssim"] < 1 and "lpips" in metrics["unavailable"]
    # A new user's view: the nodes in the Stylora category, the workflows in the Templates browser.
    import urllib.request

    def get(path: str):
        with urllib.request.urlopen(comfy_server["url"] + path, timeout=30) as resp:
            return resp.status, resp.read()

    info = json.loads(get("/object_info")[1])
    ours = {k: v["display_name"] for k, v in info.items() if v.get("category") == "Stylora"}
    assert ours == {"LoadStyleLoRA": "Load Style LoRA (Stylora)", "ContentEncode": "Content Encode (Stylora)",
                    "StyleStrength": "Style Strength (Stylora)", "MaskedStyleApply": "Masked Style Apply (Stylora)",
                    "StyleMetrics": "Style Metrics (Stylora)", "StyleFromImage": "Style From Image (Stylora)",
                    "KeepPhotoColours": "Keep Photo Colours (Stylora)",
                    "TrainStyle": "Train Style LoRA (Stylora)"}
    assert sorted(json.loads(get("/api/workflow_templates")[1])["stylora"]) == bundled_workflows()
    for name in bundled_workflows():  # listed and served (ComfyUI serves only the first template folder)
        assert get(f"/api/workflow_templates/stylora/{name}.json")[0] == 200
    assert get("/extensions/stylora/stylora.js")[0] == 200
    server_log = comfy_server["log"].read_text()
    assert "lora key not loaded" not in server_log
    assert "IMPORT FAILED" not in "\n".join(line for line in server_log.splitlines() if "stylora" in line)


def test_outputs_follow_their_inputs_in_comfyui(comfy_server, tmp_path):
    """With the samplable test checkpoint an output depends on what went in: two strengths, two styles, two photos
    and two paintings each give different images. Runs are deterministic (fixed seed, CPU), so equal inputs give
    a difference of exactly 0. Limits in mean |difference| over 8-bit levels, below what the checkpoint gave in
    ComfyUI (strength 0.8 vs 0.3: 23; the two styles at 0.8: 1.1, the LoRA's effect scaled down with the UNet's
    output; two different photos at denoise 0.6: 4.9)."""
    from PIL import Image
    from stylora.workflows.client import RunConfig, run_workflow

    photo, _ = _content(tmp_path)
    other_photo, painting = tmp_path / "other.png", tmp_path / "painting.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other_photo)
    Image.open(REPO / "examples" / "stylora_content.jpg").rotate(90).save(painting)
    common = dict(server=comfy_server["url"], checkpoint="sd15.safetensors", seed=1, set=FAST, timeout=600)
    outputs = {}
    runs = {"strong08": dict(style=("strong.safetensors",), strength=0.8),
            "strong03": dict(style=("strong.safetensors",), strength=0.3),
            "mystyle08": dict(style=("mystyle.safetensors",), strength=0.8),
            "other08": dict(content=str(other_photo), style=("strong.safetensors",), strength=0.8),
            "painting_a": dict(workflow="style_from_image", style_image=str(REPO / "examples" / "stylora_style.jpg")),
            "painting_b": dict(workflow="style_from_image", style_image=str(painting))}
    for name, kw in runs.items():
        kw = {"content": str(photo), **kw}
        result = run_workflow(RunConfig(out=str(tmp_path / f"{name}.png"), **common, **kw), poll=0.2)
        assert not result.failed, (name, result.failed)
        outputs[name] = _pixels(tmp_path / f"{name}.png")
    differ = {f"{a} vs {b}": round(float(abs(outputs[a] - outputs[b]).mean()), 3)
              for a, b in (("strong08", "strong03"), ("strong08", "mystyle08"), ("strong08", "other08"),
                           ("painting_a", "painting_b"))}
    print("mean |difference| (8-bit levels):", json.dumps(differ))
    limits = {"strong08 vs strong03": 5, "strong08 vs mystyle08": 0.5, "strong08 vs other08": 1,
              "painting_a vs painting_b": 0.1}
    assert all(differ[k] > limit for k, limit in limits.items()), (differ, limits)


def test_strength_zero_is_plain_img2img_in_comfyui(comfy_server, tmp_path):
    from stylora.workflows.client import RunConfig, load_workflow, run_workflow

    photo, _ = _content(tmp_path)
    plain = load_workflow("style_transfer")  # the same graph without Load Style LoRA and Style Strength
    del plain["2"], plain["3"]
    plain["4"]["inputs"]["clip"] = plain["5"]["inputs"]["clip"] = ["1", 1]
    plain["4"]["inputs"]["text"] = ""  # what the (promptless) style's trigger output gives
    plain["8"]["inputs"].update(model=["1", 0], denoise=0.0)
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    common = dict(content=str(photo), server=comfy_server["url"], checkpoint="sd15.safetensors", seed=3,
                  timeout=600)

    def run(out: str, workflow: str, *overrides: str, **kw) -> Path:
        run_workflow(RunConfig(out=str(tmp_path / out), workflow=workflow, set=FAST + overrides, **common, **kw),
                     poll=0.2)
        return tmp_path / out

    styled = dict(style=("strong.safetensors",))
    # Wired as bundled: strength 0 -> denoise 0 and no style weights: plain img2img at denoise 0.
    assert (_pixels(run("s0.png", "style_transfer", strength=0.0, **styled))
            == _pixels(run("p0.png", str(tmp_path / "plain.json")))).all()
    # At the same denoise, strength 0's model is the base model: identical to plain img2img; strength 0.5 is not.
    half = ("Sampler.denoise=0.5",)
    plain_half = _pixels(run("p5.png", str(tmp_path / "plain.json"), *half))
    assert (_pixels(run("s0d5.png", "style_transfer", *half, strength=0.0, **styled)) == plain_half).all()
    assert (_pixels(run("s5d5.png", "style_transfer", *half, strength=0.5, **styled)) != plain_half).any()


def test_textual_inversion_embedding_changes_the_conditioning_in_comfyui(sd15_checkpoint, style_folder, tmp_path):
    from stylora.trainer.config import TextualInversionConfig
    from stylora.trainer.textual_inversion import train_textual_inversion

    embeddings = tmp_path / "embeddings"
    train_textual_inversion(TextualInversionConfig(data=str(style_folder), output=str(embeddings / "myti.safetensors"),
                                                   base_model=str(sd15_checkpoint), resolution=64, steps=1,
                                                   batch_size=1, min_images=1, checkpoint_every=0, num_vectors=2),
                            progress=False)
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_embedding.py", str(sd15_checkpoint), str(embeddings),
                            "myti", limit_s=600)  # a checkpoint load and two text encodes: a minute here
    assert report["injected"] == 2 and report["injected_equal_file"]  # both vectors, as stored, in the prompt
    assert report["shape"] == [1, 77, 768] and report["max_diff"] > 1e-3
    assert report["warnings_with"] == []  # no "embedding:myti does not exist" nor a load error
    assert any("no_such_embedding does not exist" in m for m in report["warnings_missing"])
