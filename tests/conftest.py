"""Shared fixtures: a tiny SD1.5-shaped model (diffusers folder + single-file checkpoint) and image folders.

Everything is built from configs with fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "tests" / "fixtures" / "tiny_sd15"
SHARED_TOKENIZER = REPO.parent / "shared" / "fixtures" / "sd15_tokenizer"


def workflow_builder():
    """The workflow builder (stylora.workflows.build): the schema helpers and the workflow descriptions."""
    from stylora.workflows import build

    return build


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict[str, Path]:
    """{'diffusers': folder, 'single_file': .safetensors, 'config': config folder for the single file}."""
    import torch
    from stylora.trainer.base_model import build_random_pipeline, copy_config_folder, save_single_file
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny_sd15")
    pipe = build_random_pipeline(TINY_CONFIG, seed=0)
    if SHARED_TOKENIZER.is_dir():  # the real SD1.x tokenizer files, when the machine has them
        pipe.tokenizer = CLIPTokenizer.from_pretrained(SHARED_TOKENIZER, model_max_length=77)
    assert pipe.tokenizer.model_max_length == 77
    pipe.save_pretrained(root / "diffusers")
    save_single_file(pipe, root / "tiny-sd15.safetensors", dtype=torch.float32)
    config = copy_config_folder(root / "diffusers", root / "config")
    return {"diffusers": root / "diffusers", "single_file": root / "tiny-sd15.safetensors", "config": config}


def skimage_photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
            "rocket": data.rocket()}


def skimage_textures() -> dict[str, np.ndarray]:
    from skimage import data

    out = {}
    for name in ("brick", "grass", "gravel", "camera", "moon", "text"):
        arr = getattr(data, name)()
        out[name] = np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr
    return out


def make_style_folder(folder: Path) -> Path:
    """Six 96x96 RGB 'paintings' made from scikit-image's textures."""
    folder.mkdir(parents=True)
    for name, arr in skimage_textures().items():
        Image.fromarray(arr).resize((96, 96), Image.Resampling.LANCZOS).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def style_folder(tmp_path) -> Path:
    return make_style_folder(tmp_path / "style")


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory) -> Path:
    """A full-size SD1.5 single-file checkpoint with random weights (about 2 GB, a minute to build), built once per
    test session and shared by every real-ComfyUI test module; COMFYUI_SD15_CKPT names an existing one instead."""
    if os.environ.get("COMFYUI_SD15_CKPT"):
        return Path(os.environ["COMFYUI_SD15_CKPT"])
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG, build_random_pipeline, save_single_file

    path = tmp_path_factory.mktemp("sd15") / "random-sd15.safetensors"
    return save_single_file(build_random_pipeline(SHIPPED_SD15_CONFIG, seed=0), path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """STYLORA_REQUIRE_HOST=1 (set by .ci/run once it has built ComfyUI and a browser): a real-host test that skips
    is a failure, so a broken host set-up cannot pass as green."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("STYLORA_REQUIRE_HOST") == "1" and item.get_closest_marker("comfyui"):
        report.outcome = "failed"
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"real-host test skipped although STYLORA_REQUIRE_HOST=1: {reason}"
