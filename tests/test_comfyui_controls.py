"""The controls in a real ComfyUI 0.3.64 (skipped without COMFYUI_DIR): the layout_guard workflow with a random-weight
SD1.5 ControlNet (stock Canny, ControlNetLoader, ControlNetApplyAdvanced), Keep Photo Colours at amount 1 in a real
run, and a calibrated style through stock LoraLoader, Load Style LoRA and Style Strength."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, place_controlnet
from PIL import Image
from test_comfyui import COMFYUI_DIR, FAST, _content, run_in_comfyui

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (see ../shared/comfyui/README.md)")]


def _ycbcr(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB").convert("YCbCr")).astype(int)


def test_layout_guard_runs_with_a_random_controlnet_and_the_knob_drives_it(comfy_server, sd15_controlnet, tmp_path):
    from stylora.workflows.client import RunConfig, load_workflow, run_workflow

    photo, _ = _content(tmp_path)
    place_controlnet(comfy_server, sd15_controlnet)
    graph = load_workflow("layout_guard")
    types = {n["class_type"] for n in graph.values()}
    assert {"Canny", "ControlNetLoader", "ControlNetApplyAdvanced"} <= types
    guard = next(n for n in graph.values() if n["class_type"] == "ControlNetApplyAdvanced")
    assert guard["inputs"]["strength"] == ["3", 3]  # Style Strength's guard output

    def run(out: str, *overrides: str, **kw) -> Path:
        cfg = RunConfig(content=str(photo), out=str(tmp_path / out), server=comfy_server["url"],
                        workflow="layout_guard", style=("mystyle.safetensors",), checkpoint="sd15.safetensors",
                        seed=5, set=FAST + overrides, **kw)
        result = run_workflow(cfg, poll=0.2)
        assert not result.failed, result.failed
        return tmp_path / out

    guarded = _ycbcr(run("guarded.png", strength=1.0))
    unguarded = _ycbcr(run("unguarded.png", "Layout guard.strength=0.0", strength=1.0))
    assert (guarded != unguarded).any()  # the ControlNet acts (its weight comes from the knob)
    # Keep Photo Colours at 1 in the same real run: the output's chroma is the photo's within 8-bit rounding.
    kept = _ycbcr(run("kept.png", strength=1.0, keep_colours=1.0))
    content = _ycbcr(photo)
    assert np.abs(kept[..., 1:] - content[..., 1:]).max() <= 2
    assert np.abs(guarded[..., 1:] - content[..., 1:]).max() > 10  # without it the colours moved
    assert "lora key not loaded" not in comfy_server["log"].read_text()


def test_calibrated_style_loads_and_style_strength_reports_the_calibrated_mapping(comfy_server, sd15_checkpoint,
                                                                                   tmp_path):
    from stylora.core.lora_file import update_metadata
    from stylora.core.strength_rule import CALIBRATION_KEY, Calibration

    loras = tmp_path / "loras"
    loras.mkdir()
    trained = comfy_server["base"] / "models" / "styles" / "mystyle.safetensors"
    shutil.copy(trained, loras / "plain.safetensors")
    shutil.copy(trained, loras / "calibrated.safetensors")
    # SSIM 0.95 / 0.45 / 0.35 at raw strengths 0 / 0.5 / 1: strength 0.5 aims at SSIM 0.65, raw strength 0.3
    # (worked by hand in test_calibration.py), so denoise 0.3 x 0.75.
    cal = Calibration(strengths=(0.0, 0.5, 1.0), ssim=(0.95, 0.45, 0.35))
    update_metadata(loras / "calibrated.safetensors", {CALIBRATION_KEY: cal.to_json()})
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_calibration.py", str(REPO), str(sd15_checkpoint),
                            str(loras), "calibrated.safetensors", "plain.safetensors",
                            limit_s=600)  # a checkpoint load and two LoRA applications: about a minute here
    assert report["unmapped"] == [] and report["stock_patched"] == 128
    assert report["info_calibrated"] and report["style_calibrated"] and not report["plain_info_calibrated"]
    assert report["denoise"] == pytest.approx(0.225) and report["guard"] == pytest.approx(0.225)
    assert report["mapping"].startswith("strength 0.500 -> calibrated: raw strength 0.300")
    assert report["plain_denoise"] == pytest.approx(0.375) and "uncalibrated" in report["plain_mapping"]
