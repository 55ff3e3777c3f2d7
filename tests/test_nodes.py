"""Node declarations and the library functions behind them, without ComfyUI."""

from __future__ import annotations

import types

import pytest
import torch
from stylora import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from stylora.nodes.style_lora import STYLE_FOLDER_KEY, LoadStyleLoRA, register_model_folders
from stylora.trainer.lora_file import check_lora_fits, normalize_blend


def test_declarations_are_complete_without_comfyui():
    assert set(NODE_CLASS_MAPPINGS) <= set(NODE_DISPLAY_NAME_MAPPINGS)
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
    half = {f"{good}.lora_down.weight": torch.zeros(4, 32)}
    assert "missing up or down" in check_lora_fits(half, key_map, shapes)[0]


def test_trained_style_fits_the_model_it_was_trained_for(tiny_key_map, tiny_model, style_folder, tmp_path):
    from stylora.trainer.config import LoraTrainConfig
    from stylora.trainer.lora import train_lora
    from stylora.trainer.lora_file import read_lora

    out = tmp_path / "s.safetensors"
    train_lora(LoraTrainConfig(data=str(style_folder), output=str(out), base_model=str(tiny_model["diffusers"]),
                               resolution=64, steps=1, min_images=1, checkpoint_every=0), progress=False)
    assert check_lora_fits(read_lora(out)[0], *tiny_key_map) == []
