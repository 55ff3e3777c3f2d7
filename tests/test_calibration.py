"""One knob calibrated per style: the strength rule's remap (core.strength_rule) against hand-worked stand-in SSIM
curves, the calibration stored in a style file's metadata (weights bit-identical, every key still mapped), Style
Strength and Load Style LoRA using it, `lora info` showing it, and `stylora calibrate` end to end against a stand-in
server whose SSIM curve is known (scored independently with scikit-image)."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import skimage_photos
from fake_host import FakePatcher
from PIL import Image
from stylora.core.lora_file import describe, read_lora, save_lora, update_metadata
from stylora.core.strength_rule import (
    CALIBRATION_KEY,
    TARGET_SSIM_AT_FULL,
    Calibration,
    blend_strength,
    calibrated_strength,
    decreasing_fit,
    read_calibration,
    style_schedule,
)

# --- the maths --------------------------------------------------------------------------------------------------


def test_a_piecewise_linear_stand_in_curve_gives_the_hand_worked_remap():
    # SSIM 0.95 at 0, 0.45 at 0.5, 0.35 at 1. Target line: 0.95 - s (0.95 - 0.35) = 0.95 - 0.6 s.
    cal = Calibration(strengths=(0.0, 0.5, 1.0), ssim=(0.95, 0.45, 0.35))
    assert TARGET_SSIM_AT_FULL == 0.35
    # s = 0.5: target 0.65, on the first segment: r = 0.5 (0.95 - 0.65) / (0.95 - 0.45) = 0.3.
    assert calibrated_strength(0.5, cal) == pytest.approx(0.3, abs=1e-12)
    # s = 0.9: target 0.41, on the second segment: r = 0.5 + 0.5 (0.45 - 0.41) / (0.45 - 0.35) = 0.7.
    assert calibrated_strength(0.9, cal) == pytest.approx(0.7, abs=1e-12)
    assert calibrated_strength(0.0, cal) == 0.0 and calibrated_strength(1.0, cal) == 1.0


def test_a_smooth_stand_in_curve_is_inverted():
    # ssim(r) = 0.95 - 0.6 r^2 reaches the target line 0.95 - 0.6 s at r = sqrt(s).
    grid = [i / 40 for i in range(41)]
    cal = Calibration(strengths=tuple(grid), ssim=tuple(0.95 - 0.6 * r * r for r in grid))
    for s in (0.05, 0.2, 0.5, 0.8, 0.99):
        assert calibrated_strength(s, cal) == pytest.approx(math.sqrt(s), abs=5e-3)


def test_two_styles_get_the_same_target_ssim_at_the_same_strength():
    gentle = Calibration(strengths=(0.0, 0.5, 1.0), ssim=(0.9, 0.7, 0.3))
    harsh = Calibration(strengths=(0.0, 0.5, 1.0), ssim=(0.9, 0.4, 0.2))

    def measured(cal: Calibration, r: float) -> float:  # the stand-in's SSIM at raw strength r
        return float(np.interp(r, cal.strengths, cal.ssim))

    for s in (0.2, 0.5, 0.8):
        target = 0.9 - s * (0.9 - TARGET_SSIM_AT_FULL)
        assert measured(gentle, calibrated_strength(s, gentle)) == pytest.approx(target, abs=1e-9)
        assert measured(harsh, calibrated_strength(s, harsh)) == pytest.approx(target, abs=1e-9)
    assert calibrated_strength(0.5, harsh) < calibrated_strength(0.5, gentle)  # the harsh one needs less


def test_noisy_curves_are_made_monotone_and_the_remap_never_goes_back():
    assert decreasing_fit([0.9, 0.7, 0.75, 0.5]) == pytest.approx([0.9, 0.725, 0.725, 0.5])
    assert decreasing_fit([0.5, 0.6, 0.7]) == pytest.approx([0.6, 0.6, 0.6])
    noisy = Calibration(strengths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), ssim=(0.93, 0.80, 0.84, 0.55, 0.58, 0.30))
    raw = [calibrated_strength(i / 200, noisy) for i in range(201)]
    assert all(b >= a for a, b in zip(raw, raw[1:])) and raw[0] == 0.0


def test_the_remap_is_clamped_to_the_measured_range():
    mild = Calibration(strengths=(0.0, 1.0), ssim=(0.95, 0.6))  # never gets as far as the target 0.35
    assert calibrated_strength(1.0, mild) == 1.0
    # The target 0.95 - 0.6 s falls below 0.6 from s = 7/12 on: the style's strongest setting from there.
    assert calibrated_strength(0.6, mild) == 1.0 and calibrated_strength(0.5, mild) < 1.0
    assert all(0.0 <= calibrated_strength(i / 50, mild) <= 1.0 for i in range(51))
    with pytest.raises(ValueError, match="strength must be in 0..1, got 1.2"):
        calibrated_strength(1.2, mild)


def test_uncalibrated_styles_keep_todays_ramps():
    assert blend_strength(0.4, []) == (0.4, False)
    assert blend_strength(0.4, [(None, 1.0)]) == (0.4, False)
    cal = Calibration(strengths=(0.0, 0.5, 1.0), ssim=(0.95, 0.45, 0.35))
    assert blend_strength(0.5, [(cal, 1.0), (None, 1.0)]) == (0.5, False)  # one uncalibrated style: no remap
    raw, calibrated = blend_strength(0.5, [(cal, 1.0), (Calibration((0.0, 1.0), (0.95, 0.35)), 3.0)])
    assert calibrated and raw == pytest.approx((0.3 * 1 + 0.5 * 3) / 4)  # blend-weighted mean of the raw strengths


def test_bad_calibrations_are_named():
    with pytest.raises(ValueError, match="strengths must rise from 0 to 1"):
        Calibration(strengths=(0.0, 0.5), ssim=(0.9, 0.5))
    with pytest.raises(ValueError, match="SSIM values must be finite"):
        Calibration(strengths=(0.0, 1.0), ssim=(0.9, float("nan")))
    with pytest.raises(ValueError, match="stylora.calibration: not a calibration"):
        read_calibration({CALIBRATION_KEY: "{\"strengths\": [0, 1]}"})
    assert read_calibration({}) is None


def test_out_of_range_inputs_are_refused_on_every_path():
    """Strengths and max_denoise outside 0..1 and SSIM outside -1..1 are named, also where no style is calibrated."""
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=f"strength must be in 0..1, got {bad}"):
            style_schedule(bad)
        with pytest.raises(ValueError, match=f"strength must be in 0..1, got {bad}"):
            blend_strength(bad, [])  # uncalibrated: today's ramps, still validated
    with pytest.raises(ValueError, match="max_denoise must be in 0..1, got 1.5"):
        style_schedule(0.5, max_denoise=1.5)
    with pytest.raises(ValueError, match="SSIM values must be finite, in -1..1"):
        Calibration(strengths=(0.0, 1.0), ssim=(1.5, 0.5))
    with pytest.raises(ValueError, match="SSIM values must be finite, in -1..1"):
        Calibration(strengths=(0.0, 1.0), ssim=(0.5, -1.5))
    assert Calibration(strengths=(0.0, 1.0), ssim=(1.0, -1.0)).ssim == (1.0, -1.0)  # the bounds themselves are valid


def test_pooling_averages_a_run_of_rising_values_by_their_counts():
    """Pool-adjacent-violators on 0.5, 0.6, 0.7: all three pooled to their mean 0.6 (a pooled block of two, worth
    two, merged with one more), by hand."""
    assert decreasing_fit([0.5, 0.6, 0.7]) == pytest.approx([0.6, 0.6, 0.6])
    assert decreasing_fit([0.9, 0.5, 0.6, 0.7, 0.2]) == pytest.approx([0.9, 0.6, 0.6, 0.6, 0.2])
    # two pooled blocks of two merged: (0.4 x 2 + 0.5 x 2) / 4, the mean of all four values
    assert decreasing_fit([0.3, 0.5, 0.4, 0.6]) == pytest.approx([0.45] * 4)


def test_a_strength_too_small_to_move_the_goal_maps_to_zero():
    """strength 1e-18 leaves the goal at the curve's top in floating point: no segment holds it strictly below the
    top, so the remap is 0 (not an index past the curve)."""
    cal = Calibration(strengths=(0.0, 0.5, 1.0), ssim=(0.9, 0.9, 0.3))
    assert calibrated_strength(1e-18, cal) == 0.0


# --- the style file ---------------------------------------------------------------------------------------------


def _style(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(3):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{'qkv'[i]}"
        state[f"{name}.lora_down.weight"] = torch.randn(4, 32, generator=gen).half()
        state[f"{name}.lora_up.weight"] = torch.randn(32, 4, generator=gen).half()
        state[f"{name}.alpha"] = torch.tensor(4.0).half()
    return save_lora(path, state, {"stylora.trigger": "", "stylora.base_model": "sd15-test"})


def _tensor_bytes(path: Path) -> bytes:
    """The safetensors data section: everything after the 8-byte header length and the JSON header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n:]


