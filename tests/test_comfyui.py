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


@pytest.fixture(scope="module")
def sd15_checkpoint(tmp_path_factory) -> Path:
    if os.environ.get("COMFYUI_SD15_CKPT"):
        return Path(os.environ["COMFYUI_SD15_CKPT"])
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG, build_random_pipeline, save_single_file

    path = tmp_path_factory.mktemp("sd15") / "random-sd15.safetensors"
    return save_single_file(build_random_pipeline(SHIPPED_SD15_CONFIG, seed=0), path)


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
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora
    from stylora.trainer.lora_file import read_lora

    loras = tmp_path / "loras"
    for name, seed in (("good.safetensors", 0), ("other.safetensors", 1)):
        train_lora(LoraTrainConfig(data=str(style_folder), output=str(loras / name), base_model=str(sd15_checkpoint),
                                   resolution=64, steps=1, batch_size=1, min_images=1, checkpoint_every=0, seed=seed),
                   progress=False)
    state, _ = read_lora(loras / "good.safetensors")
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd2 = {**state, f"{k}.lora_down.weight": torch.zeros(4, 1024, dtype=torch.float16)}
    save_file(sd2, str(loras / "sd2like.safetensors"))
    sdxl = {**state, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}
    save_file(sdxl, str(loras / "sdxllike.safetensors"))
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_style_node.py", str(REPO), str(sd15_checkpoint),
                            str(loras), "good.safetensors", "other.safetensors", "sd2like.safetensors",
                            "sdxllike.safetensors")
    assert report["registered"] and {"good.safetensors", "other.safetensors"} <= set(report["listed"])
    assert report["patched"] == 128 and report["strength"] == pytest.approx(0.8)
    assert report["blend_patches_per_key"] == 2 and report["blend_strengths"] == pytest.approx([0.25, 0.75])
    assert report["base_untouched"] == 0
    assert "wrong shape" in report["refused"]["sd2like.safetensors"]
    assert "no matching model layer" in report["refused"]["sdxllike.safetensors"]
