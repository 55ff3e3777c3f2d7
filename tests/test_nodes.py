"""Node declarations and the library functions behind them, without ComfyUI."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import REPO
from fake_host import FakeVAE
from stylora import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from stylora.core.lora_file import check_lora_fits, normalize_blend
from stylora.nodes.host import STYLE_ATTACHMENT, STYLE_FOLDER_KEY, register_model_folders, style_adapters
from stylora.nodes.style_lora import LoadStyleLoRA


def test_declarations_are_complete_without_comfyui():
    import stylora

    assert sorted(NODE_CLASS_MAPPINGS) == ["ContentEncode", "KeepPhotoColours", "LoadStyleLoRA", "MaskedStyleApply",
                                           "StyleFromImage", "StyleMetrics", "StyleStrength", "TrainStyle"]
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    assert (REPO / stylora.WEB_DIRECTORY / "stylora.js").is_file()
    for cls in NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "Stylora" and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
        inputs = cls.INPUT_TYPES()
        for group in inputs.values():
            for name, (_, options) in group.items():
                assert options.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    assert LoadStyleLoRA.INPUT_TYPES()["required"]["style"][0] == []  # no ComfyUI: no files to list


def test_styles_folder_is_registered_and_merged():
    fp = types.SimpleNamespace(models_dir="/comfy/models", folder_names_and_paths={},
                               supported_pt_extensions={".safetensors", ".ckpt"})
    register_model_folders(fp)
    assert fp.folder_names_and_paths[STYLE_FOLDER_KEY] == (["/comfy/models/styles"], {".safetensors", ".ckpt"})
    assert fp.folder_names_and_paths["stylora_metrics"][0] == ["/comfy/models/stylora_metrics"]
    fp.folder_names_and_paths[STYLE_FOLDER_KEY] = (["/data/my-styles"], {".safetensors"})  # extra_model_paths.yaml
    register_model_folders(fp)
    assert fp.folder_names_and_paths[STYLE_FOLDER_KEY][0] == ["/data/my-styles", "/comfy/models/styles"]


def test_blend_weights_normalise():
    assert normalize_blend([1.0, 1.0]) == [0.5, 0.5]
    assert sum(normalize_blend([1.0, 0.5, 2.5])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="must not all be 0"):
        normalize_blend([0.0])


@pytest.fixture(scope="module")
def tiny_key_map(tiny_model):
    """ComfyUI's naming for the tiny UNet: kohya prefix -> `diffusion_model.<LDM key>`, and the LDM shapes."""
    from diffusers import UNet2DConditionModel
    from stylora.trainer.ldm_layout import UNET_PREFIX, unet_to_ldm

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model["diffusers"]), subfolder="unet")
    sd = unet.state_dict()
    ldm = unet_to_ldm(sd, dict(unet.config))
    by_value = {id(v): k for k, v in ldm.items()}
    key_map, shapes = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight"):
            target = "diffusion_model." + by_value[id(v)][len(UNET_PREFIX):]
            key_map["lora_unet_" + k[: -len(".weight")].replace(".", "_")] = target
            shapes[target] = tuple(v.shape)
    return key_map, shapes


def _lora(in_dim: int, out_dim: int, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.lora_down.weight": torch.zeros(4, in_dim), f"{prefix}.lora_up.weight": torch.zeros(out_dim, 4),
            f"{prefix}.alpha": torch.tensor(4.0)}


