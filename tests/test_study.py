"""`stylora study` with the tiny model and the stand-in ComfyUI server (the real server: test_study_comfyui.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import count_calls, make_style_folder, skimage_photos
from PIL import Image
from safetensors.torch import save_file
from stylora.cli import main as cli_main
from stylora.eval.metrics import LPIPS, VGGStyle
from stylora.study import inputs, runner
from stylora.study.config import StudyConfig, load_study_config
from stylora.trainer.config import LoraTrainConfig
from stylora.workflows.client import ServerError
from test_run import FakeComfy

TRAIN_TOML = """
[train.lora]
resolution = 64
steps = 1
batch_size = 1
min_images = 1
warmup_steps = 0
checkpoint_every = 0

[train.dreambooth-lora]
resolution = 64
steps = 1
num_class_images = 1
class_sample_steps = 1
min_images = 1
checkpoint_every = 0
gradient_checkpointing = false
use_8bit_adam = false
"""


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_config_from_toml_with_flags_on_top_and_bad_values_named(tmp_path):
    path = _toml(tmp_path, """
content = "photos"
out = "study"
server = ["http://a:8188", "http://b:8188"]
methods = ["base", "lora"]
strengths = [0.25, 0.5, 0.75]
[styles]
monet = "data/monet"
ukiyo-e = "data/ukiyoe"
[train.lora]
steps = 100
rank = 8
""")
    cfg = load_study_config(path, {"strengths": [0.5], "train": ["lora.steps=7"], "checkpoint": "x.safetensors"})
    assert cfg.styles == (("monet", "data/monet"), ("ukiyo-e", "data/ukiyoe"))
    assert cfg.server == ("http://a:8188", "http://b:8188") and cfg.strengths == (0.5,)
    lora = cfg.train_config("lora", "data/monet", "m.safetensors")
    assert isinstance(lora, LoraTrainConfig) and (lora.steps, lora.rank) == (7, 8)  # flag over file, file kept
    assert cfg.checkpoint == "x.safetensors" and cfg.shown_strength == 0.5
    assert load_study_config(path, {}).shown_strength == 0.5  # the middle of 0.25, 0.5, 0.75
    assert cfg.train_config("dreambooth-lora", "d", "o.safetensors").lora
    for flags, match in [({"methods": ["lora", "sdxl"]}, r"methods: unknown \['sdxl'\]"),
                         ({"strengths": [1.5]}, r"strengths: each must be in 0..1, got \[1.5\]"),
                         ({"train": ["lora.stepz=3"]}, r"train.lora: unknown setting 'stepz'"),
                         ({"train": ["lora.steps=0"]}, r"train.lora: steps must be >= 1 and finite, got 0"),
                         ({"train": ["dreambooth.resolution=100"]}, r"train.dreambooth: resolution must be a multiple"),
                         ({"styles": ["monet"]}, r"--style: 'monet' must be KEY=VALUE"),
                         ({"table_strength": 0.3}, r"table_strength: 0.3 is not one of strengths")]:
        with pytest.raises(ValueError, match=match):
            load_study_config(path, flags)
    with pytest.raises(ValueError, match=r"unknown settings \['colour'\]"):
        load_study_config(_toml(tmp_path, 'colour = "red"\n'))
    with pytest.raises(ValueError, match="missing required setting --content"):
        load_study_config(None, {"out": "o", "styles": ["a=b"]})
    example = load_study_config(Path(__file__).parent.parent / "examples" / "study_wikiart.toml")
    assert [n for n, _ in example.styles] == ["monet", "ukiyo-e", "pop-art", "sketch", "minimalism"]
    assert example.train_config("dreambooth", "d", "o.safetensors").steps == 1000


def test_training_is_reused_resumed_or_redone_by_its_saved_settings(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "train_lora", lambda cfg, **kw: calls.append(kw))
    cfg = LoraTrainConfig(data="d", output=str(tmp_path / "lora.safetensors"), steps=3)

    def finish(c):  # what the trainer leaves: the file with its settings in the metadata, and the resource record
        save_file({"x": torch.zeros(1)}, c.output, metadata={"stylora.config": json.dumps(c.to_dict())})
        Path(c.output).with_suffix(".resources.json").write_text("{}")

    runner.train_artifact("lora", cfg, progress=False)
    assert calls == [{"overwrite": True, "progress": False}]  # nothing there: a fresh run
    finish(cfg)
    runner.train_artifact("lora", cfg, progress=False)
    assert len(calls) == 1  # finished with these settings: reused
    runner.train_artifact("lora", LoraTrainConfig(**{**cfg.__dict__, "steps": 4}), progress=False)
    assert calls[-1] == {"overwrite": True, "progress": False}  # other settings: trained again
    Path(cfg.output).unlink()
    (tmp_path / "lora.checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "lora.checkpoints" / "step-00000002" / "COMPLETE").write_text("")
    runner.train_artifact("lora", cfg, progress=False)
    assert calls[-1] == {"resume": True, "progress": False}  # interrupted: resumed


@pytest.fixture
def study_inputs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, arr in list(skimage_photos().items())[:3]:
        Image.fromarray(arr).convert("RGB").resize((64, 48)).save(photos / f"{name}.png")
    return {"photos": photos, "style": make_style_folder(tmp_path / "monet"), "models": tmp_path / "models"}


def test_study_runs_resumes_and_reports_unavailable_metrics(tiny_model, study_inputs, tmp_path, monkeypatch):
    # No Inception weights here (offline, empty caches): FID, KID and ArtFID must come out "unavailable".
    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("STYLORA_WEIGHTS_DIR", raising=False)
    nets = {"lpips": LPIPS("alex", pretrained=False), "vgg": VGGStyle(pretrained=False)}
    counts = count_calls(monkeypatch, runner, ("train_lora", "train_dreambooth", "evaluate"))
    path = _toml(tmp_path, TRAIN_TOML)
    out = tmp_path / "study"
    flags = {"styles": [f"monet={study_inputs['style']}"], "content": str(study_inputs["photos"]), "out": str(out),
             "base_model": str(tiny_model["diffusers"]), "checkpoint": "sd15.safetensors",
             "server_models": [str(study_inputs["models"])], "methods": ["base", "lora", "dreambooth-lora", "image"],
             "strengths": [0.3, 0.6], "seeds": [0]}
    cfg = load_study_config(path, flags)

    # 1. Killed mid-way through stylising (the only server goes away after 4 prompts): an error, work kept.
    # A server without the painting node (Style From Image): the image method is skipped and the report says why.
    dying = FakeComfy(models=study_inputs["models"], drop_after=4, without=("StyleFromImage",))
    with pytest.raises(ServerError, match="cannot reach"):
        runner.run_study(StudyConfig(**{**cfg.__dict__, "server": (dying.url,)}), progress=False, nets=nets)
    assert counts == {"train_lora": 1, "train_dreambooth": 1, "evaluate": 0}
    # 2. Rerun: training reused, the 3 finished images kept, the rest stylised, scored, reported.
    comfy = FakeComfy(models=study_inputs["models"], without=("StyleFromImage",))
    report = runner.run_study(StudyConfig(**{**cfg.__dict__, "server": (comfy.url,)}), progress=False, nets=nets)
    assert counts == {"train_lora": 1, "train_dreambooth": 1, "evaluate": 1}
    assert len(comfy.prompts) == 3 * 6 - 3  # (base, lora, dreambooth-lora) x 2 strengths x 3 photos, minus 3 done
    styled = sorted(p.relative_to(out / "styled") for p in (out / "styled").rglob("*.png"))
    assert len(styled) == 18 and Path("_base/base/s0.30_seed0/astronaut.png") in styled
    lora_prompt = next(p for p in comfy.prompts if "2" in p and
                       p["4"]["inputs"]["text"] == ["2", 3])  # the prompt is Load Style LoRA's trigger
    assert lora_prompt["2"]["inputs"]["style"].startswith("stylora-study-monet-lora-")
    assert (study_inputs["models"] / "styles" / lora_prompt["2"]["inputs"]["style"]).is_file()
    # 3. The report: every method row and the mean, unavailable metrics named, the image method skipped.
    md = (out / "report" / "report.md").read_text()
    for method in ("base", "lora", "dreambooth-lora", "image"):
        assert f"| {method} | monet |" in md and f"| {method} | all styles (mean) |" in md
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora | monet |"))
    cells = [c.strip() for c in lora_row.strip("|").split("|")]
    assert cells[2] != "unavailable" and cells[7:10] == ["unavailable"] * 3  # SSIM measured; FID, KID, ArtFID not
    assert cells[5] != "unavailable" and "| LPIPS to style < 0.3 |" in md  # LPIPS to the style and its target
    assert "inception" in md.lower() and "not available on this server" in md
    rows = {(r["method"], r["strength"]): r for r in report["rows"]}
    assert rows["lora", 0.3]["values"]["fid"] is None and "pt_inception" in rows["lora", 0.3]["unavailable"]["fid"]
    assert rows["base", 0.3]["values"]["train_seconds"] is None and rows["lora", 0.3]["values"]["train_seconds"] > 0
    assert rows["lora", 0.3]["values"]["ssim"] == pytest.approx(report["mean"][2]["values"]["ssim"])
    assert report["targets"]["verdicts"]["lora"]["fid"] == "unmeasured"
    assert json.loads((out / "report" / "report.json").read_text(), parse_constant=pytest.fail)["photos"] == 3
    # The loss curves: the trainers' CSV logs, one line per trained method, in the figure and the table.
    from stylora.trainer.loss_curve import read_loss_log

    for method in ("lora", "dreambooth-lora"):
        steps, losses = read_loss_log(out / "train" / "monet" / f"{method}.train_log.csv")
        assert report["loss_curves"][f"monet/{method}"] == {"steps": steps, "loss": losses} and steps
        assert f"| monet | {method} | {steps[-1]} | {losses[0]:.4g} | {losses[-1]:.4g} |" in md
        assert (out / "train" / "monet" / f"{method}.loss_curve.png").is_file()
    assert "![loss curves](loss_curves.png)" in md and "monet/base" not in report["loss_curves"]
    for f in ("grid_monet.png", "sweep_base.png", "sweep_lora.png", "sweep_dreambooth-lora.png", "loss_curves.png"):
        assert (out / "report" / f).is_file()
    assert {p.name for p in (out / "logs").iterdir()} >= {"train.log", "stylize.log", "evaluate.log", "report.log"}
    assert set(report["stages"]) == {"train", "place", "stylize", "evaluate", "report"}
    # 4. The same command again redoes nothing: no training, no prompt, no scoring; the outputs untouched.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "styled").rglob("*.png")}
    argv = ["study", "--config", str(path), "--style", f"monet={study_inputs['style']}", "--content",
            str(study_inputs["photos"]), "--out", str(out), "--base-model", str(tiny_model["diffusers"]),
            "--checkpoint", "sd15.safetensors", "--server-models", str(study_inputs["models"]), "--methods", "base",
            "lora", "dreambooth-lora", "image", "--strengths", "0.3", "0.6", "--server", comfy.url, "--no-progress"]
    assert cli_main(argv) == 0
    assert counts == {"train_lora": 1, "train_dreambooth": 1, "evaluate": 1} and len(comfy.prompts) == 15
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "styled").rglob("*.png")}
    dying.close()
    comfy.close()


def test_study_runs_adain_in_process_and_skips_it_without_weights(study_inputs, tmp_path, monkeypatch):
    """The classical baseline needs no ComfyUI: the server URL is never contacted. Without its weights the method
    is skipped, the report naming both files."""
    from stylora.baseline.adain import AdaIN
    from test_adain import _random_files

    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "nothing"))
    nets = {"lpips": LPIPS("alex", pretrained=False), "vgg": VGGStyle(pretrained=False)}
    flags = {"styles": [f"monet={study_inputs['style']}"], "content": str(study_inputs["photos"]),
             "out": str(tmp_path / "none"), "methods": ["adain"], "strengths": [0.5, 1.0],
             "server": ["http://127.0.0.1:9"], "metrics": ["ssim", "lpips", "lpips_style", "gram"]}
    report = runner.run_study(load_study_config(None, flags), progress=False, nets=nets)
    md = (tmp_path / "none" / "report" / "report.md").read_text()
    assert "skipped: AdaIN unavailable: vgg_normalised.pth and decoder.pth missing" in md
    assert report["rows"][0]["values"]["ssim"] is None

    _random_files(tmp_path / "weights")
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "weights"))
    out = tmp_path / "study"
    report = runner.run_study(load_study_config(None, {**flags, "out": str(out)}), progress=False, nets=nets)
    outputs = sorted((out / "styled" / "monet" / "adain").rglob("*.png"))
    assert len(outputs) == 6  # 3 photos x 2 strengths
    # alpha = strength: the full-strength output is AdaIN of the photo with the style's first painting
    model = AdaIN()
    photo = study_inputs["photos"] / "astronaut.png"
    painting = sorted(study_inputs["style"].iterdir())[0]
    from stylora.baseline.adain import fit_image, to_tensor
    from stylora.core.images import load_image

    expected = model(to_tensor(fit_image(load_image(photo), 512)), to_tensor(fit_image(load_image(painting), 512)))
    got = np.asarray(Image.open(out / "styled" / "monet" / "adain" / "s1.00_seed0" / "astronaut.png"), np.float32)
    assert np.abs(got / 255 - expected[0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6
    md = (out / "report" / "report.md").read_text()
    row = next(r for r in report["rows"] if r["strength"] == 1.0)
    assert row["values"]["ssim"] is not None and row["values"]["lpips_style"] is not None
    assert row["values"]["seconds_per_image"] > 0 and row["unavailable"]["train_seconds"] == "none (no training)"
    assert "| adain | monet |" in md and "| adain | all styles (mean) |" in md
    verdict = report["targets"]["verdicts"]["adain"]["lpips_style"]
    assert verdict == ("met" if report["mean"][0]["values"]["lpips_style"] < 0.3 else "not met")


def test_study_trains_textual_inversion_and_prompts_with_the_embedding(tiny_model, study_inputs, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.delenv("STYLORA_WEIGHTS_DIR", raising=False)
    nets = {"lpips": LPIPS("alex", pretrained=False), "vgg": VGGStyle(pretrained=False)}
    path = _toml(tmp_path, "[train.textual-inversion]\nresolution = 64\nsteps = 2\nbatch_size = 1\nmin_images = 1\n"
                           "checkpoint_every = 0\nlog_every = 1\n")
    comfy = FakeComfy(models=study_inputs["models"])
    flags = {"styles": [f"monet={study_inputs['style']}"], "content": str(study_inputs["photos"]),
             "out": str(tmp_path / "study"), "base_model": str(tiny_model["diffusers"]),
             "checkpoint": "sd15.safetensors", "server_models": [str(study_inputs["models"])],
             "methods": ["textual-inversion"], "strengths": [0.5],
             "server": [comfy.url], "metrics": ["ssim", "lpips", "lpips_style"]}
    report = runner.run_study(load_study_config(path, flags), progress=False, nets=nets)
    placed = sorted((study_inputs["models"] / "embeddings").iterdir())
    assert len(placed) == 1 and placed[0].name.startswith("stylora-study-monet-textual-inversion-")
    assert len(comfy.prompts) == 3
    texts = {n["inputs"]["text"] for p in comfy.prompts for n in p.values()
             if n.get("_meta", {}).get("title") == "Positive prompt"}
    assert texts == {f"a painting in the style of embedding:{placed[0].stem}"}
    assert all(n["inputs"]["cfg"] == 5.0 for p in comfy.prompts for n in p.values()
               if n.get("class_type") == "KSampler")
    row = report["rows"][0]
    assert row["method"] == "textual-inversion" and row["values"]["ssim"] is not None
    assert row["values"]["train_seconds"] > 0 and report["loss_curves"]["monet/textual-inversion"]["steps"] == [1, 2]
    assert (tmp_path / "study" / "report" / "loss_curves.png").is_file()
    comfy.close()


def _flags(study_inputs, tmp_path, **more) -> dict:
    return {"styles": [f"monet={study_inputs['style']}"], "content": str(study_inputs["photos"]),
            "out": str(tmp_path / "study"), "methods": ["base", "lora"], "strengths": [0.5], **more}


@pytest.mark.parametrize("flags, error, match", [
    ({"metrics": ["ssim", "fidd"]}, ValueError, r"metrics: unknown \['fidd'\]; choose from \['ssim'"),
    ({"server": ["http://127.0.0.1:99999"]}, ValueError, r"--server 'http://127.0.0.1:99999': not a valid URL"),
    ({"server": ["http://127.0.0.1:9"]}, ServerError, r"server: none of \['http://127.0.0.1:9'\] can stylise.*"
                                                       r"cannot reach it"),
    ({"eval_device": "gpu"}, ValueError, r"device must be 'cpu', 'cuda'"),
])
def test_what_would_fail_late_is_refused_before_the_first_step(study_inputs, tmp_path, monkeypatch, flags, error,
                                                               match):
    calls = count_calls(monkeypatch, runner, ("train_lora", "run_workflow", "evaluate"))
    with pytest.raises(error, match=match):
        runner.run_study(load_study_config(None, _flags(study_inputs, tmp_path, **flags)), progress=False)
    assert calls == {"train_lora": 0, "run_workflow": 0, "evaluate": 0} and not (tmp_path / "study").exists()


def test_a_server_without_the_pack_or_unreachable_is_left_out_with_a_warning(study_inputs, tmp_path, caplog):
    good, bare = FakeComfy(), FakeComfy(without=("LoadStyleLoRA", "StyleStrength"))
    try:
        cfg = load_study_config(None, _flags(study_inputs, tmp_path,
                                             server=[bare.url, "http://127.0.0.1:9", good.url]))
        assert inputs.usable_servers(cfg) == (good.url,)
        assert f"server {bare.url}: left out" in caplog.text and "LoadStyleLoRA, StyleStrength not installed" \
            in caplog.text and "server http://127.0.0.1:9: left out" in caplog.text
        # Only the optional `image` method needs Style From Image: a server without it stays.
        plain = FakeComfy(without=("StyleFromImage",))
        cfg = load_study_config(None, _flags(study_inputs, tmp_path, server=[plain.url], methods=["lora", "image"]))
        assert inputs.usable_servers(cfg) == (plain.url,)
        plain.close()
        with pytest.raises(ServerError, match=r"none of .* can stylise the study: .*LoadStyleLoRA"):
            inputs.usable_servers(load_study_config(None, _flags(study_inputs, tmp_path, server=[bare.url])))
    finally:
        good.close()
        bare.close()


def test_style_folders_are_read_recursively_and_a_broken_painting_is_skipped(tmp_path, caplog):
    nested = tmp_path / "style" / "a" / "b"
    nested.mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(nested / "z.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "style" / "a" / "y.jpg")
    (tmp_path / "style" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "style" / ".hidden.png").write_bytes(b"")
    assert inputs.paintings(tmp_path / "style", "monet") == [nested / "z.png", tmp_path / "style" / "a" / "y.jpg"]
    assert "styles.monet:" in caplog.text and "x.png skipped" in caplog.text
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "p.png")
    # Images only in subfolders: a style folder, as `stylora train lora --data` reads it.
    inputs.check_inputs(load_study_config(None, {"styles": [f"s={tmp_path / 'style'}"], "content": str(photos),
                                                 "out": str(tmp_path / "o")}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"styles.e: no images in .*empty \(searched recursively\)"):
        inputs.check_inputs(load_study_config(None, {"styles": [f"e={tmp_path / 'empty'}"], "content": str(photos),
                                                     "out": str(tmp_path / "o")}))
    with pytest.raises(FileNotFoundError, match=r"content: not a folder: .*nowhere"):
        inputs.check_inputs(load_study_config(None, {"styles": [f"s={tmp_path / 'style'}"], "out": "o",
                                                     "content": str(tmp_path / "nowhere")}))
    with pytest.raises(ValueError, match=r"styles.b: no readable image in"):
        inputs.paintings(_only_broken(tmp_path), "b")


def _only_broken(tmp_path: Path) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


def test_a_trained_style_is_reused_only_for_the_same_paintings(tmp_path, monkeypatch):
    calls = []
    data = tmp_path / "paintings"
    data.mkdir()
    Image.new("RGB", (8, 8), "red").save(data / "a.png")

    def train(cfg, **kw):  # what the trainer leaves: the file with its settings, and the resource record
        calls.append(kw)
        save_file({"x": torch.zeros(1)}, cfg.output, metadata={"stylora.config": json.dumps(cfg.to_metadata())})
        Path(cfg.output).with_suffix(".resources.json").write_text("{}")

    monkeypatch.setattr(runner, "train_lora", train)
    cfg = LoraTrainConfig(data=str(data), output=str(tmp_path / "lora.safetensors"), steps=3)
    runner.train_artifact("lora", cfg, progress=False)
    record = json.loads((tmp_path / "lora.data.json").read_text())
    names_bytes = hashlib.sha256(b"a.png\0" + (data / "a.png").read_bytes() + b"\0").hexdigest()
    assert record == {"data": "paintings", "sha256": names_bytes}  # the folder's name, never its absolute path
    runner.train_artifact("lora", cfg, progress=False)
    assert len(calls) == 1  # same settings, same paintings: reused
    Image.new("RGB", (8, 8), "blue").save(data / "a.png")  # every painting replaced under the same name and size
    runner.train_artifact("lora", cfg, progress=False)
    assert len(calls) == 2 and calls[-1] == {"overwrite": True, "progress": False}
    Image.new("RGB", (8, 8), "blue").save(data / "b.png")  # a painting added
    runner.train_artifact("lora", cfg, progress=False)
    assert len(calls) == 3
    (tmp_path / "lora.data.json").write_text("[]")  # a damaged record: trained again, never reused blindly
    runner.train_artifact("lora", cfg, progress=False)
    assert len(calls) == 4


def test_prompted_methods_sample_at_their_bundled_workflows_cfg(tmp_path):
    from stylora.workflows.client import API_DIR

    def bundled_cfg(workflow: str) -> float:
        graph = json.loads((API_DIR / f"{workflow}.json").read_text())
        return next(n["inputs"]["cfg"] for n in graph.values() if n["class_type"] == "KSampler")

    cfg = load_study_config(None, {"styles": ["monet=m"], "content": "c", "out": "o",
                                   "methods": ["dreambooth", "dreambooth-lora", "textual-inversion"]})
    names = {("monet", m): f"{m}.safetensors" for m in ("dreambooth", "dreambooth-lora", "textual-inversion")}
    for method, workflow in (("dreambooth", "dreambooth"), ("dreambooth-lora", "dreambooth"),
                             ("textual-inversion", "textual_inversion")):
        run = runner.job_run_config(cfg, runner.Job("monet", method, 0.5, 0), {"monet": "m"}, names, tmp_path,
                                    {"monet": tmp_path / "p.png"})
        assert f"Sampler.cfg={bundled_cfg(workflow)}" in run.set
    assert bundled_cfg("dreambooth") == 7.0 and bundled_cfg("textual_inversion") == 5.0


def test_each_method_runs_its_workflow_with_the_studys_settings(tmp_path):
    cfg = load_study_config(None, {"styles": ["monet=m"], "content": "c", "out": "o", "checkpoint": "sd.safetensors",
                                   "methods": ["base", "lora", "image"], "max_side": 384, "sampler_steps": 12,
                                   "set": ["Sampler.sampler_name=euler"]})
    names = {("monet", "lora"): "stylora-study-monet-lora-0123abcd.safetensors"}
    examples = {"monet": tmp_path / "first.png"}

    def run(method, config=cfg):
        return runner.job_run_config(config, runner.Job("monet", method, 0.4, 7), {"monet": "m"}, names,
                                     tmp_path / "out", examples)

    sets = ("Sampler.sampler_name=euler", "Content encode.max_side=384", "Sampler.steps=12")
    base, lora, image = run("base"), run("lora"), run("image")
    assert (base.workflow, base.style) == ("dreambooth", ("sd.safetensors",))  # the base checkpoint, no style
    assert base.set == (*sets, "Positive prompt.text=", "Negative prompt.text=", "Sampler.cfg=1.0")
    assert (lora.workflow, lora.style, lora.checkpoint, lora.set) == (
        "style_transfer", ("stylora-study-monet-lora-0123abcd.safetensors",), "sd.safetensors", sets)
    assert (image.workflow, image.style_image, image.checkpoint, image.set) == (
        "style_from_image", str(tmp_path / "first.png"), "sd.safetensors", sets)
    for r in (base, lora, image):
        assert (r.content, r.out, r.strength, r.seed) == ("c", str(tmp_path / "out"), 0.4, 7)
    plain = load_study_config(None, {"styles": ["monet=m"], "content": "c", "out": "o", "methods": ["lora"]})
    assert run("lora", plain).set == ()  # no max_side, no steps: the workflow's own
    with pytest.raises(Exception, match="frozen|cannot assign"):
        runner.Job("monet", "lora", 0.4, 7).strength = 0.5  # a job is a value: its key never changes under it


def test_placing_links_the_file_and_keeps_a_placed_copy_of_the_same_size(tmp_path):
    source = tmp_path / "train" / "a.safetensors"
    source.parent.mkdir()
    source.write_bytes(b"12345678")
    target = tmp_path / "models" / "styles" / "a-1.safetensors"
    target.parent.mkdir(parents=True)
    (target.parent / f".{target.name}.{os.getpid()}.tmp").write_bytes(b"stale, from a killed run")
    runner.place(source, target)
    assert os.path.samefile(source, target)  # a hard link (one file system): no second copy of a 4 GB checkpoint
    assert sorted(p.name for p in target.parent.iterdir()) == ["a-1.safetensors"]  # the stale temporary is gone
    target.unlink()
    target.write_bytes(b"ABCDEFGH")  # a server's copy of the same size: kept as it is
    runner.place(source, target)
    assert target.read_bytes() == b"ABCDEFGH"
    target.write_bytes(b"ABC")  # another size: replaced
    runner.place(source, target)
    assert target.read_bytes() == b"12345678"


def test_outputs_fingerprint_sees_new_and_resized_files_not_hidden_ones(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "1.png").write_bytes(b"x")
    before = runner._folders_fingerprint([a, b], ("ssim",))
    (a / ".partial.png").write_bytes(b"being written")
    (a / "sub").mkdir()
    assert runner._folders_fingerprint([a, b], ("ssim",)) == before  # hidden files and folders do not count
    assert runner._folders_fingerprint([a, b], ("ssim", "fid")) != before  # other metrics: scored again
    (a / "1.png").write_bytes(b"xx")
    resized = runner._folders_fingerprint([a, b], ("ssim",))
    b.mkdir()
    (b / "2.png").write_bytes(b"y")
    assert len({before, resized, runner._folders_fingerprint([a, b], ("ssim",))}) == 3


def test_a_style_is_scored_again_only_when_its_outputs_changed(tmp_path, monkeypatch):
    cfg = load_study_config(None, {"styles": ["monet=m"], "content": str(tmp_path / "photos"),
                                   "out": str(tmp_path / "study"), "methods": ["lora"], "metrics": ["ssim"]})
    calls = []

    def evaluate(eval_cfg, nets=None, progress=True):
        calls.append((eval_cfg.names, progress))
        Path(eval_cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(eval_cfg.out) / "report.json").write_text(json.dumps({"scored": len(calls)}))
        return {"scored": len(calls)}

    monkeypatch.setattr(runner, "evaluate", evaluate)
    jobs = [runner.Job("monet", "lora", 0.5, 0), runner.Job("other", "lora", 0.5, 0), runner.Job("monet", "lora", 1, 0)]
    manifest = runner.Manifest(tmp_path / "study" / "study.json", cfg)
    score = lambda: runner.score_style(cfg, manifest, "monet", tmp_path / "m", jobs, tmp_path / "photos", None)  # noqa: E731
    assert score() is None and calls == []  # nothing stylised yet
    for key in ("monet/lora/s0.50_seed0", "other/lora/s0.50_seed0"):
        (tmp_path / "study" / "styled" / key).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "study" / "styled" / key / "p.png")
    assert score() == {"scored": 1} and calls == [(("monet/lora/s0.50_seed0",), False)]  # its own style's, quietly
    assert score() == {"scored": 1} and len(calls) == 1  # nothing changed: the saved report
    Image.new("RGB", (16, 16)).save(tmp_path / "study" / "styled" / "monet/lora/s0.50_seed0" / "p.png")
    assert score() == {"scored": 2}  # an output replaced: scored again
    (tmp_path / "study" / "eval" / "monet" / "report.json").unlink()
    assert score() == {"scored": 3}  # the report gone: scored again


def test_adain_outputs_keep_earlier_ones_and_a_bad_photo_fails_alone(tmp_path, monkeypatch):
    photos = [tmp_path / f"{n}.png" for n in ("a", "bad", "c", "d")]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "d.png").write_bytes(b"done earlier")

    def stylize_file(model, photo, painting, out, strength, max_side, device):
        if photo.stem == "bad":
            raise ValueError("bad.png: cannot\n identify image")
        return {"a": 1.5, "c": 2.5}[photo.stem]

    monkeypatch.setattr(runner, "stylize_file", stylize_file)
    result = runner.stylize_adain(torch.nn.Linear(1, 1), photos, tmp_path / "p.png", tmp_path / "out", 0.5, 512)
    assert result.failed == [(str(photos[1]), "bad.png: cannot identify image")]
    assert result.done == [(str(photos[0]), str(tmp_path / "out" / "a.png"), 1.5),
                           (str(photos[2]), str(tmp_path / "out" / "c.png"), 2.5)]


def test_training_returns_the_artifact_on_every_path_and_says_false_when_not_reusable(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "train_lora", lambda cfg, **kw: None)
    (tmp_path / "paintings").mkdir()
    cfg = LoraTrainConfig(data=str(tmp_path / "paintings"), output=str(tmp_path / "lora.safetensors"), steps=3)
    output = Path(cfg.output)
    assert runner.same_settings(output, cfg) is False  # nothing there
    assert runner.train_artifact("lora", cfg, progress=False) == output  # fresh
    (tmp_path / "lora.checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "lora.checkpoints" / "step-00000002" / "COMPLETE").write_text("")
    assert runner.train_artifact("lora", cfg, progress=False) == output  # resumed
    save_file({"x": torch.zeros(1)}, cfg.output, metadata={"stylora.config": "not json"})
    output.with_suffix(".resources.json").write_text("{}")
    assert runner.same_settings(output, cfg) is False  # unreadable settings: not reused
    runner._write_data_record(output, cfg)  # the same paintings, but settings that cannot be read or compared
    assert runner.same_settings(output, cfg) is False
    for config in ("[]", None):  # a list; none saved
        save_file({"x": torch.zeros(1)}, cfg.output, metadata={} if config is None else {"stylora.config": config})
        assert runner.same_settings(output, cfg) is False
    save_file({"x": torch.zeros(1)}, cfg.output, metadata={"stylora.config": json.dumps(cfg.to_metadata())})
    assert runner.same_settings(output, cfg) is True
    data_record = tmp_path / "lora.data.json"
    data_record.write_text("[]")  # damaged: which paintings is unknown
    assert runner.same_settings(output, cfg) is False
    data_record.unlink()
    assert runner.same_settings(output, cfg) is False


def test_stage_seconds_add_up_over_reruns_and_count_the_running_stage(tmp_path, monkeypatch):
    cfg = load_study_config(None, {"styles": ["monet=m"], "content": "c", "out": str(tmp_path)})
    clock = iter([100.0, 103.0, 110.0, 200.0, 201.5, 205.0])
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    manifest = runner.Manifest(tmp_path / "study.json", cfg)
    with manifest.stage("train"):  # starts at 100
        assert manifest.stage_seconds() == {"train": 3.0}  # running: 103 - 100
    assert manifest.stage_seconds() == {"train": 10.0}  # ended at 110
    again = runner.Manifest(tmp_path / "study.json", cfg)  # a rerun reads the saved times
    with again.stage("train"):  # starts at 200
        assert again.stage_seconds() == {"train": 11.5}  # 10 earlier + 1.5 so far
    assert again.stage_seconds() == {"train": 15.0}


def test_a_progress_bar_counts_every_task_to_its_total(study_inputs, tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, disable, **kw):
            self.total, self.disable, self.n, self.closed = total, disable, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix_str(self, s):
            pass

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "nothing"))  # AdaIN skipped: no server, no scoring
    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    flags = {"styles": [f"monet={study_inputs['style']}"], "content": str(study_inputs["photos"]),
             "out": str(tmp_path / "study"), "methods": ["adain"], "strengths": [0.5, 1.0], "metrics": ["ssim"]}
    runner.run_study(load_study_config(None, flags), progress=True)
    # 2 jobs x 3 photos + 1 style scored + the report = 8 tasks
    assert [(b.total, b.n, b.disable, b.closed) for b in bars] == [(8, 8, False, True)]
