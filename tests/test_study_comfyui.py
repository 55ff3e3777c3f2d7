"""`stylora study` against real ComfyUI servers: a CI-size study (2 styles x 2 photos, base, lora and
dreambooth-lora at two strengths, 64 px, 1 sampler step, 1 training step) with the full-size SD1.5 architecture.
Skipped unless COMFYUI_DIR points at a ComfyUI checkout (see tests/test_comfyui.py for the variables)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from comfyui_env import comfyui_pythonpath
from conftest import REPO, _free_port, count_calls, make_style_folder, skimage_photos
from PIL import Image
from test_comfyui import COMFYUI_DIR

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set (see ../shared/comfyui/README.md)")]

TRAIN = ["lora.resolution=64", "lora.steps=1", "lora.batch_size=1", "lora.min_images=1", "lora.warmup_steps=0",
         "lora.checkpoint_every=0", "dreambooth-lora.resolution=64", "dreambooth-lora.steps=1",
         "dreambooth-lora.num_class_images=1", "dreambooth-lora.class_sample_steps=1", "dreambooth-lora.min_images=1",
         "dreambooth-lora.checkpoint_every=0", "dreambooth-lora.gradient_checkpointing=false",
         "dreambooth-lora.use_8bit_adam=false"]


def _start(base: Path, checkpoint: Path) -> tuple[subprocess.Popen, str]:
    """A ComfyUI on loopback with its own base folder: the pack linked in, the checkpoint as sd15.safetensors."""
    for sub in ("custom_nodes", "models/checkpoints", "models/styles", "input", "output"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / "stylora").symlink_to(REPO)
    (base / "models" / "checkpoints" / "sd15.safetensors").symlink_to(checkpoint)
    env = dict(os.environ, STYLORA_OFFLINE="1", PYTHONPATH=comfyui_pythonpath())
    port = _free_port()
    log = open(base / "server.log", "w")  # noqa: SIM115 (open while the server runs)
    proc = subprocess.Popen([os.environ.get("COMFYUI_PYTHON", sys.executable), "main.py", "--cpu", "--listen",
                             "127.0.0.1", "--port", str(port), "--base-directory", str(base)],
                            cwd=COMFYUI_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # start-up on a loaded 2-core machine: about a minute, rarely more
    while True:
        try:
            urllib.request.urlopen(url + "/queue", timeout=5)
            return proc, url
        except OSError:
            log_tail = (base / "server.log").read_text()[-3000:]
            assert proc.poll() is None, f"ComfyUI exited with {proc.returncode} while starting:\n{log_tail}"
            assert time.monotonic() < deadline, f"ComfyUI did not answer {url}/queue within 600 s:\n{log_tail}"
            time.sleep(1)


@pytest.fixture(scope="module")
def servers(sd15_checkpoint, tmp_path_factory):
    started = []
    for name in ("a", "b"):
        base = tmp_path_factory.mktemp(f"comfy_{name}")
        proc, url = _start(base, sd15_checkpoint)
        started.append({"proc": proc, "url": url, "models": base / "models"})
    yield started
    for s in started:
        if s["proc"].poll() is None:
            s["proc"].terminate()
            s["proc"].wait(timeout=60)


def _history(url: str) -> int:
    with urllib.request.urlopen(url + "/history", timeout=30) as resp:
        return len(json.loads(resp.read()))


def _outputs(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(Image.open(p).convert("RGB"))
            for p in sorted((out / "styled").rglob("*.png"))}


def test_study_on_real_comfyui_resumes_after_kill_and_survives_a_lost_server(servers, sd15_checkpoint,
                                                                            tmp_path, monkeypatch):
    from stylora.study import runner
    from stylora.study.config import load_study_config

    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no metric weights: "unavailable"
    monkeypatch.delenv("STYLORA_WEIGHTS_DIR", raising=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, arr in list(skimage_photos().items())[:2]:
        Image.fromarray(arr).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS).save(photos / f"{name}.png")
    styles = {"texture": make_style_folder(tmp_path / "texture"), "mirror": make_style_folder(tmp_path / "mirror")}
    for p in styles["mirror"].iterdir():
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(p)
    a, b = servers

    def flags(out: Path, *server: dict) -> list[str]:
        return ["study", *[x for n, f in styles.items() for x in ("--style", f"{n}={f}")], "--content", str(photos),
                "--out", str(out), "--base-model", str(sd15_checkpoint), "--checkpoint", "sd15.safetensors",
                "--methods", "base", "lora", "dreambooth-lora", "--strengths", "0.3", "0.6", "--max-side", "64",
                "--sampler-steps", "1", "--no-progress", "--train", *TRAIN,
                *[x for s in server for x in ("--server", s["url"], "--server-models", str(s["models"]))]]

    def config(argv: list[str]):
        from stylora.cli import make_parser

        args = vars(make_parser().parse_args(argv))
        return load_study_config(None, {k: v for k, v in args.items()
                                        if k not in ("command", "what", "verbose", "config", "no_progress")})

    # 1. The whole study on one server, timed: every row in the report, metrics without weights unavailable.
    reference = tmp_path / "reference"
    start = time.monotonic()
    report = runner.run_study(config(flags(reference, a)), progress=False)
    wall = time.monotonic() - start
    shares = {k: round(v["share"], 3) for k, v in report["stages"].items()}
    print(f"CI-size study: {wall:.1f} s wall; stage shares {json.dumps(shares)}")
    md = (reference / "report" / "report.md").read_text()
    for method in ("base", "lora", "dreambooth-lora"):
        for style in ("texture", "mirror", "all styles (mean)"):
            assert f"| {method} | {style} |" in md
    row = next(r for r in report["rows"] if r["method"] == "lora" and r["style"] == "texture")
    assert 0 < row["values"]["ssim"] < 1 and row["values"]["lpips"] is None
    assert "alexnet" in row["unavailable"]["lpips"] and "pt_inception" in row["unavailable"]["fid"]
    assert row["values"]["seconds_per_image"] > 0 and row["values"]["train_seconds"] > 0
    first = _outputs(reference)
    assert len(first) == 2 * 2 * (1 + 2 * 2)  # photos x strengths x (base + 2 styles x 2 methods)

    # 2. The same command again redoes nothing: no training, no prompt, no scoring, outputs untouched.
    counts = count_calls(monkeypatch, runner, ("train_lora", "train_dreambooth", "evaluate"))
    prompts = _history(a["url"])
    stamps = {p: p.stat().st_mtime_ns for p in (reference / "styled").rglob("*.png")}
    fingerprints = json.loads((reference / "study.json").read_text())["sections"]["evaluate"]
    runner.run_study(config(flags(reference, a)), progress=False)
    assert _history(a["url"]) == prompts
    assert counts == {"train_lora": 0, "train_dreambooth": 0, "evaluate": 0}, (
        fingerprints, json.loads((reference / "study.json").read_text())["sections"]["evaluate"])
    assert stamps == {p: p.stat().st_mtime_ns for p in (reference / "styled").rglob("*.png")}

    # 3. SIGKILL in the stylising stage, then the same command: it completes, with the uninterrupted run's outputs.
    #    (The trained files are copied in, so the killed run reuses them: their settings match.)
    killed = tmp_path / "killed"
    shutil.copytree(reference / "train", killed / "train")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "stylora.cli", *flags(killed, a)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while len(list((killed / "styled").rglob("*.png"))) < 4 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    styled_before_kill = len(list((killed / "styled").rglob("*.png")))
    assert styled_before_kill >= 4, f"the study wrote {styled_before_kill} of 4 styled images within 900 s " \
                                    "(waiting for its stylising stage, to kill it there)"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= len(list((killed / "styled").rglob("*.png"))) < len(first)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _outputs(killed)
    assert after.keys() == first.keys() and all(np.array_equal(after[k], first[k]) for k in first)

    # 4. Two servers: the photos are split between them; one killed mid-study, the other finishes the work.
    split = tmp_path / "split"
    shutil.copytree(reference / "train", split / "train")
    before = {s["url"]: _history(s["url"]) for s in (a, b)}
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _catch(errors, runner.run_study, config(flags(split, a, b)),
                                                    progress=False))
    thread.start()
    deadline = time.monotonic() + 900
    while _history(b["url"]) - before[b["url"]] < 2 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _history(b["url"]) - before[b["url"]] >= 2 and thread.is_alive(), \
        f"server b ran {_history(b['url']) - before[b['url']]} of 2 prompts within 900 s (waiting to kill it " \
        f"mid-study); study still running: {thread.is_alive()}, errors: {errors}"
    b["proc"].send_signal(signal.SIGKILL)
    b["proc"].wait()
    thread.join(timeout=1800)
    assert not thread.is_alive(), "the study did not finish on server a within 1800 s after server b was killed"
    assert not errors, errors
    assert _history(a["url"]) > before[a["url"]]
    after = _outputs(split)
    assert after.keys() == first.keys() and all(np.array_equal(after[k], first[k]) for k in first)


def _catch(errors: list[BaseException], fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 (reported by the test)
        errors.append(e)


def test_ci_study_on_real_comfyui_with_textual_inversion_and_adain(sd15_checkpoint, tmp_path, monkeypatch):
    """Textual Inversion through ComfyUI (embedding:<name> in the prompt, from models/embeddings) and AdaIN
    in-process (random weights in the published layout): their rows, LPIPS to the style with its target, and the
    loss-curve figure in the report. Metric networks with random weights, so every column has a number."""
    from stylora.eval.metrics import LPIPS, VGGStyle
    from stylora.study import runner
    from stylora.study.config import load_study_config
    from test_adain import _random_files

    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    _random_files(tmp_path / "weights")
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "weights"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, arr in list(skimage_photos().items())[:2]:
        Image.fromarray(arr).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS).save(photos / f"{name}.png")
    style = make_style_folder(tmp_path / "texture")
    proc, url = _start(tmp_path / "comfy", sd15_checkpoint)
    try:
        flags = {"styles": [f"texture={style}"], "content": str(photos), "out": str(tmp_path / "study"),
                 "base_model": str(sd15_checkpoint), "checkpoint": "sd15.safetensors", "server": [url],
                 "server_models": [str(tmp_path / "comfy" / "models")], "methods": ["textual-inversion", "adain"],
                 "strengths": [0.6], "max_side": 64, "sampler_steps": 1,
                 "metrics": ["ssim", "lpips", "content", "lpips_style", "gram"],
                 "train": ["textual-inversion.resolution=64", "textual-inversion.steps=2",
                           "textual-inversion.batch_size=1", "textual-inversion.min_images=1",
                           "textual-inversion.checkpoint_every=0", "textual-inversion.log_every=1"]}
        nets = {"lpips": LPIPS("alex", pretrained=False), "vgg": VGGStyle(pretrained=False)}
        start = time.monotonic()
        report = runner.run_study(load_study_config(None, flags), progress=False, nets=nets)
        print(f"CI-size study (textual-inversion, adain): {time.monotonic() - start:.1f} s wall")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log = (tmp_path / "comfy" / "server.log").read_text()
    assert "does not exist, ignoring" not in log and "error loading embedding" not in log, log[-3000:]
    placed = list((tmp_path / "comfy" / "models" / "embeddings").glob("stylora-study-texture-textual-inversion-*"))
    assert len(placed) == 1
    md = (tmp_path / "study" / "report" / "report.md").read_text()
    for method in ("textual-inversion", "adain"):
        assert f"| {method} | texture |" in md and f"| {method} | all styles (mean) |" in md
        row = next(r for r in report["rows"] if r["method"] == method)
        assert 0 < row["values"]["ssim"] < 1 and row["values"]["lpips_style"] > 0, row
        assert row["values"]["seconds_per_image"] > 0
        assert report["targets"]["verdicts"][method]["lpips_style"] in ("met", "not met")
    assert "LPIPS to style ↓" in md and "| LPIPS to style < 0.3 |" in md
    assert "![loss curves](loss_curves.png)" in md and (tmp_path / "study" / "report" / "loss_curves.png").is_file()
    assert report["loss_curves"]["texture/textual-inversion"]["steps"] == [1, 2]
    assert len(list((tmp_path / "study" / "styled").rglob("*.png"))) == 2 * 2
    print(next(line for line in md.splitlines() if line.startswith("| textual-inversion | texture |")))
    print(next(line for line in md.splitlines() if line.startswith("| adain | texture |")))
