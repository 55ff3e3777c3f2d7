"""The `stylora` command: flags map onto the config, errors name the bad argument, info prints metadata."""

from __future__ import annotations

import json

import pytest
from stylora.cli import main, make_parser
from stylora.trainer.config import LoraTrainConfig


def test_fixed_flag_names_exist(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["train", "lora", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--data", "--base-model", "--output", "--steps", "--resolution", "--batch-size", "--rank",
                 "--seed", "--checkpoint-every", "--resume", "--config"):
        assert flag in help_text, flag


def test_defaults_are_the_plans_recipe():
    cfg = LoraTrainConfig(data="d", output="o.safetensors")
    assert cfg.rank == 4 and cfg.lora_alpha == 4.0 and cfg.learning_rate == 1e-4
    assert cfg.target_modules == ("to_q", "to_k", "to_v", "to_out.0")
    assert cfg.lr_scheduler == "cosine" and 2 <= cfg.batch_size <= 4 and cfg.resolution == 512
    assert 5000 <= cfg.steps <= 8000 and cfg.trigger == ""


@pytest.mark.parametrize("field,value,message", [
    ("resolution", 500, "resolution must be a multiple of 64"),
    ("rank", 0, "rank must be >= 1"),
    ("learning_rate", -1.0, "learning_rate must be > 0"),
])
def test_bad_settings_name_the_argument(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoraTrainConfig(data="d", output="o.safetensors", **{field: value})


def test_cli_error_is_one_clear_line(tmp_path, capsys):
    code = main(["train", "lora", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o.safetensors"),
                 "--base-model", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("stylora: error: --data") and "Traceback" not in err


def test_config_file_and_flags_merge(tmp_path, capsys):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"rank": 8, "resolution": 448, "bogus": 1}))
    assert main(["train", "lora", "--config", str(conf), "--data", "d", "--output", "o.safetensors"]) == 2
    assert "unknown settings ['bogus']" in capsys.readouterr().err
    conf.write_text(json.dumps({"rank": 8, "resolution": 500}))
    assert main(["train", "lora", "--config", str(conf), "--data", "d", "--output", "o.safetensors",
                 "--resolution", "448"]) == 2
    assert "--data d: not a folder (expected a folder of paintings" in capsys.readouterr().err


def test_lora_info_prints_metadata(tmp_path, capsys):
    import torch
    from stylora.core.lora_file import save_lora

    state = {"lora_unet_a_to_q.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_a_to_q.lora_up.weight": torch.zeros(8, 4), "lora_unet_a_to_q.alpha": torch.tensor(4.0)}
    save_lora(tmp_path / "s.safetensors", state, {"stylora.base_model": "x/y", "stylora.config": {"rank": 4}})
    assert main(["lora", "info", str(tmp_path / "s.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "1 modules, rank 4" in out and "stylora.base_model" in out and "rank: 4" in out
    assert main(["lora", "info", str(tmp_path / "s.ckpt")]) == 2
    assert "pickled" in capsys.readouterr().err
    assert main(["lora", "info", str(tmp_path / "s.safetensors"), str(tmp_path / "gone.safetensors")]) == 2
    gone = tmp_path / "gone.safetensors"  # checked before the first file is described: nothing printed
    assert capsys.readouterr() == ("", f"stylora: error: FILE {gone}: no such file (expected a .safetensors LoRA "
                                       "file; pickled .ckpt/.pt are refused, they can run code)\n")


def test_without_a_gpu_training_says_how_long_and_what_to_pass(monkeypatch, capsys):
    import torch
    from stylora import cli

    monkeypatch.setattr(cli, "CPU_SECONDS_PER_STEP", 60.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cli.say_device(LoraTrainConfig(data="d", output="o.safetensors"))  # 6000 steps x 60 s at 512 px = 100 hours
    assert capsys.readouterr().err == ("stylora: no GPU found: 6000 steps at 512 px run on the CPU, about 100 hours "
                                       "on 2 cores; for a first try pass --steps 20 --resolution 256 (see README, "
                                       "Set-up)\n")
    cli.say_device(LoraTrainConfig(data="d", output="o.safetensors", steps=20, resolution=256))  # 20 x 60 / 4 s
    assert capsys.readouterr().err == "stylora: no GPU found: 20 steps at 256 px run on the CPU, about 5 minutes on " \
                                      "2 cores\n"
    cli.say_device(LoraTrainConfig(data="d", output="o.safetensors", steps=240, resolution=512))  # 240 min: hours
    assert "about 4 hours" in capsys.readouterr().err
    cli.say_device(LoraTrainConfig(data="d", output="o.safetensors", steps=61, resolution=512))  # 61 min: a hint
    assert capsys.readouterr().err.endswith("about 61 minutes on 2 cores; for a first try pass --steps 20 "
                                            "--resolution 256 (see README, Set-up)\n")
    cli.say_device(LoraTrainConfig(data="d", output="o.safetensors", steps=60, resolution=512))  # 60 min: none
    assert capsys.readouterr().err.endswith("about 60 minutes on 2 cores\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli.say_device(LoraTrainConfig(data="d", output="o.safetensors"))
    assert capsys.readouterr().err == ""