def test_calibration_round_trips_through_the_file_with_the_weights_bit_identical(tmp_path):
    path = _style(tmp_path / "style.safetensors")
    before_state, before_meta = read_lora(path)
    before_bytes = _tensor_bytes(path)
    cal = Calibration(strengths=(0.0, 0.5, 1.0), ssim=(0.95, 0.45, 0.35), photos=3, details={"seed": 0})
    update_metadata(path, {CALIBRATION_KEY: cal.to_json()})
    state, meta = read_lora(path)
    assert read_calibration(meta) == cal
    assert {k: v for k, v in meta.items() if k != CALIBRATION_KEY} == before_meta
    assert list(state) == list(before_state)
    assert all(torch.equal(state[k], before_state[k]) and state[k].dtype == before_state[k].dtype for k in state)
    assert _tensor_bytes(path) == before_bytes
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


def test_the_calibrated_file_still_fits_every_key(tiny_key_map, tmp_path):
    """ComfyUI's key map for the tiny SD1.5 UNet (as in test_nodes): every module of a calibrated file still maps."""
    from stylora.core.lora_file import check_lora_fits

    key_map, shapes = tiny_key_map
    gen = torch.Generator().manual_seed(0)
    state = {}
    for prefix, target in key_map.items():
        shape = shapes[target]
        if len(shape) == 2:
            state[f"{prefix}.lora_down.weight"] = torch.randn(4, shape[1], generator=gen)
            state[f"{prefix}.lora_up.weight"] = torch.randn(shape[0], 4, generator=gen)
            state[f"{prefix}.alpha"] = torch.tensor(4.0)
    path = save_lora(tmp_path / "full.safetensors", state, {})
    update_metadata(path, {CALIBRATION_KEY: Calibration((0.0, 1.0), (0.9, 0.4)).to_json()})
    calibrated, _ = read_lora(path)
    assert sorted(calibrated) == sorted(state) and len(state) > 30
    assert check_lora_fits(calibrated, key_map, shapes) == []


