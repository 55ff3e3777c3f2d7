"""Train Style LoRA (nodes/training.py) without ComfyUI: fake folder_paths, progress bar and interrupt modules, the
tiny SD1.5 model as the user's checkpoint, and the library's own trainer."""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import count_calls, make_style_folder
from PIL import Image
from stylora.nodes import training
from stylora.nodes.host import STYLE_FOLDER_KEY
from stylora.nodes.training import TrainStyle


class FakeComfy:
    """What the node touches of ComfyUI: folder_paths (models, input, checkpoints, the file-list cache),
    comfy.utils.ProgressBar (its hook raises on a set interrupt flag, like the server's), comfy.model_management
    (interrupt flag, unloading). `events` records unloads and bar updates in order; `cancel_at` sets the interrupt
    flag when the bar reaches that step (the user presses Cancel during the next step)."""

    def __init__(self, root: Path, checkpoints: dict[str, Path]):
        self.models, self.input = root / "models", root / "input"
        (self.models / "styles").mkdir(parents=True)
        self.input.mkdir(parents=True)
        self.events: list[tuple] = []
        self.cancel_at: int | None = None
        self.flag = False
        fake = self

        fp = types.ModuleType("folder_paths")
        fp.models_dir = str(self.models)
        fp.filename_list_cache = {STYLE_FOLDER_KEY: (["stale"], {}, 0.0)}
        fp.get_input_directory = lambda: str(self.input)
        fp.get_filename_list = lambda key: sorted(checkpoints) if key == "checkpoints" else []
        fp.get_full_path = lambda key, name: str(checkpoints[name]) if key == "checkpoints" and name in checkpoints \
            else None
        self.folder_paths = fp

        mm = types.ModuleType("comfy.model_management")

        class InterruptProcessingException(Exception):
            pass

        mm.InterruptProcessingException = InterruptProcessingException
        mm.processing_interrupted = lambda: fake.flag
        mm.interrupt_current_processing = lambda value=True: setattr(fake, "flag", value)
        mm.unload_all_models = lambda: fake.events.append(("unload",))
        mm.soft_empty_cache = lambda force=False: fake.events.append(("empty_cache",))

        def throw_if_interrupted():
            if fake.flag:
                fake.flag = False
                raise InterruptProcessingException()

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = total
                fake.events.append(("bar", total))

            def update_absolute(self, value, total=None, preview=None):
                throw_if_interrupted()  # what the server's progress hook does first
                fake.events.append(("progress", value, total))
                if value == fake.cancel_at:
                    fake.flag = True

        utils.ProgressBar = ProgressBar
        comfy = types.ModuleType("comfy")
        comfy.utils, comfy.model_management = utils, mm
        self.modules = {"folder_paths": fp, "comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm}

    def progress(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "progress"]


@pytest.fixture
def comfy(tmp_path, tiny_model, monkeypatch):
    fake = FakeComfy(tmp_path / "comfy", {"tiny.safetensors": tiny_model["diffusers"]})
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    make_style_folder(fake.input / "paintings")
    return fake


RUN = dict(ckpt_name="tiny.safetensors", folder="paintings", name="mystyle", rank=4, learning_rate=1e-3,
           resolution=64, seed=0)


def test_node_defaults_are_the_cli_defaults_and_nothing_comfy_is_needed_to_list_it():
    from stylora.trainer.config import LoraTrainConfig

    cli = {f.name: f.default for f in dataclasses.fields(LoraTrainConfig)}
    inputs = TrainStyle.INPUT_TYPES()["required"]
    for name in ("steps", "rank", "learning_rate", "resolution", "seed"):
        assert inputs[name][1]["default"] == cli[name], name
    assert inputs["ckpt_name"][0] == []  # no ComfyUI: no checkpoints to list
    assert TrainStyle.CATEGORY == "Stylora" and TrainStyle.OUTPUT_NODE


def test_node_trains_into_models_styles_with_the_clis_file_and_progress(comfy, tiny_model, monkeypatch):
    from stylora.core.lora_file import read_lora
    from stylora.trainer import loop as trainer_loop
    from stylora.trainer import lora as trainer
    from stylora.trainer.config import LoraTrainConfig

    held = []
    real_load = trainer_loop.load_base_model

    def load_and_watch(*args, **kwargs):  # weak references to the trainer's model copies
        base = real_load(*args, **kwargs)
        held.extend(weakref.ref(m) for m in (base.unet, base.vae, base.text_encoder))
        return base
    monkeypatch.setattr(trainer_loop, "load_base_model", load_and_watch)

    with torch.inference_mode():  # as ComfyUI runs every node
        model, clip, name = TrainStyle().train(steps=3, **RUN)
    out = comfy.models / "styles" / "mystyle.safetensors"
    assert (model, clip, name) == (None, None, "mystyle.safetensors") and out.is_file()
    # The bar: one bar of 3 steps, at 0 before the first step, then after each; ComfyUI's models were unloaded first.
    bar = comfy.events.index(("bar", 3))
    assert comfy.events.index(("unload",)) < bar and comfy.progress() == [0, 1, 2, 3]
    assert comfy.events[-2:] == [("unload",), ("empty_cache",)]  # and again after training
    assert STYLE_FOLDER_KEY not in comfy.folder_paths.filename_list_cache  # Load Style LoRA lists it afresh
    # Nothing held after: every model the trainer loaded is garbage.
    gc.collect()
    assert len(held) == 3 and [r() for r in held] == [None, None, None]
    # The same file as `stylora train lora` with these settings: keys, metadata keys, recorded settings.
    cli_out = comfy.models / "cli.safetensors"
    trainer.train_lora(LoraTrainConfig(data=str(comfy.input / "paintings"), output=str(cli_out),
                                       base_model=str(tiny_model["diffusers"]), steps=3, learning_rate=1e-3,
                                       resolution=64), progress=False)
    (state, meta), (cli_state, cli_meta) = read_lora(out), read_lora(cli_out)
    assert set(meta) == set(cli_meta) and set(state) == set(cli_state)
    assert all(torch.equal(state[k], cli_state[k]) for k in state)  # same recipe, same seed: the same weights
    config = json.loads(meta["stylora.config"])
    assert config["steps"] == 3 and config["batch_size"] == 2 and config["warmup_steps"] == 100
    assert meta["stylora.steps"] == "3"


def test_cancel_keeps_a_checkpoint_and_the_next_run_continues_to_the_same_style(comfy, tiny_model):
    from stylora.core.lora_file import read_lora
    from stylora.trainer.checkpoint import checkpoint_root, complete_checkpoints
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    out = comfy.models / "styles" / "mystyle.safetensors"
    comfy.cancel_at = 2  # Cancel pressed during step 3: the run stops when step 3 ends
    mm = comfy.modules["comfy.model_management"]
    with pytest.raises(mm.InterruptProcessingException, match="cancelled at step 3 of 5.*queue again"):
        TrainStyle().train(steps=5, **RUN)
    assert not out.exists() and [s for s, _ in complete_checkpoints(checkpoint_root(out))] == [3]
    assert comfy.flag is False  # ComfyUI's flag cleared, as its own interrupt does
    # Queued again: continues from step 3 (the bar starts there) and finishes the 5 steps.
    comfy.cancel_at, comfy.events = None, []
    TrainStyle().train(steps=5, **RUN)
    assert comfy.progress() == [3, 4, 5]
    meta = read_lora(out)[1]
    assert meta["stylora.steps"] == "5"
    assert json.loads((out.parent / "mystyle.resources.json").read_text())["resumed_from"] == 3
    # The interrupted and continued style equals one trained straight through (the trainer's seeded loop).
    straight = comfy.models / "straight.safetensors"
    train_lora(LoraTrainConfig(data=str(comfy.input / "paintings"), output=str(straight),
                               base_model=str(tiny_model["diffusers"]), steps=5, learning_rate=1e-3, resolution=64),
               progress=False)
    a, b = read_lora(out)[0], read_lora(straight)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cancel_seen_by_the_bar_itself_still_keeps_a_checkpoint(comfy, monkeypatch):
    """The server's progress hook raises ComfyUI's interrupt exception itself when the flag is set between the
    node's own check and the bar update: read as a cancel, so the trainer still checkpoints."""
    from stylora.trainer.checkpoint import checkpoint_root, complete_checkpoints

    monkeypatch.setattr(training, "cancelled", lambda: False)  # the node's check misses the flag
    comfy.cancel_at = 1
    with pytest.raises(comfy.modules["comfy.model_management"].InterruptProcessingException):
        TrainStyle().train(steps=4, **RUN)
    out = comfy.models / "styles" / "mystyle.safetensors"
    assert not out.exists() and [s for s, _ in complete_checkpoints(checkpoint_root(out))] == [2]


def test_a_finished_style_is_reused_and_other_settings_or_images_are_refused(comfy, monkeypatch):
    from stylora.trainer import lora as trainer

    TrainStyle().train(steps=2, **RUN)
    out = comfy.models / "styles" / "mystyle.safetensors"
    before = out.stat().st_mtime_ns
    calls = count_calls(monkeypatch, trainer, ("train_lora",))
    comfy.events = []
    assert TrainStyle().train(steps=2, **RUN)[2] == "mystyle.safetensors"
    assert calls["train_lora"] == 0 and out.stat().st_mtime_ns == before
    assert comfy.progress() == [2]  # the bar shows the style complete
    with pytest.raises(FileExistsError, match=r"other settings \(steps: 2 -> 3\).*another output name"):
        TrainStyle().train(steps=3, **RUN)
    Image.new("RGB", (96, 96), (200, 30, 30)).save(comfy.input / "paintings" / "red.png")
    with pytest.raises(FileExistsError, match="other images"):
        TrainStyle().train(steps=2, **RUN)
    assert calls["train_lora"] == 0 and out.stat().st_mtime_ns == before


def test_an_image_batch_trains_and_is_reused(comfy, monkeypatch):
    from stylora.trainer import lora as trainer

    batch = torch.rand(5, 64, 80, 3, generator=torch.Generator().manual_seed(0))
    TrainStyle().train(steps=1, images=batch, **RUN)
    saved = sorted(p.name for p in (comfy.input / "stylora_training" / "mystyle").iterdir())
    assert saved == [f"image_{i:04d}.png" for i in range(5)]
    first = Image.open(comfy.input / "stylora_training" / "mystyle" / "image_0000.png")
    assert first.size == (80, 64)
    assert (torch.from_numpy(np.array(first)).float() / 255 - batch[0]).abs().max() <= 0.5 / 255
    calls = count_calls(monkeypatch, trainer, ("train_lora",))
    TrainStyle().train(steps=1, images=batch, **RUN)
    assert calls["train_lora"] == 0


def _nothing_written(comfy) -> bool:
    return list((comfy.models / "styles").iterdir()) == []


@pytest.mark.parametrize("make, expected", [
    (lambda d: d.mkdir(), r"TrainStyle: folder .*: only 0 usable image\(s\), at least 5 needed"),
    (lambda d: (d.mkdir(), *[(d / f"p{i}.png").write_bytes(b"not a png" * i) for i in range(6)]),
     r"only 0 usable image\(s\).*p0.png: .*not an image"),
])
def test_an_unusable_folder_is_a_clear_error_and_writes_nothing(comfy, make, expected):
    make(comfy.input / "bad")
    with pytest.raises(ValueError, match=expected):
        TrainStyle().train(steps=2, **{**RUN, "folder": "bad"})
    assert _nothing_written(comfy)


def test_a_checkpoint_that_is_not_sd15_is_a_clear_error_and_writes_nothing(comfy, tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77)},
              str(sdxl))
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
               torch.zeros(320, 1024)}, str(sd2))
    comfy.folder_paths.get_full_path = lambda key, name: str(tmp_path / name)
    with pytest.raises(ValueError, match="TrainStyle: ckpt_name .*sdxl.safetensors: this is an SDXL checkpoint"):
        TrainStyle().train(steps=2, **{**RUN, "ckpt_name": "sdxl.safetensors"})
    with pytest.raises(ValueError, match="ckpt_name .*sd2.safetensors: an SD2.x checkpoint"):
        TrainStyle().train(steps=2, **{**RUN, "ckpt_name": "sd2.safetensors"})
    assert _nothing_written(comfy)


