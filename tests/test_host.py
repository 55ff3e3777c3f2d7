"""The host adapter (nodes/host.py): each ComfyUI internal the pack uses, what it does on tests/fake_host.py's
ComfyUI, and the one error naming the internal when it is missing; the warning-only checks."""

from __future__ import annotations

import logging
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO
from fake_host import FakeCLIP, FakeComfy, FakePatcher, FakeVAE
from stylora.nodes import host
from stylora.nodes.strength import StyleStrength


@pytest.fixture
def fake_comfy(monkeypatch):
    """A stand-in `comfy` package whose `comfy.sd` has only `VAE` (no load_lora_for_models), as a future ComfyUI
    that moved a function would look; the warnings already given are forgotten."""
    comfy, sd = types.ModuleType("comfy"), types.ModuleType("comfy.sd")
    sd.VAE = object
    comfy.sd = sd
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.sd", sd)
    monkeypatch.setattr(host, "_warned", set())
    return sd


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == host.__name__ and r.levelno == logging.WARNING]


def test_a_missing_function_is_named_once_with_the_node(fake_comfy, caplog):
    caplog.set_level(logging.WARNING)
    assert host.has_module("comfy.sd", "VAE", used_by="Content Encode") is True
    assert _warnings(caplog) == []
    for _ in range(3):  # every run of the node checks; the log says it once
        assert host.has_module("comfy.sd", "VAE", "load_lora_for_models", used_by="Load Style LoRA") is False
    (message,) = _warnings(caplog)
    assert "comfy.sd.load_lora_for_models" in message and "Load Style LoRA" in message and "0.3.64" in message


def test_a_missing_module_and_a_missing_field_are_named(fake_comfy, caplog):
    caplog.set_level(logging.WARNING)
    assert host.has_module("comfy.lora", "model_lora_keys_unet", used_by="Load Style LoRA") is False
    patcher = types.SimpleNamespace(patches={})
    assert host.has_attrs(patcher, "ModelPatcher", "patches", "patches_uuid", used_by="Style Strength") is False
    assert host.has_attrs(patcher, "ModelPatcher", "patches", used_by="Style Strength") is True
    messages = _warnings(caplog)
    assert len(messages) == 2
    assert "no comfy.lora," in messages[0]
    assert "ModelPatcher.patches_uuid" in messages[1] and "Style Strength" in messages[1]


