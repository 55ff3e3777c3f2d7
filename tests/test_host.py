"""The pack names the ComfyUI internal it needs when the host lacks it: one warning per missing piece, in the log."""

from __future__ import annotations

import logging
import sys
import types

import pytest
from conftest import REPO
from stylora.nodes import host


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


def test_style_strength_checks_the_patch_fields_it_rewrites(monkeypatch, caplog):
    """The check sits where the node touches the internal: Style Strength on a model without patches_uuid."""
    from stylora.nodes.strength import STYLE_ATTACHMENT, StyleStrength

    monkeypatch.setattr(host, "_warned", set())
    caplog.set_level(logging.WARNING)

    class Patcher:
        def __init__(self):
            self.patches, self.attachments = {}, {STYLE_ATTACHMENT: (object(),)}

        def get_attachment(self, key):
            return self.attachments.get(key)

        def clone(self):
            return Patcher()

    StyleStrength().apply(Patcher(), 0.5)
    (message,) = _warnings(caplog)
    assert "ModelPatcher.patches_uuid" in message and "Style Strength" in message


def test_the_declared_range_matches_what_the_pack_reports():
    """pyproject's [tool.comfy] requires-comfyui, the README's tested-with line and the warning's version agree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    version = host.TESTED_WITH.split()[-1]
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["requires-comfyui"] == f">={version}"
    assert f"Tested with ComfyUI {version} (backend), frontends 1.27 and 1.58" in (REPO / "README.md").read_text()
