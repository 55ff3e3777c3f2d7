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
from conftest import REPO

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (see ../shared/comfyui/README.md)")]


def run_in_comfyui(script: Path, *args: str) -> dict:
    env = dict(os.environ)
    extra = os.environ.get("COMFYUI_PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, COMFYUI_DIR, env.get("PYTHONPATH", "")) if p)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, str(script), *args], cwd=COMFYUI_DIR, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_trained_lora_loads_in_stock_comfyui_with_every_key_mapped(sd15_checkpoint, style_folder, tmp_path):
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    out = tmp_path / "style.safetensors"
    train_lora(LoraTrainConfig(data=str(style_folder), output=str(out), base_model=str(sd15_checkpoint),
                               resolution=64, steps=1, batch_size=1, min_images=1, checkpoint_every=0),
               progress=False)
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_lora.py", str(sd15_checkpoint), str(out))
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
                            "sd2like.safetensors", "sdxllike.safetensors")
    assert report["registered"] and {"good.safetensors", "other.safetensors"} <= set(report["listed"])
    assert report["patched"] == 128 and report["strength"] == pytest.approx(0.8)
    assert report["blend_patches_per_key"] == 2 and report["blend_strengths"] == pytest.approx([0.25, 0.75])
    # Every one of the 128 patched weights carries the three styles at strength x normalised weight.
    assert report["blend3_keys"] == 128 and report["blend3_strengths"] == [[0.1, 0.3, 0.4]]
    assert report["strength0_max_diff"] == 0.0 and report["strength05_max_diff"] > 0
    assert report["base_untouched"] == 0
    assert "wrong shape" in report["refused"]["sd2like.safetensors"]
    assert "no matching model layer" in report["refused"]["sdxllike.safetensors"]


def test_content_encode_with_comfyui_vae(sd15_checkpoint):
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_encode.py", str(REPO), str(sd15_checkpoint))
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


def test_every_bundled_workflow_runs_headless(comfy_server, tmp_path):
    import shutil
    import time

    from stylora.workflows.client import RunConfig, bundled_workflows, run_workflow

    photo, mask = _content(tmp_path)
    per_workflow = {
        "style_transfer": dict(style=("mystyle.safetensors",)),
        "masked_style": dict(style=("mystyle.safetensors",), mask=str(mask)),
        "style_blend": dict(style=("mystyle.safetensors", "strong.safetensors:0.5")),
        "style_metrics": dict(style=("mystyle.safetensors",), style_image=str(REPO / "examples" / "stylora_style.jpg")),
        "style_from_image": dict(style_image=str(REPO / "examples" / "stylora_style.jpg")),
        "dreambooth": dict(style=("sd15.safetensors",)),  # any SD1.5 checkpoint stands in for a DreamBooth one
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
                        workflow=name, seed=1, set=sets, **ckpt, **extra)
        result = run_workflow(cfg, poll=0.2)
        timings[name] = round(time.monotonic() - start, 1)
        assert not result.failed and (tmp_path / f"{name}.png").is_file(), result.failed
    print("workflow wall times (s, 256x256, 2 steps, CPU):", json.dumps(timings))
    # Pixels outside the mask are the content's, exactly (after the 8-bit round trip of SaveImage).
    outside = _pixels(mask)[..., 0] == 0
    diff = abs(_pixels(tmp_path / "masked_style.png") - _pixels(photo))
    assert outside.sum() > 10000 and diff[outside].max() == 0 and diff[~outside].mean() > 1
    metrics = json.loads((tmp_path / "style_metrics.metrics.json").read_text())
    assert 0 < metrics["metrics"]["ssim"] < 1 and "lpips" in metrics["unavailable"]
    # A new user's view: the six nodes in the Stylora category, the workflows in the Templates browser.
    import urllib.request

    def get(path: str):
        with urllib.request.urlopen(comfy_server["url"] + path, timeout=30) as resp:
            return resp.status, resp.read()

    info = json.loads(get("/object_info")[1])
    ours = {k: v["display_name"] for k, v in info.items() if v.get("category") == "Stylora"}
    assert ours == {"LoadStyleLoRA": "Load Style LoRA (Stylora)", "ContentEncode": "Content Encode (Stylora)",
                    "StyleStrength": "Style Strength (Stylora)", "MaskedStyleApply": "Masked Style Apply (Stylora)",
                    "StyleMetrics": "Style Metrics (Stylora)", "StyleFromImage": "Style From Image (Stylora)",
                    "TrainStyle": "Train Style LoRA (Stylora)"}
    assert sorted(json.loads(get("/api/workflow_templates")[1])["stylora"]) == bundled_workflows()
    for name in bundled_workflows():  # listed and served (ComfyUI serves only the first template folder)
        assert get(f"/api/workflow_templates/stylora/{name}.json")[0] == 200
    assert get("/extensions/stylora/stylora.js")[0] == 200
    server_log = comfy_server["log"].read_text()
    assert "lora key not loaded" not in server_log
    assert "IMPORT FAILED" not in "\n".join(line for line in server_log.splitlines() if "stylora" in line)


def test_strength_zero_is_plain_img2img_in_comfyui(comfy_server, tmp_path):
    from stylora.workflows.client import RunConfig, load_workflow, run_workflow

    photo, _ = _content(tmp_path)
    plain = load_workflow("style_transfer")  # the same graph without Load Style LoRA and Style Strength
    del plain["2"], plain["3"]
    plain["4"]["inputs"]["clip"] = plain["5"]["inputs"]["clip"] = ["1", 1]
    plain["4"]["inputs"]["text"] = ""  # what the (promptless) style's trigger output gives
    plain["8"]["inputs"].update(model=["1", 0], denoise=0.0)
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    common = dict(content=str(photo), server=comfy_server["url"], checkpoint="sd15.safetensors", seed=3)

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
