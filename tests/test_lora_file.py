"""LoRA files on values worked out by hand: kohya key conversion, grouping, the fit check's counts and limits,
blend weights, and `stylora lora info`'s summary."""

from __future__ import annotations

import math

import pytest
import torch
from stylora.core.lora_file import (
    check_lora_fits,
    describe,
    kohya_modules,
    lora_prefixes,
    normalize_blend,
    peft_to_kohya,
    read_lora,
    save_lora,
)


def test_peft_to_kohya_keys_alpha_and_dtype():
    state = {"mid_block.attn.to_q.lora_A.weight": torch.ones(2, 3),
             "mid_block.attn.to_q.lora_B.weight": torch.ones(3, 2)}
    out = peft_to_kohya(state, alpha=4, dtype=torch.bfloat16)
    name = "lora_unet_mid_block_attn_to_q"
    assert set(out) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert out["lora_unet_mid_block_attn_to_q.alpha"].item() == 4.0 and all(v.dtype == torch.bfloat16
                                                                             for v in out.values())
    with pytest.raises(KeyError, match="unexpected adapter key 'x.weight'"):
        peft_to_kohya({"x.weight": torch.ones(1)}, alpha=1)
    with pytest.raises(KeyError, match="unexpected LoRA key 'm.bias'"):
        kohya_modules({"m.bias": torch.ones(1)})


def test_lora_prefixes_read_every_format_comfyui_reads():
    t = torch.ones(1)
    modules, unknown = lora_prefixes({"a.lora_down.weight": t, "a.lora_up.weight": t, "a.alpha": t,
                                      "b.lora_A.weight": t, "b.lora_B.weight": t, "b.dora_scale": t,
                                      "c.lora.down.weight": t, "c.lora.up.weight": t, "c.lora_mid.weight": t,
                                      "d.weird": t})
    assert {k: sorted(v) for k, v in modules.items()} == {"a": ["down", "up"], "b": ["down", "up"],
                                                          "c": ["down", "up"]}
    assert unknown == ["d.weird"]


def _lora(n: int, out_ch: int = 4, in_ch: int = 3) -> dict[str, torch.Tensor]:
    state = {}
    for i in range(n):
        state[f"m{i}.lora_down.weight"] = torch.ones(2, in_ch)
        state[f"m{i}.lora_up.weight"] = torch.ones(out_ch, 2)
    return state


def test_fit_check_counts_and_limits():
    key_map = {f"m{i}": (f"w{i}", None) for i in range(7)}  # ComfyUI's tuple form: the first item is the key
    shapes = {f"w{i}": (4, 3) for i in range(7)}
    assert check_lora_fits(_lora(7), key_map, shapes) == []
    assert check_lora_fits(_lora(7), {}, shapes, limit=7) == [
        "7 modules with no matching model layer: m0, m1, m2, m3, m4, m5, m6"]
    assert check_lora_fits(_lora(7), {}, shapes, limit=6) == [
        "7 modules with no matching model layer: m0, m1, m2, m3, m4, m5 (+1 more)"]
    assert check_lora_fits(_lora(1, out_ch=5), key_map, shapes) == [
        "1 modules of the wrong shape: m0: LoRA maps 3->5, model weight is (4, 3)"]
    assert check_lora_fits(_lora(1, in_ch=2), key_map, shapes) == [
        "1 modules of the wrong shape: m0: LoRA maps 2->4, model weight is (4, 3)"]
    assert check_lora_fits(_lora(1), key_map, {"w0": (4,)}) == [
        "1 modules of the wrong shape: m0: LoRA maps 3->4, model weight is (4,)"]
    half = {"m0.lora_down.weight": torch.ones(2, 3)}
    assert check_lora_fits(half, key_map, shapes) == ["1 modules missing up or down: m0"]
    assert check_lora_fits({}, key_map, shapes) == ["no LoRA weights in the file"]
    ints = {**_lora(1), "m0.alpha": torch.tensor(1)}  # integer tensors are not checked for NaN
    assert check_lora_fits(ints, key_map, shapes) == []


def test_blend_weights_keep_their_signs():
    assert normalize_blend([1.0, -3.0]) == [0.25, -0.75]


def test_read_lora_refuses_other_formats_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="only .safetensors LoRA files are read"):
        read_lora(tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        read_lora(tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_lora(tmp_path / "bad.safetensors")


def test_describe_summarises_modules_rank_parameters_and_metadata_in_order(tmp_path):
    state = {"lora_unet_a.lora_down.weight": torch.ones(4, 8, dtype=torch.float16),
             "lora_unet_a.lora_up.weight": torch.ones(8, 4, dtype=torch.float16),
             "lora_unet_a.alpha": torch.tensor(4.0, dtype=torch.float16),
             "lora_unet_b.lora_down.weight": torch.ones(2, 8, dtype=torch.float16),
             "lora_unet_b.lora_up.weight": torch.ones(8, 2, dtype=torch.float16)}
    path = save_lora(tmp_path / "s.safetensors", state, {"zz": "last", "stylora.trigger": "sks", "stylora.rank": 4,
                                                          "stylora.config": {"lr": 0.0001}})
    size = path.stat().st_size / 1e6
    assert describe(path).splitlines() == [
        f"s.safetensors: 2 modules, rank 2/4, 97 parameters (float16), {size:.2f} MB",
        "  stylora.trigger  sks", "  stylora.rank     4", "  zz               last",
        "  calibration: none (Style Strength uses its default ramps; stylora calibrate measures one)",
        "  stylora.config (training settings):", "    lr: 0.0001"]
    bare = save_lora(tmp_path / "bare.safetensors", {"x.lora_down.weight": torch.ones(1, 1)}, {})
    assert describe(bare).splitlines()[1:] == [
        "  calibration: none (Style Strength uses its default ramps; stylora calibrate measures one)",
        "  (no metadata)"]
    assert describe(bare).startswith("bare.safetensors: 0 modules, rank ?, 1 parameters (float32)")


def test_describe_flags_nan_weights_and_loras_of_other_model_families(tmp_path):
    def lora(name: str, width: int, extra: dict | None = None, meta: dict | None = None, fill: float = 0.0):
        module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        state = {f"{module}.lora_down.weight": torch.full((4, width), fill),
                 f"{module}.lora_up.weight": torch.zeros(320, 4), **(extra or {})}
        return describe(save_lora(tmp_path / f"{name}.safetensors", state, meta or {}))

    assert "WARNING" not in lora("sd15", 768)  # SD1.x cross-attention reads the 768-wide CLIP embedding
    sdxl = lora("sdxl", 2048).splitlines()
    assert sdxl[1] == "  WARNING: an SDXL LoRA: it does not fit SD1.5 models; Stylora's nodes refuse it"
    assert "an SD2.x LoRA" in lora("sd2", 1024)
    te2 = {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)}
    assert "an SDXL LoRA" in lora("te2", 768, extra=te2)  # SDXL's second text encoder
    self_attention_only = {"lora_unet_a_attn1_to_q.lora_down.weight": torch.zeros(4, 320)}
    assert "an SDXL LoRA" in describe(save_lora(tmp_path / "meta.safetensors", self_attention_only,
                                                {"ss_base_model_version": "sdxl_base_v1-0"}))
    assert "WARNING" not in describe(save_lora(tmp_path / "plain.safetensors", self_attention_only, {}))
    nan = lora("nan", 768, fill=math.nan).splitlines()
    assert nan[1].startswith("  WARNING: 1 tensor(s) with NaN/inf values "
                             "(lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight)")
    assert "the nodes refuse this file" in nan[1]