@pytest.mark.parametrize("change, expected", [
    ({"folder": "missing"}, "folder 'missing': no such folder"),
    ({"folder": "../outside"}, "must name a folder under ComfyUI's input folder"),
    ({"name": "../evil"}, "name '../evil' is not a usable file name"),
    ({"ckpt_name": "nope.safetensors"}, r"ckpt_name 'nope.safetensors' is not in ComfyUI's checkpoints \(\['tiny"),
    ({"resolution": 100}, "resolution must be a multiple of 64"),
])
def test_bad_inputs_name_the_input(comfy, change, expected):
    with pytest.raises(ValueError, match=expected):
        TrainStyle().train(steps=2, **{**RUN, **change})
    assert _nothing_written(comfy) and ("unload",) not in comfy.events


def test_is_changed_follows_the_style_file_and_the_folder(comfy):
    args = dict(ckpt_name="tiny.safetensors", folder="paintings", name="mystyle")
    first = TrainStyle.IS_CHANGED(**args)
    assert TrainStyle.IS_CHANGED(**args) == first
    (comfy.models / "styles" / "mystyle.safetensors").write_bytes(b"x")
    second = TrainStyle.IS_CHANGED(**args)
    assert second != first
    Image.new("RGB", (96, 96)).save(comfy.input / "paintings" / "new.png")
    assert TrainStyle.IS_CHANGED(**args) != second