def test_load_style_lora_declares_records_and_refuses(tmp_path, monkeypatch):
    """Load Style LoRA's declared ranges, the text encoder's style record, the default suggested denoise (0.6,
    README), and a file that does not fit refused with its name."""
    from fake_host import FakeCLIP, FakeComfy
    from stylora.core.lora_file import save_lora

    required, optional = LoadStyleLoRA.INPUT_TYPES()["required"], LoadStyleLoRA.INPUT_TYPES()["optional"]
    assert {k: required["strength"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05}
    for name in ("weight_2", "weight_3"):
        assert {k: optional[name][1][k] for k in ("default", "min", "max", "step")} == {
            "default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}
    assert optional["style_2"][1]["default"] == "None" and optional["style_2"][0] == ["None"]
    unet = {"lora_unet_x.lora_down.weight": torch.zeros(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 2)}
    files = {"s": str(save_lora(tmp_path / "s.safetensors", unet, {})),
             "bad": str(save_lora(tmp_path / "bad.safetensors", {k.replace("_x", "_y"): v for k, v in unet.items()},
                                  {}))}
    comfy = FakeComfy(files).install(monkeypatch)
    te_adapter = ("te",)

    def with_text_encoder(model, clip, state, strength_model, strength_clip):
        clip = clip.clone()
        clip.patcher.add_patches({"clip_l.fc1": te_adapter}, strength_clip)
        return model.clone(), clip

    monkeypatch.setattr(comfy.sd, "load_lora_for_models", with_text_encoder)
    _, clip, info, _ = LoadStyleLoRA().load(comfy.model(), FakeCLIP(), "s", 1.0)
    assert clip.patcher.get_attachment(STYLE_ATTACHMENT) == (te_adapter,)  # Style Strength scales it
    assert info["suggested_denoise"] == 0.6 and info["styles"][0]["suggested_denoise"] == 0.6
    with pytest.raises(ValueError, match=r"style 'bad' \(.*bad.safetensors\) does not fit this SD1.5 model.*"
                                         "no matching model layer: lora_unet_y"):
        LoadStyleLoRA().load(comfy.model(), FakeCLIP(), "bad", 1.0)

    class SDXL:
        pass

    with pytest.raises(ValueError, match="the model is SDXL; Stylora styles are for SD1.5"):
        LoadStyleLoRA().load(comfy.model(SDXL()), FakeCLIP(), "s", 1.0)


def test_fit_check_accepts_sd15_shapes_and_names_every_misfit(tiny_key_map):
    key_map, shapes = tiny_key_map
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # cross-attention: 32 -> 32
    assert check_lora_fits(_lora(32, 32, good), key_map, shapes) == []
    sd2_like = _lora(1024, 32, good)  # SD2's 1024-wide text embeddings
    assert "1 modules of the wrong shape: " + good + ": LoRA maps 1024->32" in check_lora_fits(sd2_like, key_map,
                                                                                                 shapes)[0]
    sdxl_like = {**_lora(32, 32, good), **_lora(768, 768, "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
                 **_lora(64, 64, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q")}
    problems = check_lora_fits(sdxl_like, key_map, shapes)
    assert problems == ["2 modules with no matching model layer: lora_te1_text_model_encoder_layers_0_mlp_fc1, "
                        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"]
    assert check_lora_fits({"hada_w1_a": torch.zeros(1)}, key_map, shapes) == ["1 unknown keys: hada_w1_a"]
    assert check_lora_fits({}, key_map, shapes) == ["no LoRA weights in the file"]
    broken = _lora(32, 32, good)
    broken[f"{good}.lora_up.weight"][0, 0] = float("nan")
    broken[f"{good}.alpha"] = torch.tensor(float("inf"))
    assert check_lora_fits(broken, key_map, shapes) == [f"2 tensors with NaN/inf values: {good}.lora_up.weight, "
                                                        f"{good}.alpha"]
    half = {f"{good}.lora_down.weight": torch.zeros(4, 32)}
    assert "missing up or down" in check_lora_fits(half, key_map, shapes)[0]


def test_trained_style_fits_the_model_it_was_trained_for(tiny_key_map, tiny_model, style_folder, tmp_path):
    from stylora.core.lora_file import read_lora
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora

    out = tmp_path / "s.safetensors"
    train_lora(LoraTrainConfig(data=str(style_folder), output=str(out), base_model=str(tiny_model["diffusers"]),
                               resolution=64, steps=1, min_images=1, checkpoint_every=0), progress=False)
    assert check_lora_fits(read_lora(out)[0], *tiny_key_map) == []


# --- ContentEncode: sizing and encoding -------------------------------------------------------------------

def test_encode_sizing_keeps_aspect_and_says_what_it_did():
    from stylora.nodes.content import plan_size, resize_images

    plan = plan_size(1024, 683, 512)  # shrink, then stretch by < 8 px to multiples of 8
    assert plan.final == (512, 344) and plan.crop is None
    assert plan.describe() == ("1024x683 -> 512x344, scaled by 0.5 to 512x342, stretched +0x+2 px to a multiple "
                               "(aspect 1.4993 -> 1.4884)")
    crop = plan_size(1024, 683, 512, rounding="crop")
    assert crop.scaled == (512, 342) and crop.final == (512, 336) and crop.crop == (0, 3)
    assert crop.describe() == "1024x683 -> 512x336, scaled by 0.5 to 512x342, centre-cropped 0x6 px"
    assert plan_size(300, 200, 512).final == (304, 200)  # shrink only: small photos keep their size
    assert plan_size(300, 200, 512, resize_mode="fit max side").final == (512, 344)
    assert plan_size(512, 512, 512).describe() == "512x512: encoded at its own size"
    assert max(plan_size(2000, 10, 500).final) <= 500  # rounding up never breaks max_side
    with pytest.raises(ValueError, match="rounding"):
        plan_size(10, 10, 512, rounding="pad")
    images = torch.rand(2, 683, 1024, 3)
    out = resize_images(images, crop)
    assert out.shape == (2, 336, 512, 3) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(resize_images(images[:, :336, :512], plan_size(512, 336, 512)), images[:, :336, :512])


def test_content_encode_node_retries_nan_in_fp32_and_tiles_large_images():
    from stylora.nodes.content import ContentEncode, encode_images

    node = ContentEncode()
    good = FakeVAE()
    node._fp32_vae = lambda vae: good  # the float32 copy (built by the host inside ComfyUI)
    latent, image, info, _ = node.encode(torch.rand(1, 100, 150, 3), FakeVAE(bad=True), 512, 8, "stretch",
                                         "shrink only")
    assert latent["samples"].shape == (1, 4, 13, 19) and image.shape == (1, 104, 152, 3)
    assert torch.isfinite(latent["samples"]).all() and "re-encoded in float32" in info
    vae = FakeVAE()
    encode_images(vae, torch.rand(1, 64, 64, 3), tiling="always", tile_size=256)
    encode_images(vae, torch.rand(1, 64, 64, 3))
    assert vae.calls == ["tiled 256", "encode"]
    with pytest.raises(ValueError, match="NaN"):
        encode_images(FakeVAE(bad=True), torch.rand(1, 64, 64, 3), fp32_vae=lambda: FakeVAE(bad=True))


def test_content_encode_edges_declared_inputs_and_what_reaches_the_vae():
    from stylora.nodes.content import ContentEncode, encode_images, plan_size

    for w, h in ((0, 10), (10, 0)):
        with pytest.raises(ValueError, match=rf"image: empty image \({w}x{h}\)"):
            plan_size(w, h, 512)
    assert plan_size(1, 1, 0).final == (8, 8)  # a 1x1 photo is not empty
    for w, h in ((4, 64), (64, 4)):  # one side under the multiple: cropping leaves nothing
        with pytest.raises(ValueError, match="smaller than size_multiple=8"):
            plan_size(w, h, 0, rounding="crop")
    assert plan_size(1003, 501, 0).final == (1000, 504)  # max_side 0: no limit, rounding may go up
    assert plan_size(1003, 501, 1003).final == (1000, 504)  # at max_side exactly: kept, rounded down to fit
    assert plan_size(1000, 500, 1000, resize_mode="fit max side").scaled == (1000, 500)
    seen = []

    class Recording(FakeVAE):
        def encode(self, pixels):
            seen.append(("encode", pixels.shape[-1]))
            return super().encode(pixels)

        def encode_tiled(self, pixels, tile_x, tile_y, overlap):
            seen.append(("tiled", pixels.shape[-1], tile_x, tile_y, overlap))
            return super().encode_tiled(pixels, tile_x, tile_y, overlap)

    rgba = torch.rand(1, 64, 64, 4)
    encode_images(Recording(), rgba)
    encode_images(Recording(), rgba, tiling="always", tile_size=320)
    assert seen == [("encode", 3), ("tiled", 3, 320, 320, 40)] and isinstance(seen[1][4], int)
    full = ContentEncode().encode(torch.rand(1, 64, 96, 3), FakeVAE(), 512, 8, "stretch", "shrink only",
                                  mask=torch.ones(1, 64, 96))[3]
    assert full.shape == (1, 64, 96) and (full == 1).all()  # a mask of the photo's size is used as it is
    required, optional = ContentEncode.INPUT_TYPES()["required"], ContentEncode.INPUT_TYPES()["optional"]
    assert {k: required["max_side"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 512, "min": 0, "max": 8192, "step": 8}
    assert {k: optional["tile_size"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 512, "min": 256, "max": 2048, "step": 64}


@pytest.mark.parametrize("bad", ["one", "all"])
def test_content_encode_re_encodes_in_float32_when_any_latent_value_is_not_finite(bad):
    """One inf among the latent's values (an fp16 VAE overflowing on one bright patch) is as unusable as all NaN."""
    from stylora.nodes.content import encode_images

    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    half, full = FakeVAE(bad=bad), FakeVAE()
    latents, note = encode_images(half, pixels, fp32_vae=lambda: full)
    assert half.calls == ["encode"] and full.calls == ["encode"]
    assert note == "re-encoded in float32 (the VAE overflowed)"
    torch.testing.assert_close(latents, FakeVAE().encode(pixels), rtol=0, atol=0)
    assert torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="no float32 VAE is available"):
        encode_images(FakeVAE(bad=bad), pixels)
    with pytest.raises(ValueError, match="NaN/inf values even in float32"):
        encode_images(FakeVAE(bad=bad), pixels, fp32_vae=lambda: FakeVAE(bad="one"))


def test_load_style_lora_reads_a_style_replaced_under_the_same_name(tmp_path, monkeypatch):
    """A style file overwritten by another style, with the same size and the old file's time (cp -p, a sync
    tool): the node's cache must not hand back the old style."""
    import os

    from fake_host import FakeCLIP, FakeComfy
    from stylora.core.lora_file import save_lora

    def style(value: float) -> dict:
        return {"lora_unet_x.lora_down.weight": torch.full((2, 8), value),
                "lora_unet_x.lora_up.weight": torch.full((8, 2), value), "lora_unet_x.alpha": torch.tensor(2.0)}

    path = tmp_path / "s.safetensors"
    save_lora(path, style(0.1), {"stylora.trigger": "old"})
    comfy = FakeComfy({"s.safetensors": str(path)}).install(monkeypatch)
    node = LoadStyleLoRA()
    assert node.load(comfy.model(), FakeCLIP(), "s.safetensors", 1.0)[3] == "old"
    before = os.stat(path)
    save_lora(tmp_path / "new.safetensors", style(0.2), {"stylora.trigger": "new"})
    (tmp_path / "new.safetensors").replace(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the old file's time
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    _, _, info, trigger = node.load(comfy.model(), FakeCLIP(), "s.safetensors", 1.0)
    assert trigger == "new" and info["styles"][0]["trigger"] == "new"
    assert len(node._cache) == 1  # the old file's entry is gone
    unchanged = node._cache.copy()
    node.load(comfy.model(), FakeCLIP(), "s.safetensors", 1.0)
    assert all(node._cache[k] is unchanged[k] for k in unchanged)  # an unchanged file is not read again


@pytest.mark.parametrize("rounding", ["crop", "stretch"])
def test_content_encode_gives_the_mask_the_photos_resize_and_crop(rounding):
    from stylora.nodes.content import ContentEncode

    photo = torch.rand(1, 203, 309, 3, generator=torch.Generator().manual_seed(0))
    _, image, info, mask = ContentEncode().encode(photo, FakeVAE(), 128, 16, rounding, "shrink only",
                                                  mask=photo[..., 0])  # a "mask" that is the photo's red channel
    assert mask.shape == image.shape[:3] == (1, 80, 128 if rounding == "crop" else 128)
    assert torch.allclose(mask, image[..., 0], atol=1e-6)  # pixel for pixel where the photo's pixels went
    no_alpha = ContentEncode().encode(photo, FakeVAE(), 128, 16, rounding, "shrink only", mask=torch.zeros(64, 64))
    assert no_alpha[3].shape == (1, 80, 128) and not no_alpha[3].any()


def test_content_encode_declares_the_vaes_multiple_and_tiles_at_512_by_default():
    """The VAE downsamples by 8: size_multiple moves in steps of 8 from 8. Without tile_size, tiles are 512 px with
    a 64 px (1/8) overlap; "auto" tiles only above 1536 x 1536 pixels."""
    from stylora.nodes.content import ContentEncode, encode_images

    required, optional = ContentEncode.INPUT_TYPES()["required"], ContentEncode.INPUT_TYPES()["optional"]
    assert {k: required["size_multiple"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 8, "min": 8, "max": 128, "step": 8}
    assert (required["rounding"][1]["default"], required["resize_mode"][1]["default"],
            optional["tiling"][1]["default"]) == ("stretch", "shrink only", "auto")
    seen = []

    class Recording:  # records what reaches the VAE; a zero latent of the right shape
        def encode(self, pixels):
            seen.append(("encode", *pixels.shape[1:3]))
            return torch.zeros(1, 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

        def encode_tiled(self, pixels, tile_x, tile_y, overlap):
            seen.append(("tiled", tile_x, tile_y, overlap))
            return torch.zeros(1, 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    ContentEncode().encode(torch.rand(1, 64, 64, 3), Recording(), 512, 8, "stretch", "shrink only", tiling="always")
    encode_images(Recording(), torch.zeros(1, 1, 1, 3).expand(1, 64, 64, 3), tiling="always")
    assert seen == [("tiled", 512, 512, 64)] * 2
    seen.clear()
    for h, w in ((1536, 1536), (1536, 1544), (1544, 1536)):  # 1536 * 1536 pixels exactly: one encode
        encode_images(Recording(), torch.zeros(1, 1, 1, 3).expand(1, h, w, 3))
    assert seen == [("encode", 1536, 1536), ("tiled", 512, 512, 64), ("tiled", 512, 512, 64)]


def test_content_encode_keeps_a_one_pixel_side_and_resamples_at_pixel_centres():
    from stylora.nodes.content import SizePlan, plan_size, resize_images

    # 2000x1 to max_side 500: scale 0.25, the 1 px side rounds to 0 and is kept at 1; stretched to 8, and the long
    # side 500 -> 504 (half rounds up) is capped at 496, the largest multiple of 8 within max_side
    assert plan_size(2000, 1, 500) == SizePlan((2000, 1), (500, 1), (496, 8), None)
    assert plan_size(1, 2000, 500) == SizePlan((1, 2000), (1, 500), (8, 496), None)
    assert plan_size(2000, 1, 500).describe() == \
        "2000x1 -> 496x8, scaled by 0.25 to 500x1, stretched -4x+7 px to a multiple (aspect 2000.0000 -> 62.0000)"
    assert plan_size(1, 2000, 500).describe().startswith("1x2000 -> 8x496, scaled by 0.25 to 1x500,")  # not by 1/1
    # A portrait: 683 x 0.5 = 341.5 rounds to 342, but the scale applied (and said) is 0.5, not 342 / 683
    assert plan_size(683, 1024, 512).describe() == \
        "683x1024 -> 344x512, scaled by 0.5 to 342x512, stretched +2x+0 px to a multiple (aspect 0.6670 -> 0.6719)"
    # A 2x shrink of a linear ramp: a symmetric, normalised (antialiased bicubic) kernel reproduces a line, so away
    # from the borders output pixel i is the ramp at its centre, input pixel 2i + 0.5 (align_corners=False: pixel
    # centres, not corners, line up)
    ramp_x = (torch.arange(32.0) / 31).expand(1, 16, 32)[..., None].expand(1, 16, 32, 3)
    ramp_y = (torch.arange(16.0) / 15)[:, None].expand(1, 16, 32)[..., None].expand(1, 16, 32, 3)
    plan = plan_size(32, 16, 16)
    assert plan.final == (16, 8) and plan.crop is None
    centres = torch.arange(16.0) * 2 + 0.5
    out_x, out_y = resize_images(ramp_x, plan), resize_images(ramp_y, plan)
    assert out_x.shape == out_y.shape == (1, 8, 16, 3)
    torch.testing.assert_close(out_x[0, 3, 2:14, 1], centres[2:14] / 31, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_y[0, 2:6, 7, 2], centres[2:6] / 15, rtol=0, atol=1e-6)
    # Already at the encoded size: returned as it is, not resampled (values, dtype and all)
    exact = torch.rand(1, 16, 24, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert resize_images(exact, plan_size(24, 16, 512)) is exact


def test_content_encode_resizes_a_mask_of_another_size_to_the_photo_then_like_the_photo():
    """A mask at half the photo's size is first brought to the photo's size (bilinear, pixel centres); here the
    photo is already 96x64 (multiples of 8), so that is the output. 2x bilinear with align_corners=False: output
    pixel j samples the mask at j / 2 - 0.25, so a step between mask columns 23 and 24 becomes output columns
    47 -> 0.25 and 48 -> 0.75 (rows: 31 -> 0.25, 32 -> 0.75)."""
    from stylora.nodes.content import ContentEncode

    mask = torch.zeros(1, 32, 48)
    mask[:, 16:, 24:] = 1.0
    step_w = torch.tensor([0.0] * 47 + [0.25, 0.75] + [1.0] * 47)
    step_h = torch.tensor([0.0] * 31 + [0.25, 0.75] + [1.0] * 31)
    photo = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
    for m in (mask, mask[0]):  # [B, H, W] and [H, W]
        _, image, _, out = ContentEncode().encode(photo, FakeVAE(), 512, 8, "stretch", "shrink only", mask=m)
        assert torch.equal(image, photo)
        torch.testing.assert_close(out, (step_h[:, None] * step_w[None, :])[None], rtol=0, atol=1e-6)
    # Values outside 0..1 (a mask from arithmetic nodes) come out clamped, also when no resize touches them
    wild = torch.tensor([-1.0, 0.5, 2.0]).repeat(64, 32)[None]
    out = ContentEncode().encode(photo, FakeVAE(), 512, 8, "stretch", "shrink only", mask=wild)[3]
    assert torch.equal(out, torch.tensor([0.0, 0.5, 1.0]).repeat(64, 32)[None])


# --- StyleStrength ------------------------------------------------------------------------------------------

def test_style_strength_zero_is_the_identity_and_scales_only_style_patches(host):
    from stylora.nodes.strength import StyleStrength, style_schedule

    assert style_schedule(0.0) == (0.0, 0.0)
    assert style_schedule(0.25) == (0.5, 0.1875) and style_schedule(0.5, 0.6) == (1.0, 0.3)
    assert style_schedule(1.0) == (1.0, 0.75)
    with pytest.raises(ValueError, match="strength must be in 0..1, got 1.5"):
        style_schedule(1.5)
    other = (torch.ones(2, 2),)  # e.g. a detail LoRA from stock LoraLoader, applied before the style
    base = host.patcher(("w1", "w2"))
    host.add_patch(base, "w1", other, 1.0)
    styled = base.clone()
    a1, a2 = (torch.ones(2, 2),), (torch.ones(2, 2),)
    host.add_patch(styled, "w1", a1, 0.8, 0.8)
    host.add_patch(styled, "w2", a2, 0.8, 0.8)
    styled.set_attachments(STYLE_ATTACHMENT, style_adapters(base, styled))
    assert styled.get_attachment(STYLE_ATTACHMENT) == (a1, a2)
    uuid = styled.patches_uuid
    zero, denoise, no_clip = StyleStrength().apply(styled, 0.0)[:3]
    assert denoise == 0.0 and zero.patches == base.patches and zero.patches_uuid != uuid and no_clip is None
    half, denoise, _ = StyleStrength().apply(styled, 0.25, max_denoise=0.8)[:3]
    assert denoise == pytest.approx(0.2)
    assert half.patches["w1"] == [(1.0, other, 1.0, None, None), (0.4, a1, 0.8, None, None)]
    assert half.patches_uuid not in (uuid, zero.patches_uuid)  # each rescale is baked afresh
    assert styled.patches["w2"] == [(0.8, a2, 0.8, None, None)] and styled.patches_uuid == uuid  # input untouched
    with pytest.raises(ValueError, match="no style applied"):
        StyleStrength().apply(base, 0.5)


def test_style_strength_scales_the_text_encoder_patches_too(host):
    from stylora.nodes.strength import StyleStrength

    te_adapter, other, unet_adapter = (torch.ones(2, 2),), (torch.ones(2, 2),), (torch.ones(2, 2),)
    base_clip = host.clip(host.patcher(("clip_l.fc1", "clip_l.fc2")))
    host.add_patch(base_clip.patcher, "clip_l.fc1", other, 1.0)
    clip = base_clip.clone()  # what Load Style LoRA returns for a LoRA with lora_te_* keys
    host.add_patch(clip.patcher, "clip_l.fc1", te_adapter, 0.8, 0.8)
    host.add_patch(clip.patcher, "clip_l.fc2", te_adapter, 0.8, 0.8)
    clip.patcher.set_attachments(STYLE_ATTACHMENT, style_adapters(base_clip.patcher, clip.patcher))
    model = host.patcher(("w",))
    host.add_patch(model, "w", unet_adapter, 0.8, 0.8)
    model.set_attachments(STYLE_ATTACHMENT, (unet_adapter,))
    uuid = clip.patcher.patches_uuid
    _, _, zero = StyleStrength().apply(model, 0.0, clip=clip)[:3]
    assert zero.patcher.patches == base_clip.patcher.patches and zero.patcher.patches_uuid != uuid
    _, _, quarter = StyleStrength().apply(model, 0.125, clip=clip)[:3]  # LoRA scale 0.25
    assert quarter.patcher.patches == {"clip_l.fc1": [(1.0, other, 1.0, None, None),
                                                      (0.2, te_adapter, 0.8, None, None)],
                                       "clip_l.fc2": [(0.2, te_adapter, 0.8, None, None)]}
    assert clip.patcher.patches["clip_l.fc2"] == [(0.8, te_adapter, 0.8, None, None)]  # the input is untouched
    assert StyleStrength().apply(model, 0.0, clip=base_clip)[2] is base_clip  # no text-encoder style: as given
    names = StyleStrength.RETURN_NAMES
    assert names[:3] == ("model", "denoise", "clip")  # saved workflows keep their output slots


def test_style_strength_declares_its_inputs():
    from stylora.nodes.strength import StyleStrength

    inputs = StyleStrength.INPUT_TYPES()
    required, optional = inputs["required"], inputs["optional"]
    assert [(k, v[0]) for k, v in required.items()] == [("model", "MODEL"), ("strength", "FLOAT"),
                                                       ("max_denoise", "FLOAT")]
    assert {k: required["strength"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}
    assert {k: required["max_denoise"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 0.75, "min": 0.0, "max": 1.0, "step": 0.01}
    assert optional["clip"][0] == "CLIP" and optional["use_calibration"][0] == "BOOLEAN"
    assert optional["use_calibration"][1]["default"] is True
    assert StyleStrength.RETURN_TYPES == ("MODEL", "FLOAT", "CLIP", "FLOAT", "STRING")


def test_a_painting_injection_beside_a_calibrated_style_keeps_todays_ramps():
    """Style From Image has no calibration: a model carrying it and a calibrated LoRA style is uncalibrated."""
    import types

    from fake_host import FakePatcher
    from stylora.core.strength_rule import Calibration
    from stylora.nodes.host import CALIBRATION_ATTACHMENT
    from stylora.nodes.strength import StyleStrength
    from stylora.nodes.style_image import INJECTION_ATTACHMENT

    adapter, cal = ("a",), Calibration((0.0, 0.5, 1.0), (0.95, 0.45, 0.35)).to_json()
    attachments = {STYLE_ATTACHMENT: (adapter,), CALIBRATION_ATTACHMENT: ((cal, 1.0),)}
    alone = FakePatcher(patches={"w": [(1.0, adapter, 1.0, None, None)]}, attachments=attachments)
    assert "-> calibrated: raw strength 0.300" in StyleStrength().apply(alone, 0.5)[4]
    removed = []
    injection = types.SimpleNamespace(inner=None, blocks=(6,),
                                      rescaled_onto=lambda model, factor: removed.append(factor))
    both = FakePatcher(patches={"w": [(1.0, adapter, 1.0, None, None)]},
                       attachments={**attachments, INJECTION_ATTACHMENT: injection})
    both.model_options = {"model_function_wrapper": injection,
                          "transformer_options": {"patches_replace": {"attn1": {("output", 6, 0): "patch"}}}}
    out, denoise, _, _, mapping = StyleStrength().apply(both, 0.0)
    assert mapping.startswith("strength 0.000 -> uncalibrated: raw strength 0.000") and denoise == 0.0
    assert out.patches == {} and removed == [0.0]  # the injection is rescaled to 0 through its own method


def test_the_rescaled_style_is_what_comfyui_bakes_into_the_weights(host):
    """On ComfyUI's own ModelPatcher: the weight it computes at load is the base plus the style's delta at the
    rescaled strength (0.8 x LoRA scale 0.5), and a second rescale of the same input is baked afresh."""
    from stylora.nodes.strength import StyleStrength

    if host.name != "real":
        pytest.skip("baking the weights is ComfyUI's own code (runs with COMFYUI_DIR)")
    delta = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    base = host.patcher(("x.weight",))
    styled = base.clone()
    adapter = (delta,)  # ComfyUI's plain weight-difference patch
    host.add_patch(styled, "x.weight", adapter, 0.8)
    styled.set_attachments(STYLE_ATTACHMENT, (adapter,))
    for strength, scale in ((0.25, 0.5), (0.0, 0.0), (0.5, 1.0)):
        out = StyleStrength().apply(styled, strength)[0]
        out.patch_model()
        torch.testing.assert_close(out.model.x.weight.detach(), 0.8 * scale * delta, rtol=0, atol=1e-6)
        out.unpatch_model()
        assert not out.model.x.weight.any()  # the base weight back


# --- MaskedStyleApply -----------------------------------------------------------------------------------------

def test_masked_composite_is_exact_outside_the_mask_and_feathers_inward():
    from stylora.nodes.mask import MaskedStyleApply

    gen = torch.Generator().manual_seed(0)
    content, styled = torch.rand(1, 64, 96, 3, generator=gen), torch.rand(1, 64, 96, 3, generator=gen)
    mask = torch.zeros(1, 32, 48)
    mask[:, 8:24, 12:36] = 1.0  # drawn at half size: resized to the content
    latent = {"samples": torch.zeros(1, 4, 8, 12)}
    node = MaskedStyleApply()
    _, masked_latent, _ = node.apply(content, mask, 8, False, latent=latent)
    assert masked_latent["noise_mask"].shape == (1, 1, 64, 96) and masked_latent["samples"] is latent["samples"]
    image, _, weights = node.apply(content, mask, 8, False, styled=styled)
    region = torch.nn.functional.interpolate(mask[:, None], size=(64, 96), mode="bilinear")[:, 0] > 0
    outside = ~region
    assert torch.equal(image[outside], content[outside])  # bit for bit
    assert (weights[outside] == 0).all() and weights.max() == 1.0
    assert torch.allclose(image[weights == 1], styled[weights == 1])
    assert 0 < weights[0, 32, 26] < weights[0, 32, 29] < 1  # the seam rises inside the edge (x=23, soft)
    inverted, _, _ = node.apply(content, mask, 0, True, styled=styled)
    assert torch.equal(inverted[0, 32, 48], content[0, 32, 48]) and torch.equal(inverted[0, 0, 0], styled[0, 0, 0])
    with pytest.raises(ValueError, match="styled image is 48x32 but content is 96x64"):
        node.apply(content, mask, 8, False, styled=styled[:, :32, :48])


def test_every_painted_pixel_gets_weight_even_in_strokes_thinner_than_the_feather():
    from stylora.nodes.mask import feather_mask

    mask = torch.zeros(1, 96, 96)
    mask[:, 10:80, 20:23] = 1.0  # a 3 px stroke
    mask[:, 50, 30:90] = 1.0  # a 1 px line
    mask[:, 60:90, 40:90] = 0.5  # a wide, half-opaque patch (50x30 px)
    weights = feather_mask(mask, 16)
    assert (weights[mask > 0] > 0).all() and (weights[mask == 0] == 0).all()
    assert (weights[0, 12:78, 21] == 1).all()  # the stroke's centre line keeps full weight
    assert weights[0, 75, 65] == 0.5 and 0 < weights[0, 61, 65] < 0.1  # wide regions: the usual inward ramp
    assert 0 < weights[0, 30, 20] < weights[0, 30, 21]


def test_regional_multi_style_by_chaining_keeps_unmasked_pixels():
    from stylora.nodes.mask import MaskedStyleApply

    gen = torch.Generator().manual_seed(1)
    content, style_a, style_b = (torch.rand(1, 48, 48, 3, generator=gen) for _ in range(3))
    left, right = torch.zeros(1, 48, 48), torch.zeros(1, 48, 48)
    left[:, :, :20], right[:, :, 28:] = 1.0, 1.0
    node = MaskedStyleApply()
    first, _, _ = node.apply(content, left, 4, False, styled=style_a)
    both, _, _ = node.apply(first, right, 4, False, styled=style_b)
    assert torch.equal(both[:, :, 20:28], content[:, :, 20:28])  # neither mask
    assert torch.equal(both[:, :, :20], first[:, :, :20])  # the first region survives the second pass
    assert torch.allclose(both[:, 10:40, 40:], style_b[:, 10:40, 40:])


# --- StyleMetrics ---------------------------------------------------------------------------------------------

def test_style_metrics_node_reports_available_and_unavailable_metrics(tmp_path, monkeypatch):
    from stylora.eval.metrics import VGGStyle
    from stylora.nodes.metrics import StyleMetrics

    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(tmp_path / "none"))
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    node = StyleMetrics()
    node._nets = {"vgg": VGGStyle(pretrained=False)}  # random weights: same code path, no download
    node._unavailable = {"lpips": "torchvision AlexNet (ImageNet): alexnet-owt-7be5be79.pth not found",
                         "artfid": "needs lpips", "fid": "no weights", "kid": "no weights"}
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(1, 64, 64, 3, generator=gen)
    styled = (content * 0.8 + 0.1).clamp(0, 1)
    out = node.measure(content, content, style=torch.rand(1, 80, 40, 3, generator=gen),
                       csv_path=str(tmp_path / "m.csv"), label="same")
    text, as_json = out["result"]
    import json

    scores = json.loads(as_json)
    assert scores["metrics"]["ssim"] == pytest.approx(1.0) and scores["metrics"]["content"] == 0.0
    assert "gram" in scores["metrics"] and "lpips: n/a (torchvision AlexNet" in text
    assert "fid" in scores["unavailable"] and out["ui"]["text"] == [text]
    node.measure(content, styled, csv_path=str(tmp_path / "m.csv"), label="shifted")
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("time,label,images,ssim,content,gram")
    assert float(rows[2].split(",")[3]) < 1.0


def test_style_metrics_never_sends_nan_to_the_browser(tmp_path):
    import json

    from stylora.eval.metrics import VGGStyle
    from stylora.eval.scoring import format_scores, json_safe
    from stylora.nodes.metrics import StyleMetrics

    node = StyleMetrics()
    node._nets, node._unavailable = {"vgg": VGGStyle(pretrained=False)}, {"lpips": "alexnet-owt-7be5be79.pth missing"}
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(2, 48, 48, 3, generator=gen)
    styled = content.clone()
    styled[1, 5, 5, 0] = float("nan")  # an fp16 VAE decode that overflowed, in the second image only
    out = node.measure(content, styled, style=torch.rand(1, 32, 32, 3, generator=gen))
    text, as_json = out["result"]
    json.dumps(out["ui"], allow_nan=False)  # what ComfyUI sends over the websocket: valid JSON
    scores = json.loads(as_json, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert scores["per_image"]["ssim"][0] == pytest.approx(1.0) and scores["per_image"]["ssim"][1] is None
    assert "ssim" not in scores["metrics"] and "content" not in scores["metrics"]
    assert "ssim: n/a (not a finite number for 1 of 2 image(s): NaN/inf pixels in the styled image)" in text
    assert scores["nonfinite_pixels"] == [0, 1] and text.splitlines()[1].startswith(
        "WARNING: NaN/inf pixels in the styled image(s) (image 2: 1 pixel(s)); Save Image writes them as black")
    lines = node.measure(content, content)["result"][0].splitlines()
    numbers = [i for i, line in enumerate(lines) if "is better" in line]
    assert numbers and lines.index("lpips: n/a (alexnet-owt-7be5be79.pth missing)") > max(numbers)
    assert all("nan" not in line.lower().replace("nan/inf", "") for line in text.splitlines())
    assert json_safe({"a": [float("inf"), 1.0], "b": (float("nan"),)}) == {"a": [None, 1.0], "b": [None]}
    nan_fid = {"images": 1, "metrics": {"fid": float("nan")}, "unavailable": {}}
    assert format_scores(nan_fid) == "1 image(s)\nfid: n/a (not a finite number)"


def test_load_style_lora_blends_three_styles_at_strength_times_weight_and_records_them(tmp_path, monkeypatch):
    """A blend of three styles: each patched at strength x its normalised weight (worked by hand below), the added
    patches and each style's calibration recorded for Style Strength, and the suggested denoise the weighted mean."""
    from fake_host import STYLE_KEY, FakeCLIP, FakeComfy
    from stylora.core.lora_file import save_lora
    from stylora.core.strength_rule import CALIBRATION_KEY, Calibration
    from stylora.nodes.host import CALIBRATION_ATTACHMENT

    unet = {"lora_unet_x.lora_down.weight": torch.zeros(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 2)}
    cal = Calibration((0.0, 0.5, 1.0), (0.95, 0.45, 0.35)).to_json()
    files = {"a": str(save_lora(tmp_path / "a.safetensors", unet, {"stylora.suggested_denoise": "0.4",
                                                                   CALIBRATION_KEY: cal})),
             "b": str(save_lora(tmp_path / "b.safetensors", unet, {"stylora.suggested_denoise": "0.8"})),
             "c": str(save_lora(tmp_path / "c.safetensors", unet, {"stylora.suggested_denoise": "0.6"})),
             "broken": str(save_lora(tmp_path / "broken.safetensors", unet, {CALIBRATION_KEY: "{not json"}))}
    comfy = FakeComfy(files).install(monkeypatch)
    base = comfy.model()
    # weights 1 (the first style's), 2 (style_2's default 1.0 would give 1/3 each) and 1: normalised 1/4, 1/2, 1/4.
    model, _, info, _ = LoadStyleLoRA().load(base, FakeCLIP(), "a", 0.8, style_2="b", weight_2=2.0, style_3="c")
    assert [s for _, s, _ in comfy.loaded] == pytest.approx([0.2, 0.4, 0.2])  # the UNet's strength
    assert [s for _, _, s in comfy.loaded] == pytest.approx([0.2, 0.4, 0.2])  # the text encoder's
    added = tuple(p[1] for p in model.patches[STYLE_KEY])
    assert len(added) == 3 and model.get_attachment(STYLE_ATTACHMENT) == added
    assert base.get_attachment(STYLE_ATTACHMENT) is None  # the input model is left as it was
    recorded = model.get_attachment(CALIBRATION_ATTACHMENT)
    assert [c for c, _ in recorded] == [cal, None, None] and [w for _, w in recorded] == pytest.approx([0.2, 0.4, 0.2])
    assert [s["calibrated"] for s in info["styles"]] == [True, False, False] and info["calibrated"] is False
    assert [s["weight"] for s in info["styles"]] == pytest.approx([0.25, 0.5, 0.25])
    assert info["suggested_denoise"] == pytest.approx(0.25 * 0.4 + 0.5 * 0.8 + 0.25 * 0.6)  # 0.6
    comfy.loaded.clear()
    LoadStyleLoRA().load(comfy.model(), FakeCLIP(), "a", 1.0, style_2="b")  # weight_2 default 1.0: half each
    assert [s for _, s, _ in comfy.loaded] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match=r"style 'broken' \(.*broken.safetensors\): .*run stylora calibrate again"):
        LoadStyleLoRA().load(comfy.model(), FakeCLIP(), "broken", 1.0)