@pytest.fixture(scope="module")
def tiny_key_map(tiny_model):
    from test_nodes import tiny_key_map as build

    return build.__wrapped__(tiny_model)


def test_lora_info_shows_the_calibration(tmp_path):
    path = _style(tmp_path / "style.safetensors")
    assert "calibration: none" in describe(path)
    update_metadata(path, {CALIBRATION_KEY: Calibration((0.0, 0.5, 1.0), (0.95, 0.45, 0.35), photos=3).to_json()})
    text = describe(path)
    assert "calibration: SSIM to the photo by strength (3 photos, max_denoise 0.75): 0: 0.950, 0.5: 0.450, 1: 0.350" \
        in text
    assert "0.5 -> 0.30" in text and CALIBRATION_KEY not in text


# --- the nodes --------------------------------------------------------------------------------------------------


def _Patcher(patches: dict, attachments: dict) -> FakePatcher:
    return FakePatcher(patches=patches, attachments=attachments)


def test_style_strength_uses_the_calibration_only_when_every_style_has_one():
    from stylora.nodes.strength import CALIBRATION_ATTACHMENT, STYLE_ATTACHMENT, StyleStrength

    adapter = object()
    cal = Calibration((0.0, 0.5, 1.0), (0.95, 0.45, 0.35)).to_json()

    def model(calibrations):
        return _Patcher({"w": [(1.0, adapter, 1.0, None, None)]},
                        {STYLE_ATTACHMENT: (adapter,), CALIBRATION_ATTACHMENT: calibrations})

    out, denoise, _, guard, mapping = StyleStrength().apply(model(((cal, 1.0),)), 0.5)
    assert denoise == pytest.approx(0.3 * 0.75) and guard == denoise  # raw strength 0.3 (worked above)
    assert out.patches["w"][0][0] == pytest.approx(style_schedule(0.3)[0])
    assert mapping.startswith("strength 0.500 -> calibrated: raw strength 0.300")
    # Uncalibrated, a blend with an uncalibrated style, or calibration switched off: today's ramps.
    for calibrations, kw in ((((None, 1.0),), {}), (((cal, 1.0), (None, 1.0)), {}), (((cal, 1.0),),
                                                                                     {"use_calibration": False})):
        _, denoise, _, guard, mapping = StyleStrength().apply(model(calibrations), 0.5, **kw)
        assert denoise == 0.375 and guard == 0.375 and "raw strength 0.500" in mapping
    assert "calibration off" in mapping
    # Strength 0 stays the photo: no style weight, denoise 0.
    zero, denoise, *_ = StyleStrength().apply(model(((cal, 1.0),)), 0.0)
    assert denoise == 0.0 and "w" not in zero.patches