def test_without_comfyui_the_host_functions_do_nothing_or_say_why(monkeypatch):
    for name in ("folder_paths", "comfy", "comfy.utils", "comfy.model_management"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as outside ComfyUI
    assert training.checkpoint_names() == [] and training.cancelled() is False
    training.release_models()
    training.refresh_style_list()
    bar = training.progress_bar(3)
    assert training.show_progress(bar, 1, 3)
    with pytest.raises(InterruptedError, match="stop"):
        training.raise_cancelled("stop")
    with pytest.raises(RuntimeError, match="runs inside ComfyUI"):
        training.styles_folder()


def test_the_train_style_workflow_trains_on_the_checkpoint_stylora_run_names():
    from stylora.workflows.client import RunConfig, load_workflow, substitute

    graph = load_workflow("train_style")
    cfg = RunConfig(content="photo.jpg", out="out.png", workflow="train_style", checkpoint="mine.safetensors",
                    set=("Train style.steps=2",))
    done = substitute(graph, cfg, "photo.png", None)
    trained = [n for n in done.values() if n["class_type"] == "TrainStyle"]
    loaded = [n for n in done.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert [n["inputs"]["ckpt_name"] for n in trained + loaded] == ["mine.safetensors", "mine.safetensors"]
    assert trained[0]["inputs"]["steps"] == 2
    # The styled photo samples the model the node returns (the style applied), through Style Strength.
    strength = next(k for k, n in done.items() if n["class_type"] == "StyleStrength")
    train_id = next(k for k, n in done.items() if n["class_type"] == "TrainStyle")
    assert done[strength]["inputs"]["model"] == [train_id, 0]
