"""Train Style LoRA in a real ComfyUI (the session's server, see conftest.comfy_server): trained on the random
full-size SD1.5 checkpoint at 64 px, listed and applied by Load Style LoRA without a restart, and a Cancel (POST
/interrupt) in the middle of a run followed by a rerun that continues from the kept checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set")]


def _post(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.strip().startswith("{") else {}


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as resp:
        return json.loads(resp.read())


def _wait(url: str, prompt_id: str, timeout_s: float = 1200) -> dict:
    """The prompt's history status once it has finished (success, error or interrupted)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        entry = _get(url, f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"]["status_str"] in ("success", "error")):
            return entry["status"]
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout_s} s")


def _train_graph(name: str, steps: int) -> dict:
    return {"1": {"class_type": "TrainStyle", "_meta": {"title": "Train style"},
                  "inputs": {"ckpt_name": "sd15.safetensors", "folder": "paintings", "name": name, "steps": steps,
                             "rank": 4, "learning_rate": 1e-4, "resolution": 64, "seed": 0}}}


@pytest.fixture(scope="module")
def server(comfy_server) -> dict:
    """The session's server with the style folder in its input folder (six 96 px textures)."""
    base = comfy_server["base"]
    shutil.copytree(base / "paintings", base / "input" / "paintings", dirs_exist_ok=True)
    return comfy_server


def test_node_trains_on_the_checkpoint_and_load_style_lora_lists_and_applies_it(server, tmp_path):
    from stylora.core.lora_file import read_metadata
    from stylora.workflows.client import RunConfig, run_workflow

    url, styles = server["url"], server["base"] / "models" / "styles"
    start = time.monotonic()
    status = _wait(url, _post(url, "/prompt", {"prompt": _train_graph("canvas_style", 2)})["prompt_id"])
    assert status["status_str"] == "success", status
    print(f"Train Style LoRA, 2 steps at 64 px on the full-size checkpoint: {time.monotonic() - start:.0f} s")
    meta = read_metadata(styles / "canvas_style.safetensors")
    # The same header as a style trained by the library directly (the session's mystyle, `train_lora`).
    assert set(meta) == set(read_metadata(styles / "mystyle.safetensors"))
    assert meta["stylora.steps"] == "2" and meta["stylora.resolution"] == "64"
    # The user's checkpoint, by the name of the file it resolves to (models/checkpoints/sd15.safetensors is a link
    # here): a shared file carries no local folders.
    ckpt = server["base"] / "models" / "checkpoints" / "sd15.safetensors"
    assert meta["stylora.base_model"] == ckpt.resolve().name
    # Listed by Load Style LoRA with no restart, and applied: strength 0.5 changes the image, strength 0 does not.
    listed = _get(url, "/object_info/LoadStyleLoRA")["LoadStyleLoRA"]["input"]["required"]["style"][0]
    assert "canvas_style.safetensors" in listed
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.open(Path(__file__).parent.parent / "examples" / "stylora_content.jpg").resize((64, 64)).save(photo)
    pixels = {}
    for strength in (0.0, 0.5):
        out = tmp_path / f"s{strength}.png"
        result = run_workflow(RunConfig(content=str(photo), out=str(out), server=url, workflow="style_transfer",
                                        checkpoint="sd15.safetensors", style=("canvas_style.safetensors",),
                                        strength=strength, seed=1, set=("Sampler.steps=1",
                                                                        "Content encode.max_side=64")), poll=0.2)
        assert not result.failed, result.failed
        pixels[strength] = Image.open(out).tobytes()
    assert pixels[0.0] != pixels[0.5]
    assert "lora key not loaded" not in server["log"].read_text()


def test_cancel_mid_run_keeps_a_checkpoint_and_the_rerun_continues_to_the_total(server):
    from stylora.core.lora_file import read_metadata
    from stylora.trainer.checkpoint import checkpoint_root, complete_checkpoints

    url, out = server["url"], server["base"] / "models" / "styles" / "cancelled_style.safetensors"
    total = 6
    graph = {"prompt": _train_graph("cancelled_style", total)}
    prompt_id = _post(url, "/prompt", graph)["prompt_id"]
    # Cancel once the trainer's console bar has counted a step (the node's loop is running).
    counted = re.compile(rf"Training style LoRA:.*\| *[1-{total - 1}]/{total}")
    start = time.monotonic()
    while not counted.search(server["log"].read_text()):
        assert time.monotonic() - start < 900, "the run never reached its first step"
        assert _get(url, f"/history/{prompt_id}").get(prompt_id) is None, "the run ended before it was cancelled"
        time.sleep(0.3)
    _post(url, "/interrupt")
    status = _wait(url, prompt_id)
    assert status["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in status["messages"]), status
    kept = [s for s, _ in complete_checkpoints(checkpoint_root(out))]
    assert not out.exists() and len(kept) == 1 and 1 <= kept[0] < total, kept
    # Queued again: continues from the checkpoint and finishes all the steps.
    status = _wait(url, _post(url, "/prompt", graph)["prompt_id"])
    assert status["status_str"] == "success", status
    meta = read_metadata(out)
    assert meta["stylora.steps"] == str(total) and meta["ss_steps"] == str(total)
    record = json.loads((out.parent / "cancelled_style.resources.json").read_text())
    assert record["resumed_from"] == kept[0] and record["steps"] == total