def test_load_style_lora_says_whether_each_style_is_calibrated(tmp_path, monkeypatch):
    import sys
    import types

    from stylora.nodes import style_lora
    from stylora.nodes.strength import CALIBRATION_ATTACHMENT

    _style(tmp_path / "plain.safetensors")
    calibrated = _style(tmp_path / "calibrated.safetensors")
    cal = Calibration((0.0, 1.0), (0.9, 0.4))
    update_metadata(calibrated, {CALIBRATION_KEY: cal.to_json()})
    damaged = _style(tmp_path / "damaged.safetensors")
    update_metadata(damaged, {CALIBRATION_KEY: "not json"})

    class SD15:
        pass

    def Model(patches: dict, attachments: dict) -> FakePatcher:
        return FakePatcher(types.SimpleNamespace(model_config=SD15(), state_dict=lambda: {}), patches, attachments)
    comfy = types.ModuleType("comfy")
    comfy.lora = types.SimpleNamespace(model_lora_keys_unet=lambda m, k: k, model_lora_keys_clip=lambda c, k: k)
    comfy.supported_models = types.SimpleNamespace(SD15=SD15)
    comfy.sd = types.SimpleNamespace(load_lora_for_models=lambda m, c, s, a, b: (m.clone(), None))
    for name in ("comfy", "comfy.lora", "comfy.sd", "comfy.supported_models"):
        monkeypatch.setitem(sys.modules, name, comfy if name == "comfy" else getattr(comfy, name.split(".")[1]))
    monkeypatch.setattr(style_lora, "style_path", lambda name: str(tmp_path / name))
    monkeypatch.setattr(style_lora, "check_lora_fits", lambda *a: [])
    clip = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(state_dict=lambda: {}))
    node = style_lora.LoadStyleLoRA()
    model, _, info, _ = node.load(Model({}, {}), clip, "calibrated.safetensors", 1.0, style_2="plain.safetensors")
    assert [s["calibrated"] for s in info["styles"]] == [True, False] and info["calibrated"] is False
    assert model.get_attachment(CALIBRATION_ATTACHMENT) == ((cal.to_json(), 0.5), (None, 0.5))
    _, _, info, _ = node.load(Model({}, {}), clip, "calibrated.safetensors", 1.0)
    assert info["calibrated"] is True and read_calibration({CALIBRATION_KEY: info["styles"][0]["calibration"]}) == cal
    with pytest.raises(ValueError, match="damaged.safetensors.*stylora.calibration: not a calibration"):
        node.load(Model({}, {}), clip, "damaged.safetensors", 1.0)


# --- stylora calibrate ------------------------------------------------------------------------------------------


def _blend(photo: np.ndarray, strength: float) -> np.ndarray:
    """The stand-in server's 'style': the photo moved toward its negative by 0.8 x the strength, 8-bit (never the
    halfway blend, which is one flat grey that stylora run rightly refuses)."""
    t = 0.8 * strength
    return np.round(photo * (1 - t) + (255 - photo) * t).astype(np.uint8)


def test_calibrate_measures_the_curve_and_writes_it(tmp_path):
    from skimage.metrics import structural_similarity
    from stylora.cli import main as cli_main
    from test_run import FakeComfy

    class Stylising(FakeComfy):
        def queue(self, prompt):
            code, body = super().queue(prompt)
            strength_node = next(n for n in prompt.values() if n["_meta"]["title"] == "Strength")
            assert strength_node["inputs"]["use_calibration"] is False  # raw strengths are measured
            s = strength_node["inputs"]["strength"]
            content = next(n for n in prompt.values() if n["_meta"]["title"] == "Content")["inputs"]["image"]
            photo = np.asarray(Image.open(io.BytesIO(self.uploads[content])).convert("RGB")).astype(float)
            buf = io.BytesIO()
            Image.fromarray(_blend(photo, s)).save(buf, format="PNG")
            self.uploads[f"output/{json.loads(body)['prompt_id']}.png"] = buf.getvalue()
            return code, body

    photos = tmp_path / "photos"
    photos.mkdir()
    arrays = {}
    for name, arr in list(skimage_photos().items())[:2]:
        img = Image.fromarray(arr).convert("RGB").resize((64, 48))
        img.save(photos / f"{name}.png")
        arrays[name] = np.asarray(img).astype(float)
    style = _style(tmp_path / "monet.safetensors")
    weights = _tensor_bytes(style)
    server = Stylising()
    try:
        code = cli_main(["calibrate", str(style), "--content", str(photos), "--server", server.url,
                         "--strengths", "0", "0.5", "1", "--out", str(tmp_path / "cal")])
    finally:
        server.close()
    assert code == 0
    cal = read_calibration(read_lora(style)[1])
    assert cal.strengths == (0.0, 0.5, 1.0) and cal.photos == 2 and cal.max_denoise == 0.75
    for s, measured in zip(cal.strengths, cal.ssim):  # scikit-image's SSIM, the same settings as the study's
        expected = np.mean([structural_similarity(_blend(a, s) / 255, a / 255, gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False, data_range=1.0, channel_axis=2)
                            for a in arrays.values()])
        assert measured == pytest.approx(expected, abs=2e-3)
    assert cal.ssim[0] > 0.99 and cal.ssim[0] > cal.ssim[1] > cal.ssim[2]
    assert _tensor_bytes(style) == weights
