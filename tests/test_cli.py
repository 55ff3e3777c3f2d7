"""The `stylora` command: flags map onto the config, errors name the bad argument, info prints metadata."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_each_kind_of_error_is_one_line_with_its_exit_code():
    from stylora.cli import error_line

    unexpected = " (unexpected; rerun with --verbose or STYLORA_DEBUG=1 for the traceback)"
    cases = [  # (exception, command) -> (line, exit code): 1 the run failed, 2 the command line or inputs are wrong
        ((PermissionError(13, "Permission denied", "/x/out"), "train"),
         ("/x/out: permission denied (check the path and its folder's permissions)", 1)),
        ((IsADirectoryError(21, "Is a directory", "/x/d"), "eval"),
         ("/x/d: is a folder, not a file (check the path and its folder's permissions)", 1)),
        ((NotADirectoryError(20, "Not a directory", "/x/f/g"), "eval"),
         ("/x/f/g: is not a folder (check the path and its folder's permissions)", 1)),
        ((OSError(28, "No space left on device", "/x/o.png"), "run"),
         ("/x/o.png: No space left on device (check the path and its folder's permissions)", 1)),
        ((FileNotFoundError(2, "No such file or directory", "/x/y.png"), "run"),
         ("/x/y.png: No such file or directory", 2)),
        ((FileExistsError(17, "File exists", "/x/o"), "train"), ("/x/o: File exists", 2)),
        ((FileNotFoundError("style s.safetensors: not found"), "run"), ("style s.safetensors: not found", 2)),
        ((ValueError("--rank must be >= 1,\n  got 0"), "train"), ("--rank must be >= 1, got 0", 2)),
        ((KeyError("rank"), "train"), ("'rank'", 2)),
        ((OSError(5, "Input/output error"), "eval"), ("[Errno 5] Input/output error", 1)),  # no file named
        ((RuntimeError("the loss is NaN at step 3"), "train"), ("the loss is NaN at step 3", 1)),
        ((FloatingPointError("overflow"), "eval"), ("overflow", 1)),
        ((ZeroDivisionError("division by zero"), "costs"), ("ZeroDivisionError: division by zero" + unexpected, 1)),
        ((AssertionError(), "costs"), ("AssertionError: AssertionError" + unexpected, 1)),
    ]
    for (e, command), expected in cases:
        assert error_line(e, command) == expected, (e, command)


def test_out_of_memory_says_what_to_lower_for_the_command():
    from stylora.cli import error_line

    train_hint = ("lower --batch-size (raise --grad-accum to keep the effective batch) or --resolution, or add "
                  "--gradient-checkpointing, --mixed-precision fp16, --use-8bit-adam; keep latent caching on "
                  "(--no-cache-latents costs memory)")
    assert error_line(MemoryError(), "train") == (f"out of memory (MemoryError); {train_hint}", 1)
    cuda = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity) " + "x" * 300
    line, code = error_line(RuntimeError(cuda.replace(". ", ".\n  ")), "eval")  # whitespace folds to one space
    assert code == 1 and line == f"out of memory ({cuda[:200]}); pass --device cpu, or score smaller images"
    assert len(line) == len("out of memory (); pass --device cpu, or score smaller images") + 200
    assert error_line(RuntimeError("DefaultCPUAllocator: OUT OF MEMORY"), "run") == (
        "out of memory (DefaultCPUAllocator: OUT OF MEMORY); use smaller inputs", 1)  # any case; other commands
    # Only a MemoryError or a RuntimeError says the machine ran out: a setting named so is the user's to fix
    assert error_line(ValueError("out of memory: the budget must be > 0"), "train") == (
        "out of memory: the budget must be > 0", 2)


def test_a_failing_command_prints_its_line_and_the_traceback_only_when_asked(monkeypatch, capsys):
    from stylora import cli

    def oom(args):
        raise MemoryError

    monkeypatch.setattr(cli, "cmd_costs", oom)
    monkeypatch.delenv("STYLORA_DEBUG", raising=False)
    assert main(["costs", "a.json"]) == 1
    assert capsys.readouterr() == ("", "stylora: error: out of memory (MemoryError); use smaller inputs\n")
    for argv, env in ((["-v", "costs", "a.json"], "0"), (["costs", "a.json"], "1")):
        monkeypatch.setenv("STYLORA_DEBUG", env)
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "in oom" in err
        assert err.endswith("MemoryError\nstylora: error: out of memory (MemoryError); use smaller inputs\n")
    monkeypatch.setenv("STYLORA_DEBUG", "0")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_costs", interrupted)
    assert main(["costs", "a.json"]) == 130
    assert capsys.readouterr() == ("", "stylora: interrupted\n")


def _trained(output, skipped=()):
    """A training result as the trainers return it (TrainResult's fields)."""
    import types

    return types.SimpleNamespace(skipped=list(skipped), resumed_from=2, steps=5, output=output, seconds=12.3,
                                 final_loss=0.12345, peak_memory_mb=321.4)


@pytest.mark.parametrize("recipe, module, name", [
    ("lora", "stylora.trainer.lora", "train_lora"),
    ("dreambooth", "stylora.trainer.dreambooth", "train_dreambooth"),
    ("textual-inversion", "stylora.trainer.textual_inversion", "train_textual_inversion"),
])
def test_train_commands_pass_the_flags_and_print_what_the_run_did(recipe, module, name, tmp_path, monkeypatch,
                                                                  capsys):
    import types

    from stylora import cli

    (tmp_path / "data").mkdir()
    output = tmp_path / "o.safetensors"
    output.write_bytes(b"\0" * 1_500_000)  # 1.5 MB
    calls = []

    def train(cfg, **kwargs):
        calls.append((cfg.output, kwargs))
        return _trained(output, [types.SimpleNamespace(path="bad.png", reason="not an image")])

    monkeypatch.setattr(f"{module}.{name}", train)
    monkeypatch.setattr(cli, "say_device", lambda cfg: None)  # no CPU estimate (accelerate caches the device: no
    #                                                            torch.cuda.is_available stand-in here)
    argv = ["train", recipe, "--data", str(tmp_path / "data"), "--output", str(output), "--base-model", str(tmp_path)]
    assert main([*argv, "--resume"]) == 0
    assert main([*argv, "--overwrite", "--no-progress"]) == 0
    assert calls == [(str(output), {"resume": True, "overwrite": False, "progress": True}),
                     (str(output), {"resume": False, "overwrite": True, "progress": False})]
    printed = ("Skipped 1 file(s):\n  bad.png: not an image\nResumed from step 2; finished at step 5.\n"
               f"Wrote {output} (1.50 MB) after 5 steps in 12 s; final loss 0.1235; peak memory 321 MB "
               "(cost record: o.resources.json)\n")
    if recipe == "textual-inversion":
        printed += "Use it as embedding:o in a ComfyUI prompt (file in models/embeddings)\n"
    assert capsys.readouterr().out == printed * 2


def test_prepare_run_adain_and_study_commands_print_their_results_and_exit_codes(tmp_path, monkeypatch, capsys):
    import types

    from conftest import make_style_folder
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "p.png")
    seen = {}

    def prepare(cfg, what, progress):
        seen["prepare"] = (cfg.source, what, progress)
        return {"count": 2, "candidates": 5, "skipped": ["x", "y", "z"]}

    monkeypatch.setattr("stylora.data.prepare.prepare", prepare)
    assert main(["prepare", "coco", "--source", str(photos), "--out", "o", "--count", "2", "--no-progress"]) == 0
    assert seen["prepare"] == (str(photos), "coco", False)
    assert capsys.readouterr().out == "Kept 2 of 5 candidate images in o (3 skipped; see manifest.json)\n"
    assert main(["prepare", "wikiart", "--source", str(photos), "--style", "Impressionism", "--out", "o"]) == 0
    assert seen["prepare"] == (str(photos), "wikiart", True) and capsys.readouterr().out.startswith("Kept 2 of 5")
    seen.clear()
    assert main(["prepare", "coco", "--source", str(tmp_path / "gone"), "--out", "o"]) == 2  # checked first
    assert "prepare" not in seen and capsys.readouterr().err == (
        f"stylora: error: --source {tmp_path / 'gone'}: not a folder (expected a COCO image folder, e.g. "
        "coco/val2017)\n")
    stats = {"images": 3, "per_style": {"a": 3}, "skipped": [{"file": "x.png", "reason": "broken"}]}
    monkeypatch.setattr("stylora.data.prepare.dataset_stats", lambda folders, out: stats)
    assert main(["prepare", "stats", str(photos), "--out", "s"]) == 0
    assert capsys.readouterr().out == ("3 images; per style: {'a': 3}\nSkipped 1 file(s) (not counted):\n"
                                       "  x.png: broken\nWrote s/summary.md, style_counts.png, size_hist.png, "
                                       "aspect_hist.png, sample_grid.png\n")
    assert main(["prepare", "stats", str(photos), str(tmp_path / "gone"), "--out", "s"]) == 2
    gone = tmp_path / "gone"
    assert capsys.readouterr().err == f"stylora: error: DIR {gone}: not a folder (expected image folders)\n"
    stats["skipped"] = []
    assert main(["prepare", "stats", str(photos), "--out", "s"]) == 0
    assert "Skipped" not in capsys.readouterr().out

    result = types.SimpleNamespace(done=[("p.png", "o/p.png", 1.0)], skipped=[], failed=[("q.png", "node 8 failed")])
    monkeypatch.setattr("stylora.workflows.client.run_workflow", lambda cfg, say: result)
    run = ["run", "--server", "http://127.0.0.1:8188", "--content", str(photos), "--out", str(tmp_path / "out")]
    assert main(run) == 1  # a failed photo: a failed run
    assert capsys.readouterr() == ("1 done, 0 skipped (output existed), 1 failed\n", "  q.png: node 8 failed\n")
    result.failed = []
    assert main(run) == 0
    assert main(["run", "--list"]) == 0 and "style_transfer\n" in capsys.readouterr().out

    monkeypatch.setattr("stylora.baseline.adain.run_adain", lambda cfg: cfg.out)
    assert main(["adain", "--content", str(photos / "p.png"), "--style", str(photos / "p.png"), "--out", "a.png"]) == 0
    assert capsys.readouterr().out == "Wrote a.png\n"

    def run_study(cfg, progress):
        seen["study"] = progress
        (Path(cfg.out) / "report").mkdir(parents=True)
        (Path(cfg.out) / "report" / "report.md").write_text("# Study\n\n| method | ssim |\n|---|---|\n| lora | 0.5 |\n")
        return {"total_seconds": 61.6}

    monkeypatch.setattr("stylora.study.runner.run_study", run_study)
    out = tmp_path / "study"
    assert main(["study", "--style", f"monet={make_style_folder(tmp_path / 'monet')}", "--content", str(photos),
                 "--out", str(out), "--methods", "adain", "--no-progress"]) == 0
    assert seen["study"] is False
    assert capsys.readouterr().out == (f"| method | ssim |\n|---|---|\n| lora | 0.5 |\nReport written to {out}/report "
                                       "(report.md, report.json, grids, sweeps); 62 s in all\n")


def test_a_command_without_its_subcommand_is_refused_by_the_parser(capsys):
    for argv in (["train"], ["prepare"], ["lora"], []):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "the following arguments are required" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:'stylora.cli' found in sys.modules:RuntimeWarning")  # runpy on an imported module
def test_python_dash_m_runs_the_command_with_its_exit_code(monkeypatch, capsys):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["stylora", "costs", "missing.resources.json"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("stylora.cli", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("stylora: error: missing.resources.json: not a readable resource record")
