"""Bad input on the command line: every failure is one `stylora: error:` line naming the input, with exit 2 (usage)
or 1 (runtime), and nothing an earlier run wrote is changed or deleted."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stylora.cli import main
from stylora.core.lora_file import check_lora_fits
from stylora.nodes.mask import MaskedStyleApply
from stylora.nodes.strength import style_schedule
from stylora.trainer.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_root

FAST = ["--resolution", "64", "--batch-size", "2", "--min-images", "4", "--warmup-steps", "0", "--no-progress",
        "--log-every", "1"]


def _digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (files or folders)."""
    out = {}
    for root in roots:
        for f in ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stylora: error: "), err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in last, (n, last)
    return last


def _train(tiny_model, style_folder, output, *extra):
    return main(["train", "lora", "--data", str(style_folder), "--output", str(output),
                 "--base-model", str(tiny_model["diffusers"]), *FAST, *extra])


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied per test by `run`)."""
    from conftest import make_style_folder

    root = tmp_path_factory.mktemp("finished")
    style = make_style_folder(root / "style")
    out = root / "run" / "s.safetensors"
    assert _train(tiny_model, style, out, "--steps", "2", "--checkpoint-every", "1") == 0
    return style, out


@pytest.fixture
def run(finished, tmp_path):
    import shutil

    style, out = finished
    shutil.copytree(out.parent, tmp_path / "run")
    return style, tmp_path / "run" / out.name


# --- 10. data loss ---------------------------------------------------------------------------------------------

def test_resume_of_a_finished_output_without_checkpoints_touches_nothing(tiny_model, run, capsys):
    style, out = run
    import shutil

    shutil.rmtree(checkpoint_root(out))
    before = _digests(out.parent)
    assert _train(tiny_model, style, out, "--steps", "2", "--resume") == 2
    _one_error_line(capsys, str(out), "already finished")
    assert _digests(out.parent) == before


@pytest.mark.parametrize("bad", ["data", "base_model", "output_dir"])
def test_overwrite_deletes_nothing_before_the_new_run_is_valid(tiny_model, run, tmp_path, capsys, bad):
    style, out = run
    before = _digests(out.parent)
    data = tmp_path / "typo" if bad == "data" else style
    base = tmp_path / "no-model" if bad == "base_model" else tiny_model["diffusers"]
    if bad == "output_dir":
        (out.parent / "dir.safetensors").mkdir()
        out = out.parent / "dir.safetensors"
        before = _digests(out.parent)
    code = main(["train", "lora", "--data", str(data), "--output", str(out), "--base-model", str(base), *FAST,
                 "--steps", "2", "--checkpoint-every", "1", "--overwrite"])
    assert code == 2
    _one_error_line(capsys, {"data": "--data", "base_model": "--base-model", "output_dir": "--output"}[bad])
    assert _digests(out.parent) == before


# --- 11. silently wrong LoRAs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--learning-rate", "inf"), ("--alpha", "nan"), ("--noise-offset", "nan"),
                                        ("--min-snr-gamma", "-1"), ("--learning-rate", "-0"),
                                        ("--max-grad-norm", "nan")])
def test_non_finite_or_out_of_range_settings_are_refused(tiny_model, style_folder, tmp_path, capsys, flag, value):
    out = tmp_path / "o.safetensors"
    assert _train(tiny_model, style_folder, out, "--steps", "1", flag, value) == 2
    _one_error_line(capsys, flag[2:].replace("-", "_"))
    assert not out.exists()


@pytest.mark.parametrize("key,value,expected", [("steps", 2.5, "whole number"), ("steps", "abc", "whole number"),
                                                ("target_modules", "to_q", "list of strings"),
                                                ("learning_rate", "fast", "a number"), ("flip", "yes", "true")])
def test_config_file_values_of_the_wrong_type_name_the_key(style_folder, tmp_path, capsys, key, value, expected):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({key: value}))
    assert main(["train", "lora", "--config", str(conf), "--data", str(style_folder),
                 "--output", str(tmp_path / "o.safetensors")]) == 2
    _one_error_line(capsys, str(conf), key, expected)


def test_a_diverging_loss_stops_the_run_keeping_the_last_good_checkpoint(tiny_model, style_folder, tmp_path,
                                                                         monkeypatch, capsys):
    import stylora.trainer.losses as lora  # the style loss draws its noise here

    real = lora.denoising_loss
    calls = {"n": 0}

    def nan_at_step_three(*args, **kwargs):
        mse, *rest = real(*args, **kwargs)
        calls["n"] += 1
        return (mse * float("nan") if calls["n"] == 3 else mse), *rest

    monkeypatch.setattr(lora, "denoising_loss", nan_at_step_three)
    out = tmp_path / "d.safetensors"
    assert _train(tiny_model, style_folder, out, "--steps", "4", "--checkpoint-every", "2") == 1
    _one_error_line(capsys, "step 3", "step-00000002")
    assert not out.exists()
    from safetensors.torch import load_file

    kept = load_file(str(checkpoint_root(out) / "step-00000002" / WEIGHTS_FILE))
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert not (checkpoint_root(out) / "step-00000003").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    from stylora.trainer.checkpoint import save_checkpoint

    with pytest.raises(FloatingPointError, match="NaN or inf"):
        save_checkpoint(tmp_path / "c", 1, {"w": torch.tensor([1.0, math.nan])}, {}, {})
    assert not any((tmp_path / "c").glob("step-*"))


# --- 12. damaged checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [WEIGHTS_FILE, STATE_FILE, "info.json"])
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(tiny_model, run, capsys, caplog, damage):
    style, out = run
    out.unlink()  # killed after its last checkpoint
    newest = checkpoint_root(out) / "step-00000002" / damage
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])
    older = _digests(checkpoint_root(out) / "step-00000001")
    assert _train(tiny_model, style, out, "--steps", "2", "--checkpoint-every", "1", "--resume") == 0
    assert "Resumed from step 1" in capsys.readouterr().out
    assert any("skipping checkpoint step 2" in r.message and damage in r.message for r in caplog.records)
    assert out.is_file()
    assert _digests(checkpoint_root(out) / "step-00000001") == older


# --- 13. evaluation --------------------------------------------------------------------------------------------

def test_a_tiny_pair_is_reported_in_its_row_and_the_others_are_scored(tmp_path):
    from conftest import skimage_photos
    from stylora.eval.metrics import LPIPS, VGGStyle
    from stylora.eval.report import EvalConfig, evaluate

    content, styled = tmp_path / "content", tmp_path / "styled"
    content.mkdir()
    styled.mkdir()
    for name, arr in list(skimage_photos().items())[:2]:
        img = Image.fromarray(arr).resize((64, 64))
        img.save(content / f"{name}.png")
        img.rotate(5).save(styled / f"{name}.png")
    for side in (7, 15):
        Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(content / f"tiny{side}.png")
        Image.fromarray(np.full((side, side, 3), 100, np.uint8)).save(styled / f"tiny{side}.png")
    nets = {"lpips": LPIPS("alex", pretrained=False), "vgg": VGGStyle(pretrained=False)}
    report = evaluate(EvalConfig(content=str(content), styled=(str(styled),), out=str(tmp_path / "r"),
                                 metrics=("ssim", "lpips", "content")), nets=nets, progress=False)
    rows = {r["image"]: r for r in report["methods"]["styled"]["rows"]}
    assert "ssim" in rows["tiny7"]["error"] and "tiny7.png" in rows["tiny7"]["error"]
    assert "ssim" not in rows["tiny7"]
    assert rows["tiny15"]["ssim"] is not None  # 15 px fits the SSIM window
    for name in list(skimage_photos())[:2]:
        assert "error" not in rows[name] and {"ssim", "lpips", "content"} <= set(rows[name])


def test_style_feature_cache_is_keyed_by_the_network_weights(tmp_path):
    from stylora.eval.metrics import InceptionFeatures
    from stylora.eval.scoring import style_set_features

    files = []
    for i in range(2):
        files.append(tmp_path / f"s{i}.png")
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(files[-1])
    a, b = InceptionFeatures(pretrained=False), InceptionFeatures(pretrained=False)
    with torch.no_grad():  # "another weights file": same architecture, one layer changed
        next(b.parameters()).mul_(3.0)
    fa = style_set_features(a, files, str(tmp_path / "cache"), False, cacheable=True)
    fb = style_set_features(b, files, str(tmp_path / "cache"), False, cacheable=True)
    assert not np.allclose(fa, fb)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2


# --- 14/15. one-line errors and messages -----------------------------------------------------------------------

def test_run_with_an_invalid_server_url_is_one_line(tmp_path, capsys):
    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(photo)
    assert main(["run", "--server", "http://127.0.0.1:99999", "--content", str(photo), "--out",
                 str(tmp_path / "o.png"), "--style", "s.safetensors"]) == 2
    _one_error_line(capsys, "--server")
    assert main(["run", "--content", str(photo)]) == 2
    last = _one_error_line(capsys, "--out")
    assert "--config" not in last


def test_lora_info_and_prepare_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    assert main(["lora", "info", str(tmp_path / "broken.safetensors")]) in (1, 2)
    _one_error_line(capsys, "broken.safetensors")
    assert main(["prepare", "coco", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                 "--count", "0"]) == 2
    _one_error_line(capsys, "count")


def test_an_output_under_a_file_fails_before_training(tiny_model, style_folder, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert _train(tiny_model, style_folder, tmp_path / "afile" / "o.safetensors", "--steps", "1") == 2
    _one_error_line(capsys, "--output", "is a file, not a folder")
    assert not (tmp_path / "afile.train_log.csv").exists() and not any(tmp_path.glob("*.resources.json"))


def test_an_unwritable_output_folder_fails_before_training(tiny_model, style_folder, tmp_path, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that ignores folder permissions")
        code = _train(tiny_model, style_folder, locked / "o.safetensors", "--steps", "1")
        assert code == 1
        _one_error_line(capsys, str(locked), "not writable")
    finally:
        locked.chmod(0o700)


def test_help_is_clean(capsys):
    with pytest.raises(SystemExit):
        main(["train", "lora", "--help"])
    text = capsys.readouterr().out
    assert "option_strings" not in text and "~30% slower" in text
    assert "required (on the command line or in --config)" in text
    with pytest.raises(SystemExit):
        main(["prepare", "coco", "--help"])
    assert "WikiArt" not in capsys.readouterr().out


def test_cli_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from stylora.cli import make_parser; make_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_warmup_longer_than_the_run_warns_and_base_model_is_absolute(tiny_model, style_folder, tmp_path, caplog,
                                                                     monkeypatch):
    from stylora.core.lora_file import read_lora

    monkeypatch.chdir(tiny_model["diffusers"].parent)
    out = tmp_path / "w.safetensors"
    code = main(["train", "lora", "--data", str(style_folder), "--output", str(out), "--base-model",
                 tiny_model["diffusers"].name, *FAST, "--steps", "1", "--warmup-steps", "5",
                 "--checkpoint-every", "0"])
    assert code == 0
    assert any("warmup_steps 5 is more than steps 1" in r.message for r in caplog.records)
    meta = read_lora(out)[1]
    assert meta["stylora.base_model"] == tiny_model["diffusers"].resolve().name  # by name: no local folders


# --- Nodes: a bad input is a ValueError that names the input and the value; nothing half-applied ---------------

@pytest.mark.parametrize("call, expected", [
    (lambda: MaskedStyleApply().apply(torch.rand(1, 16, 16, 3), torch.ones(1, 16, 16, 3), 4, False),
     "mask: expected a MASK [B, H, W], got shape (1, 16, 16, 3)"),
    (lambda: MaskedStyleApply().apply(torch.rand(1, 16, 16, 3), torch.ones(1, 16, 16), -1, False),
     "feather must be >= 0 pixels, got -1"),
    (lambda: MaskedStyleApply().apply(torch.rand(1, 16, 16, 3), torch.ones(1, 16, 16), 4, False,
                                      styled=torch.rand(1, 24, 16, 3)),
     "styled image is 16x24 but content is 16x16"),
    (lambda: style_schedule(float("nan")), "strength must be in 0..1, got nan"),
    (lambda: style_schedule(1.5), "strength must be in 0..1, got 1.5"),
    (lambda: style_schedule(0.5, max_denoise=-0.1), "max_denoise must be in 0..1, got -0.1"),
])
def test_node_inputs_out_of_range_are_named(call, expected):
    with pytest.raises(ValueError) as e:
        call()
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_lora_with_nan_tensors_is_refused_with_the_count():
    good = "lora_unet_x"
    state = {f"{good}.lora_down.weight": torch.zeros(2, 8), f"{good}.lora_up.weight": torch.full((8, 2), math.nan),
             f"{good}.alpha": torch.tensor(math.inf)}
    problems = check_lora_fits(state, {good: "diffusion_model.x.weight"}, {"diffusion_model.x.weight": (8, 8)})
    assert problems == [f"2 tensors with NaN/inf values: {good}.lora_up.weight, {good}.alpha"]


@pytest.mark.parametrize("argv, expected", [
    (["train", "lora", "--data", "{tmp}/paintingz", "--output", "{tmp}/o.safetensors"],
     "--data {tmp}/paintingz: not a folder (expected a folder of paintings, searched recursively"),
    (["train", "dreambooth", "--data", "{tmp}", "--output", "{tmp}/o.safetensors", "--base-model", "{tmp}/sd.ckpt"],
     "--base-model {tmp}/sd.ckpt: no such file or folder (expected a single-file SD1.5 .safetensors"),
    (["train", "textual-inversion", "--data", "{tmp}/x", "--output", "{tmp}/o.safetensors"], "--data {tmp}/x: "),
    (["eval", "--content", "{tmp}", "--styled", "{tmp}", "{tmp}/gone", "--out", "{tmp}/r"],
     "--styled {tmp}/gone: not a folder (expected folders of stylised outputs)"),
    (["prepare", "stats", "{tmp}/nope"], "DIR {tmp}/nope: not a folder (expected image folders)"),
    (["prepare", "coco", "--source", "{tmp}/coco", "--out", "{tmp}/o"], "--source {tmp}/coco: not a folder"),
    (["lora", "info", "{tmp}/s.safetensors"], "FILE {tmp}/s.safetensors: no such file (expected a .safetensors"),
    (["adain", "--content", "{tmp}/p.png", "--style", "{tmp}/s.png", "--out", "{tmp}/o.png"],
     "--content {tmp}/p.png: no such file (expected a photo)"),
    (["run", "--workflow", "style_transfer", "--content", "{tmp}/p.png", "--style", "s", "--out", "{tmp}/o"],
     "--content {tmp}/p.png: no such file or folder (expected a photo or a folder of photos)"),
    (["calibrate", "{tmp}/s.safetensors", "--content", "{tmp}"], "--style {tmp}/s.safetensors: no such file"),
    (["study", "--style", "m={tmp}/m", "--content", "{tmp}", "--out", "{tmp}/o"],
     "styles.m: not a folder: {tmp}/m (a folder of paintings, searched recursively"),
    (["study", "--style", "m={tmp}/art", "--content", "{tmp}/art", "--out", "{tmp}/o", "--server", "http://h:99999"],
     "--server 'http://h:99999': not a valid URL"),
    (["study", "--style", "m={tmp}/art", "--content", "{tmp}/art", "--out", "{tmp}/o", "--metrics", "ssim", "fidd"],
     "metrics: unknown ['fidd']; choose from ['ssim'"),
])
def test_a_mistyped_path_is_refused_at_once_without_loading_torch(tmp_path, argv, expected):
    """Every command checks the files it names before torch and diffusers load (seconds of imports)."""
    import subprocess
    import sys
    import time

    (tmp_path / "art").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "art" / "a.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = (f"import sys; from stylora.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert proc.stderr.startswith("stylora: error: " + expected.replace("{tmp}", str(tmp_path))), proc.stderr
    assert time.monotonic() - start < 15  # about a second idle; the torch import alone took 15 s on a loaded machine


def test_help_pages_show_lists_and_only_offer_config_where_there_is_one(capsys):
    for argv, has_config in ((["run", "--help"], False), (["eval", "--help"], False), (["study", "--help"], True),
                             (["train", "lora", "--help"], True)):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert ("--config" in text) == has_config  # "required (... or in --config)" only where --config is
        assert "('" not in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: ['http://127.0.0.1:8188'])" in text and "(default: [0])" in text


def test_a_hub_base_model_missing_from_the_cache_says_what_to_pass_offline(tmp_path, monkeypatch, capsys):
    from stylora import cli

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cli.check_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache: downloading it" in err and "Offline, pass --base-model" in err
    cli.check_base_model(str(tmp_path))  # a local folder: nothing to say
    assert capsys.readouterr().err == ""
