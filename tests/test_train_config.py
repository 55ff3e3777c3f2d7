"""Training settings: one base for the three recipes, one reader for flags and files, errors that name the key and
what is accepted, checked before any model loads; the centre crop; checkpoint pruning; the seeded streams."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from stylora.cli import main
from stylora.core.settings import coerce_settings, read_settings_file
from stylora.study.config import load_study_config
from stylora.trainer.config import (
    LR_SCHEDULERS,
    UNET_LAYERS,
    AdapterSettings,
    DreamBoothConfig,
    LoraTrainConfig,
    TextualInversionConfig,
    TrainingSettings,
)

# Paths that do not exist: an error about them would mean the settings were not checked first.
NOWHERE = ["--data", "/nonexistent/style", "--output", "/nonexistent/o.safetensors", "--base-model", "/nonexistent/m"]


def test_the_three_recipes_share_one_base_of_training_settings():
    shared = {f.name for f in dataclasses.fields(TrainingSettings)}
    assert {"data", "output", "base_model", "steps", "learning_rate", "lr_scheduler", "seed", "keep_checkpoints",
            "mixed_precision", "max_grad_norm", "log_every"} <= shared
    for cls in (LoraTrainConfig, DreamBoothConfig, TextualInversionConfig):
        assert issubclass(cls, TrainingSettings) and shared <= {f.name for f in dataclasses.fields(cls)}
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls
    assert issubclass(LoraTrainConfig, AdapterSettings) and issubclass(DreamBoothConfig, AdapterSettings)
    assert not issubclass(TextualInversionConfig, AdapterSettings)
    # Each recipe keeps its own defaults.
    assert (LoraTrainConfig(data="d", output="o.safetensors").steps, DreamBoothConfig(data="d", output="o.safetensors")
            .steps, TextualInversionConfig(data="d", output="o.safetensors").steps) == (6000, 1000, 3000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoraTrainConfig(data="d", output="o.safetensors").steps = 1  # type: ignore[misc]


def test_the_scheduler_choices_are_diffusers_and_the_layer_names_are_the_sd15_unets():
    from diffusers import UNet2DConditionModel
    from diffusers.optimization import SchedulerType
    from stylora.trainer.base_model import SHIPPED_SD15_CONFIG

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SHIPPED_SD15_CONFIG / "unet"))
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert all(any(n == t or n.endswith("." + t) for n in names) for t in UNET_LAYERS)  # each names a layer
    assert all(any(n.endswith("." + t) or n == t for t in UNET_LAYERS) for n in names)  # every layer is named


@pytest.mark.parametrize("flag,value,accepted", [
    ("--lr-scheduler", "bogus", "'cosine', 'cosine_with_restarts'"),
    ("--mixed-precision", "fp8", "'no', 'fp16', 'bf16'"),
])
def test_a_bad_choice_is_refused_by_the_parser_with_the_choices(capsys, flag, value, accepted):
    with pytest.raises(SystemExit) as e:
        main(["train", "lora", *NOWHERE, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err and accepted in err


def test_unknown_target_modules_are_refused_before_the_model_loads(capsys):
    assert main(["train", "lora", *NOWHERE, "--target-modules", "to_q", "nope"]) == 2
    err = capsys.readouterr().err
    assert "target_modules" in err and "'nope'" in err and "'to_out.0'" in err and "/nonexistent" not in err
    # Suffixes peft matches are accepted: the whole path of a layer, or a shorter tail of a known name.
    for ok in (("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",), ("0.proj",), ("ff.net.2", "proj")):
        assert LoraTrainConfig(data="d", output="o.safetensors", target_modules=ok).target_modules == ok


@pytest.mark.parametrize("text,key,expected", [
    ('steps = "abc"', "steps", "expected a whole number, got 'abc' (str)"),
    ("steps = 2.5", "steps", "expected a whole number, got 2.5"),
    ('flip = "maybe"', "flip", "expected true or false, got 'maybe'"),
    ('learning_rate = "fast"', "learning_rate", "expected a number, got 'fast'"),
    ('crop = "square"', "crop", "expected one of ['center', 'buckets'], got 'square'"),
    ("target_modules = [1]", "target_modules[0]", "expected a string, got 1"),
])
def test_type_errors_in_a_toml_file_name_the_key_and_what_is_accepted(tmp_path, capsys, text, key, expected):
    conf = tmp_path / "c.toml"
    conf.write_text(text + "\n")
    assert main(["train", "lora", "--config", str(conf), *NOWHERE]) == 2
    err = capsys.readouterr().err
    assert f"{key}: {expected}" in err and str(conf) in err and "not supported between" not in err


def test_a_yaml_config_is_refused_naming_the_formats(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("steps: 5\n")
    assert main(["train", "lora", "--config", str(conf), *NOWHERE]) == 2
    err = capsys.readouterr().err
    assert "YAML is not supported" in err and "TOML (.toml)" in err and "JSON (.json)" in err
    conf = tmp_path / "c.conf"
    conf.write_text("steps: 5\n")
    with pytest.raises(ValueError, match=r"cannot parse as JSON .*config files are TOML \(.toml\) or JSON"):
        read_settings_file(conf)
    conf.write_text("steps = [\n")
    with pytest.raises(ValueError, match="cannot parse as JSON"):
        read_settings_file(conf)
    (tmp_path / "c.toml").write_text("steps = [\n")
    with pytest.raises(ValueError, match="cannot parse as TOML"):
        read_settings_file(tmp_path / "c.toml")
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a table of settings, got list"):
        read_settings_file(tmp_path / "c.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_settings_file(tmp_path / "none.toml")


@pytest.mark.parametrize("train,message", [
    ("lora.flip=maybe", "train.lora: flip: expected true or false, got 'maybe' (str)"),
    ("lora.steps=abc", "train.lora: steps: expected a whole number, got 'abc' (str)"),
    ("dreambooth.lr_scheduler=bogus", "train.dreambooth: lr_scheduler: expected one of ['linear', 'cosine'"),
    ("lora.bogus=1", "train.lora: unknown setting 'bogus'"),
])
def test_study_train_values_are_checked_by_the_same_reader(tmp_path, train, message):
    with pytest.raises(ValueError) as e:
        load_study_config(None, {"styles": [f"a={tmp_path}"], "content": "c", "out": "o", "train": [train]})
    assert message in str(e.value) and "not supported between" not in str(e.value)
    cfg = load_study_config(None, {"styles": [f"a={tmp_path}"], "content": "c", "out": "o",
                                   "train": ["lora.flip=true", "lora.steps=5"]})
    lora = cfg.train_config("lora", str(tmp_path), "x.safetensors")
    assert (lora.flip, lora.steps) == (True, 5)


def test_study_toml_values_are_typed_by_field(tmp_path):
    conf = tmp_path / "s.toml"
    conf.write_text('content = "c"\nout = "o"\nstrengths = [0.5, "high"]\n[styles]\na = "d"\n')
    with pytest.raises(ValueError, match=r"strengths\[1\]: expected a number, got 'high'"):
        load_study_config(conf)
    conf.write_text('content = "c"\nout = "o"\nseeds = [1, 2]\ntimeout = 5\n[styles]\na = "d"\n')
    cfg = load_study_config(conf)
    assert cfg.seeds == (1, 2) and cfg.timeout == 5.0 and isinstance(cfg.timeout, float)
    assert cfg.styles == (("a", "d"),)


def test_coerce_settings_refuses_unknown_keys_and_fixed_tuples_of_another_length():
    with pytest.raises(ValueError, match=r"unknown settings \['nope'\]"):
        coerce_settings(LoraTrainConfig, {"nope": 1})
    from stylora.study.config import StudyConfig

    with pytest.raises(ValueError, match=r"styles\[0\]: expected 2 values"):
        coerce_settings(StudyConfig, {"styles": [["a", "b", "c"]]})
    assert coerce_settings(LoraTrainConfig, {"alpha": "none", "steps": 4.0}) == {"alpha": None, "steps": 4}


def test_keep_checkpoints_zero_keeps_every_one_as_its_help_says(tmp_path):
    from stylora.trainer.checkpoint import complete_checkpoints, save_checkpoint

    for cls in (LoraTrainConfig, DreamBoothConfig, TextualInversionConfig):
        field = next(f for f in dataclasses.fields(cls) if f.name == "keep_checkpoints")
        assert "0: keep every one" in field.metadata["help"] or "0: every one" in field.metadata["help"]
    weights, state = {"w": torch.ones(2)}, {"optimizer": {}, "lr_scheduler": {}}
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / "all", step, weights, state, {}, keep=0)
        save_checkpoint(tmp_path / "two", step, weights, state, {}, keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path / "all")] == [1, 2, 3]
    assert [s for s, _ in complete_checkpoints(tmp_path / "two")] == [2, 3]


def test_metadata_settings_name_local_paths_by_name_and_keep_hub_ids(tmp_path):
    (tmp_path / "style").mkdir()
    cfg = LoraTrainConfig(data=str(tmp_path / "style"), output=str(tmp_path / "out" / "s.safetensors"),
                          base_model=str(tmp_path / "sd15.safetensors"), preview_every=5,
                          preview_content=str(tmp_path / "photos"))
    meta = cfg.to_metadata()
    assert (meta["data"], meta["output"], meta["base_model"], meta["preview_content"]) == \
        ("style", "s.safetensors", "sd15.safetensors", "photos")
    assert str(tmp_path) not in json.dumps(meta)
    assert cfg.to_dict()["data"] == str(tmp_path / "style")  # checkpoints (local) keep the paths to resume
    hub = LoraTrainConfig(data="style", output="s.safetensors", base_model="owner/model").to_metadata()
    assert (hub["base_model"], hub["data"]) == ("owner/model", "style")
    db = DreamBoothConfig(data=str(tmp_path / "style"), output="o.safetensors",
                          class_data=str(tmp_path / "classes")).to_metadata()
    assert db["class_data"] == "classes" and db["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]


def _two_colour_image(width: int, height: int) -> Image.Image:
    """Green in the centred square of side min(width, height), red outside it."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[..., 0] = 255
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    arr[top:top + side, left:left + side] = (0, 255, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (128, 128)])
def test_centre_crop_covers_the_square_without_letterbox_or_stretch(tmp_path, size):
    """A wide or tall image is scaled so its shorter side fills the square and its centre is kept: only the green
    centre square is left. A letterbox would add bars (black), a stretch would squeeze in the red sides."""
    from stylora.trainer.dataset import load_style_dataset

    _two_colour_image(*size).save(tmp_path / "a.png")
    ds = load_style_dataset(tmp_path, 64, "center", use_captions=False, min_side=32)
    px = ds.pixels[0]
    assert px.shape == (3, 64, 64)
    inner = px[:, 1:-1, 1:-1].int()  # the resampling filter may blend one edge pixel
    assert (inner[1] >= 250).all() and (inner[0] <= 5).all() and (inner[2] <= 5).all()


