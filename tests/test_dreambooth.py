"""DreamBooth with prior preservation on the tiny SD1.5-shaped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from stylora.trainer.config import DreamBoothConfig
from stylora.trainer.dreambooth import generate_class_images, train_dreambooth

FAST = dict(resolution=64, batch_size=1, grad_accum=1, num_class_images=2, class_sample_steps=2, min_images=1,
            checkpoint_every=0, gradient_checkpointing=False, learning_rate=1e-3, seed=0)


def test_class_images_are_deterministic_for_a_seed(tiny_model, tmp_path):
    from stylora.trainer.base_model import load_base_model

    base = load_base_model(str(tiny_model["diffusers"]))

    def make(folder, seed):
        out = generate_class_images(base, "painting", 2, tmp_path / folder, 64, seed, 2, 7.5, torch.device("cpu"),
                                    progress=False)
        return [np.asarray(Image.open(out / f"class_{i:05d}.png")) for i in range(2)]

    a, b, c = make("a", 0), make("b", 0), make("c", 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], a[1])
    with pytest.raises(ValueError, match="other settings"):
        generate_class_images(base, "a dog", 2, tmp_path / "a", 64, 0, 2, 7.5, torch.device("cpu"), progress=False)


def test_dreambooth_writes_a_single_file_checkpoint_that_converts_back(tiny_model, style_folder, tmp_path):
    from safetensors import safe_open
    from stylora.trainer.base_model import load_base_model
    from stylora.trainer.checkpoint import WEIGHTS_FILE, checkpoint_root

    out = tmp_path / "db.safetensors"
    cfg = DreamBoothConfig(data=str(style_folder), output=str(out), base_model=str(tiny_model["diffusers"]),
                           steps=10, **{**FAST, "checkpoint_every": 10, "save_dtype": "fp32"})
    result = train_dreambooth(cfg, progress=False)
    assert result.steps == 10 and all(np.isfinite(result.losses))
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert meta["stylora.kind"] == "dreambooth" and meta["stylora.trigger"] == "sks style painting"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["stylora.class_images"] == "2"

    # The file converts back to diffusers (diffusers' own single-file loader) and holds the trained weights.
    back = load_base_model(str(out), config_dir=tiny_model["config"])
    trained = checkpoint_root(out) / "step-00000010"
    from safetensors.torch import load_file

    state = load_file(str(trained / WEIGHTS_FILE))
    for k, v in back.unet.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    base = load_base_model(str(tiny_model["diffusers"]))
    changed = [k for k, v in base.unet.state_dict().items() if not torch.equal(v, state[k])]
    assert len(changed) > 100  # a full fine-tune moves (almost) every UNet tensor
    record = json.loads((tmp_path / "db.resources.json").read_text())
    assert record["kind"] == "dreambooth" and record["steps"] == 10 and record["bytes"] == out.stat().st_size


def test_dreambooth_lora_and_the_cost_table(tiny_model, style_folder, tmp_path, capsys):
    from stylora.cli import main
    from stylora.core.lora_file import kohya_modules, read_lora

    class_dir = tmp_path / "painting"
    class_dir.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(class_dir / f"{i}.png")
    out = tmp_path / "dbl.safetensors"
    cfg = DreamBoothConfig(data=str(style_folder), output=str(out), base_model=str(tiny_model["diffusers"]),
                           steps=3, lora=True, class_data=str(class_dir), **FAST)
    train_dreambooth(cfg, progress=False)
    state, meta = read_lora(out)
    assert len(kohya_modules(state)) == 128 and meta["stylora.kind"] == "dreambooth_lora"
    assert meta["stylora.class_images"] == "2"  # num_class_images caps a larger class folder
    assert main(["costs", str(tmp_path / "dbl.resources.json"), "--out", str(tmp_path / "costs.md")]) == 0
    assert "| dbl.safetensors | dreambooth_lora | 3 |" in capsys.readouterr().out
    assert (tmp_path / "costs.md").read_text().startswith("# Training cost")


def test_dreambooth_settings_are_checked():
    with pytest.raises(ValueError, match="train_text_encoder is for the full fine-tune"):
        DreamBoothConfig(data="d", output="o.safetensors", lora=True, train_text_encoder=True)
    assert DreamBoothConfig(data="d", output="o.safetensors").lr == 5e-6
    assert DreamBoothConfig(data="d", output="o.safetensors", lora=True).lr == 1e-4


def test_dreambooth_resume_continues_exactly(tiny_model, style_folder, tmp_path):
    """A run that died after its step-2 checkpoint, resumed, ends with the same weights as an unbroken run."""
    import shutil

    from safetensors.torch import load_file
    from stylora.trainer.checkpoint import checkpoint_root

    def config(name):
        return DreamBoothConfig(data=str(style_folder), output=str(tmp_path / name),
                                base_model=str(tiny_model["diffusers"]), steps=4,
                                class_images_dir=str(tmp_path / "classes"),
                                **{**FAST, "checkpoint_every": 2, "keep_checkpoints": 2, "save_dtype": "fp32"})

    train_dreambooth(config("whole.safetensors"), progress=False)
    crashed = config("crashed.safetensors")
    train_dreambooth(crashed, progress=False)
    (tmp_path / "crashed.safetensors").unlink()  # as if killed after the step-2 checkpoint
    shutil.rmtree(checkpoint_root(crashed.output) / "step-00000004")
    assert (checkpoint_root(crashed.output) / "step-00000002" / "COMPLETE").is_file()
    result = train_dreambooth(crashed, resume=True, progress=False)
    assert result.resumed_from == 2 and result.steps == 4
    a, b = load_file(str(tmp_path / "whole.safetensors")), load_file(str(tmp_path / "crashed.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