def test_outside_comfyui_nothing_is_reported(monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    monkeypatch.setitem(sys.modules, "comfy", None)  # `import comfy` raises ImportError
    monkeypatch.setattr(host, "_warned", set())
    assert host.has_module("comfy.sd", "VAE", used_by="Content Encode") is False
    assert _warnings(caplog) == []


def test_style_strength_names_a_missing_patch_field_before_changing_anything(monkeypatch, caplog):
    """Style Strength on a ModelPatcher without `patches`: one error naming the field, the node and the tested
    version, raised before anything is cloned (not an AttributeError later in sampling). patches_uuid, which it
    only writes, is named in one warning."""
    patcher = FakePatcher(patches={"w": [(1.0, ADAPTER, 1.0, None, None)]},
                          attachments={host.STYLE_ATTACHMENT: (ADAPTER,)})
    clones = []
    monkeypatch.setattr(patcher, "clone", lambda: clones.append(1))
    del patcher.patches
    with pytest.raises(host.HostMismatch) as e:
        StyleStrength().apply(patcher, 0.5)
    assert str(e.value) == ("Stylora: this ComfyUI has no ModelPatcher.patches, which Style Strength needs "
                            "(Stylora is tested with ComfyUI 0.3.64); use that version or a Stylora release made "
                            "for this one")
    assert e.value.missing == ["ModelPatcher.patches"] and e.value.used_by == "Style Strength" and clones == []
    no_attachments = types.SimpleNamespace(patches={}, patches_uuid="x", clone=lambda: None)
    with pytest.raises(host.HostMismatch, match="ModelPatcher.get_attachment, which Style Strength"):
        StyleStrength().apply(no_attachments, 0.5)
    monkeypatch.setattr(host, "_warned", set())
    caplog.set_level(logging.WARNING)
    old = FakePatcher(patches={"w": [(1.0, ADAPTER, 1.0, None, None)]}, attachments={host.STYLE_ATTACHMENT: (ADAPTER,)})
    clone = FakePatcher(attachments=old.attachments)
    del old.patches_uuid, clone.patches_uuid  # a patcher of a ComfyUI without the field
    old.clone = lambda: clone
    out = StyleStrength().apply(old, 0.25)[0]
    assert out is clone and out.patches["w"] == [(0.5, ADAPTER, 1.0, None, None)]
    (message,) = _warnings(caplog)
    assert "ModelPatcher.patches_uuid" in message and "Style Strength" in message


ADAPTER = ("lora", ("k",))


@pytest.mark.parametrize("piece, call", [
    ("comfy.sd.load_lora_for_models", lambda c: host.load_lora(c.model(), FakeCLIP(), {}, 1.0, 1.0)),
    ("comfy.sd.VAE", lambda c: host.float32_vae(FakeVAE())),
    ("comfy.lora.model_lora_keys_clip", lambda c: host.lora_key_map(c.model(), FakeCLIP())),
    ("comfy.supported_models.SD15", lambda c: host.sd15_mismatch(c.model())),
    ("folder_paths.get_filename_list", lambda c: host.style_files()),
    ("folder_paths.get_full_path", lambda c: host.style_path("a")),
    ("folder_paths.get_folder_paths", lambda c: host.metrics_folders()),
    ("folder_paths.models_dir", lambda c: host.styles_folder()),
    ("folder_paths.get_input_directory", lambda c: host.input_folder()),
    ("folder_paths.filename_list_cache", lambda c: host.refresh_style_list()),
    ("folder_paths.supported_pt_extensions", lambda c: host.register_model_folders()),
    ("comfy.model_management.get_torch_device", lambda c: host.torch_device()),
    ("comfy.model_management.soft_empty_cache", lambda c: host.release_models()),
    ("comfy.model_management.processing_interrupted", lambda c: host.cancelled()),
    ("comfy.model_management.InterruptProcessingException", lambda c: host.raise_cancelled("stop")),
    ("comfy.utils.ProgressBar", lambda c: host.progress_bar(3)),
])
def test_each_comfyui_internal_missing_is_one_error_naming_it(monkeypatch, piece, call):
    """Every internal the host reaches: taken away from an otherwise complete ComfyUI, the host function that uses
    it raises HostMismatch naming exactly that piece and the tested version."""
    comfy = FakeComfy(models_dir="/m").install(monkeypatch)
    mm = types.SimpleNamespace(get_torch_device=lambda: "dev", unload_all_models=lambda: None,
                               soft_empty_cache=lambda: None, processing_interrupted=lambda: False,
                               interrupt_current_processing=lambda v: None, InterruptProcessingException=KeyError)
    utils = types.SimpleNamespace(ProgressBar=lambda total: None)
    folder_paths = comfy.folder_paths
    folder_paths.get_input_directory, folder_paths.filename_list_cache = (lambda: "/in"), {}
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    module, _, name = piece.rpartition(".")
    monkeypatch.delattr(sys.modules[module], name)
    with pytest.raises(host.HostMismatch) as e:
        call(comfy)
    assert e.value.missing == [piece] and "tested with ComfyUI 0.3.64" in str(e.value)


def test_a_missing_module_inside_comfyui_is_named(monkeypatch):
    FakeComfy().install(monkeypatch)
    monkeypatch.setitem(sys.modules, "comfy.model_management", None)  # a module ComfyUI moved
    with pytest.raises(host.HostMismatch) as e:
        host.torch_device("Style Metrics")
    assert e.value.missing == ["comfy.model_management"] and e.value.used_by == "Style Metrics"


def test_outside_comfyui_lookups_are_empty_and_what_needs_it_says_so(monkeypatch):
    for name in ("comfy", "folder_paths"):
        monkeypatch.setitem(sys.modules, name, None)  # `import comfy` raises ImportError
    assert host.style_files() == [] and host.metrics_folders() == [] and host.checkpoint_names() == []
    assert host.checkpoint_file("x.safetensors") is None and host.cancelled() is False
    assert host.torch_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    host.register_model_folders()
    host.refresh_style_list()
    host.release_models()
    host.progress_bar(3).update_absolute(1, 3)
    with pytest.raises(InterruptedError, match="^stop$"):
        host.raise_cancelled("stop")
    for call, what in ((lambda: host.style_path("a"), "Load Style LoRA: ComfyUI's folder_paths is not importable"),
                       (lambda: host.load_lora(None, None, {}, 1, 1), "Load Style LoRA: ComfyUI's comfy.sd is not"),
                       (lambda: host.float32_vae(FakeVAE()), "Content Encode (float32 retry): ComfyUI's comfy.sd"),
                       (lambda: host.sd15_mismatch(None), "Load Style LoRA: ComfyUI's comfy.supported_models"),
                       (lambda: host.lora_key_map(None, None), "Load Style LoRA: ComfyUI's comfy.lora is not")):
        with pytest.raises(host.HostUnavailable, match=f"^{re.escape(what)}.*runs inside ComfyUI"):
            call()


def test_style_folders_are_listed_in_order_and_looked_up_styles_first(monkeypatch):
    comfy = FakeComfy().install(monkeypatch)
    fp = comfy.folder_paths
    fp.folder_names_and_paths["loras"] = (["/loras"], {".safetensors"})
    listed = {"stylora": ["b.safetensors", "a.safetensors"], "loras": ["a.safetensors", "c.safetensors"]}
    fp.get_filename_list = lambda key: listed[key]
    assert host.style_files() == ["b.safetensors", "a.safetensors", "c.safetensors"]  # no duplicates
    paths = {("stylora", "a"): "/styles/a", ("loras", "a"): "/loras/a", ("loras", "c"): "/loras/c"}
    fp.get_full_path = lambda key, name: paths.get((key, name))
    assert host.style_path("a") == "/styles/a" and host.style_path("c") == "/loras/c"
    with pytest.raises(FileNotFoundError, match="style 'd' is in neither models/styles nor models/loras"):
        host.style_path("d")
    del fp.folder_names_and_paths["stylora"]  # not registered: only models/loras
    assert host.style_files() == ["a.safetensors", "c.safetensors"] and host.style_path("a") == "/loras/a"
    assert host.metrics_folders() == []  # models/stylora_metrics not registered
    host.register_model_folders()
    assert host.metrics_folders() == ["/comfy/models/stylora_metrics"]
    assert host.styles_folder() == Path("/comfy/models/styles")


def test_style_adapters_are_the_recorded_ones_plus_the_patches_added():
    a0, a1, a2, other = ("a0",), ("a1",), ("a2",), ("other",)
    before = FakePatcher(patches={"w": [(1.0, other, 1.0, None, None)]}, attachments={host.STYLE_ATTACHMENT: (a0,)})
    after = before.clone()
    after.add_patches({"w": a1, "v": a2}, 0.5)
    assert host.style_adapters(before, after) == (a0, a1, a2)
    assert host.style_adapters(FakePatcher(), FakePatcher(patches={"w": [(1.0, other, 1.0, None, None)]})) == (other,)


def test_scale_patches_keeps_other_patches_and_drops_ours_at_zero():
    ours, other = ("ours",), ("other",)
    patches = {"w": [(0.5, other, 1.0, None, None), (0.8, ours, 0.9, None, None)], "v": [(0.8, ours, 1.0, 2, None)]}
    assert host.scale_patches(patches, {id(ours)}, 0.5) == {"w": [(0.5, other, 1.0, None, None),
                                                                 (0.4, ours, 0.9, None, None)],
                                                           "v": [(0.4, ours, 1.0, 2, None)]}
    assert host.scale_patches(patches, {id(ours)}, 0.0) == {"w": [(0.5, other, 1.0, None, None)]}
    assert host.scale_patches(patches, set(), 0.0) == patches


def test_lora_keys_shapes_and_the_sd15_check(monkeypatch):
    comfy = FakeComfy().install(monkeypatch)
    clip = FakeCLIP(weights={"clip_l.fc1.weight": torch.zeros(3, 5)})
    comfy.lora.model_lora_keys_clip = lambda clip_model, key_map: {**key_map, "lora_te_fc1": "clip_l.fc1.weight"}
    assert host.lora_key_map(comfy.model(), clip) == {"lora_unet_x": "diffusion_model.x.weight",
                                                      "lora_te_fc1": "clip_l.fc1.weight"}
    assert host.weight_shapes(comfy.model(), clip) == {"diffusion_model.x.weight": (8, 8), "clip_l.fc1.weight": (3, 5)}

    class SDXL:
        pass

    assert host.sd15_mismatch(comfy.model()) is None and host.sd15_mismatch(comfy.model(SDXL())) == "SDXL"


def test_the_float32_vae_is_built_from_the_vaes_weights_once_per_vae(monkeypatch):
    from stylora.nodes.content import ContentEncode

    comfy = FakeComfy().install(monkeypatch)
    node, half, other = ContentEncode(), FakeVAE(), FakeVAE(bad=True)
    first = node._fp32_vae(half)
    assert node._fp32_vae(half) is first and len(comfy.vaes) == 1
    assert comfy.vaes[0][1] == torch.float32 and comfy.vaes[0][0]["bad"].item() is False  # half.get_sd()
    assert node._fp32_vae(other) is not first and comfy.vaes[1][0]["bad"].item() is True
    assert node._fp32_vae(half) is not first and len(comfy.vaes) == 3  # a VAE given again after another: rebuilt


def test_progress_cancel_and_memory_go_to_comfyui(monkeypatch):
    events = []

    class Interrupt(Exception):
        pass

    mm = types.SimpleNamespace(get_torch_device=lambda: "the device", processing_interrupted=lambda: 1,
                               unload_all_models=lambda: events.append("unload"),
                               soft_empty_cache=lambda: events.append("empty"),
                               interrupt_current_processing=lambda value: events.append(("flag", value)),
                               InterruptProcessingException=Interrupt)
    utils = types.SimpleNamespace(ProgressBar=lambda total: ("bar", total))
    FakeComfy().install(monkeypatch)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    assert host.torch_device() == "the device" and host.cancelled() is True and host.progress_bar(7) == ("bar", 7)
    host.release_models()
    with pytest.raises(Interrupt, match="^stop$"):
        host.raise_cancelled("stop")
    assert events == ["unload", "empty", ("flag", False)]
    assert host.is_interrupt(Interrupt()) is False and host.is_interrupt(type("InterruptProcessingException",
                                                                               (Exception,), {})())


def test_registration_in_comfyui_logs_a_changed_folder_paths_and_still_loads(monkeypatch, caplog):
    import importlib

    import stylora.nodes as nodes

    fp = types.ModuleType("folder_paths")  # a ComfyUI whose folder_paths lost its models_dir
    fp.folder_names_and_paths, fp.supported_pt_extensions = {}, set()
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    caplog.set_level(logging.WARNING)
    importlib.reload(nodes)
    assert "folder_paths.models_dir, which the models/styles folder needs" in caplog.text
    assert "StyleStrength" in nodes.NODE_CLASS_MAPPINGS


def test_the_declared_range_matches_what_the_pack_reports():
    """pyproject's [tool.comfy] requires-comfyui, the README's tested-with line and the warning's version agree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    version = host.TESTED_WITH.split()[-1]
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["requires-comfyui"] == f">={version}"
    assert f"Tested with ComfyUI {version} (backend), frontends 1.27 and 1.58" in (REPO / "README.md").read_text()