def test_seeded_streams_differ_by_seed_and_index_and_repeat_exactly():
    from stylora.trainer.seeds import SEED_STRIDE, stream

    def first(g: torch.Generator) -> float:
        return torch.rand((), generator=g).item()

    assert first(stream(3, 7)) == first(stream(3, 7))
    draws = {first(stream(s, i)) for s in (0, 1, 2) for i in (0, 1, 2, SEED_STRIDE - 1)}
    assert len(draws) == 12  # no two (seed, index) pairs below the stride share a stream
    assert first(stream(1, 5)) == first(torch.Generator().manual_seed(1_000_003 + 5))


def test_a_training_run_in_the_repository_root_leaves_nothing_untracked(tmp_path):
    """Every file and folder a run writes beside `--output my_style.safetensors` in the checkout's root (the README's
    first command) is ignored by git: the output, checkpoints, loss log and curve, resource record, class images,
    previews, TensorBoard logs."""
    import shutil
    import subprocess
    from pathlib import Path

    from stylora.trainer.checkpoint import checkpoint_root
    from stylora.trainer.dreambooth import class_images_folder
    from stylora.trainer.loss_curve import loss_log_path

    repo = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    output = repo / "my_style.safetensors"
    written = [output, checkpoint_root(output) / "step-00000500" / "trainable.weights", loss_log_path(output),
               output.with_name("my_style.loss_curve.png"), output.with_name("my_style.resources.json"),
               class_images_folder(DreamBoothConfig(data="d", output=str(output))) / "class_00000.png",
               output.with_name("my_style.previews") / "step-00000010.png",
               output.with_name("my_style.tensorboard") / "events.out"]
    rel = [str(p.relative_to(repo)) for p in written]
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "--no-index", *rel], capture_output=True,
                             text=True).stdout.split()
    assert sorted(ignored) == sorted(rel)
