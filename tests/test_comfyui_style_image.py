"""Style From Image in a real ComfyUI (skipped unless COMFYUI_DIR is set; see tests/test_comfyui.py for the
environment variables). The graph is built by `style_from_image_graph`, the API-format description of the
bundled `style_from_image` workflow."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import REPO, skimage_textures
from test_comfyui import run_in_comfyui

pytestmark = [pytest.mark.comfyui, pytest.mark.slow,
              pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set")]


def style_from_image_graph(content: str = "stylora_content.jpg", painting: str = "stylora_style.jpg",
                           checkpoint: str = "v1-5-pruned-emaonly.safetensors", strength: float = 0.5,
                           denoise: float | None = None, steps: int = 20, max_side: int = 512, seed: int = 0,
                           styled: bool = True, mode: str = "paper") -> dict:
    """API-format graph: photo + one painting -> styled photo. Titles are what `stylora run --set` addresses.

    denoise None wires Style Strength's denoise into KSampler (as bundled); a number fixes it. styled False
    leaves out Style From Image and Style Strength (plain img2img, for comparisons). mode: Style From Image's.
    """
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint},
              "_meta": {"title": "Checkpoint"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": content}, "_meta": {"title": "Content photo"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": painting}, "_meta": {"title": "Painting"}},
        "4": {"class_type": "ContentEncode", "_meta": {"title": "Content encode"},
              "inputs": {"image": ["2", 0], "vae": ["1", 2], "max_side": max_side, "size_multiple": 8,
                         "rounding": "stretch", "resize_mode": "shrink only"}},
        "5": {"class_type": "StyleFromImage", "_meta": {"title": "Style from image"},
              "inputs": {"model": ["1", 0], "style_image": ["3", 0], "vae": ["1", 2], "latent": ["4", 0],
                         "mode": mode, "gamma": 0.75, "temperature": 1.5, "adain": 1.0, "blocks": "6-11"}},
        "6": {"class_type": "StyleStrength", "_meta": {"title": "Style strength"},
              "inputs": {"model": ["5", 0], "strength": strength, "max_denoise": 0.75}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}, "_meta": {"title": "Prompt"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]},
              "_meta": {"title": "Negative prompt"}},
        "9": {"class_type": "KSampler", "_meta": {"title": "Sampler"},
              "inputs": {"model": ["6", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["7", 0], "negative": ["8", 0],
                         "latent_image": ["4", 0], "denoise": ["6", 1] if denoise is None else denoise}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]},
               "_meta": {"title": "Decode"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "stylora_from_image"},
               "_meta": {"title": "Save"}},
    }
    if not styled:
        del g["5"], g["6"]
        g["9"]["inputs"].update(model=["1", 0], denoise=0.0 if denoise is None else denoise)
    return g


def _image(arr: np.ndarray, size: tuple[int, int]) -> list:
    from PIL import Image

    return (np.asarray(Image.fromarray(arr).convert("RGB").resize(size, Image.Resampling.LANCZOS)) / 255.0).tolist()


def test_style_from_image_in_comfyui(sd15_checkpoint, tmp_path):
    from PIL import Image

    photo = np.asarray(Image.open(REPO / "examples" / "stylora_content.jpg").convert("RGB"))
    # Two photos of 104x72 px: a 13x9 latent, neither side a multiple of 8.
    photos = [_image(photo, (104, 72)), _image(photo[:, ::-1].copy(), (104, 72))]
    painting = np.asarray(Image.open(REPO / "examples" / "stylora_style.jpg").convert("RGB"))
    images = {"photos.png": photos, "painting.png": [_image(painting, (80, 96))],
              "other.png": [_image(skimage_textures()["brick"], (80, 96))]}
    fast = dict(content="photos.png", painting="painting.png", steps=2, max_side=128, seed=1)
    graphs = {
        "styled": style_from_image_graph(**fast),
        "styled_other": style_from_image_graph(**{**fast, "painting": "other.png"}),
        "styled_s0": style_from_image_graph(**fast, strength=0.0),
        "plain_d0": style_from_image_graph(**fast, styled=False),
        "styled_s0_d05": style_from_image_graph(**fast, strength=0.0, denoise=0.5),
        "styled_s05_d05": style_from_image_graph(**fast, strength=0.5, denoise=0.5),
        "plain_d05": style_from_image_graph(**fast, styled=False, denoise=0.5),
        "styled_fast": style_from_image_graph(**fast, mode="fast"),
        "styled_fast_s0": style_from_image_graph(**fast, mode="fast", strength=0.0),
    }
    spec = tmp_path / "graphs.json"
    spec.write_text(json.dumps({"graphs": graphs, "images": images}))
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_style_image.py", str(REPO), str(sd15_checkpoint),
                            str(spec), limit_s=900)
    print("style from image in ComfyUI:", json.dumps(report))
    assert report["finite"] and report["shapes"]["styled"] == [2, 72, 104, 3]  # a batch of 2 photos
    assert report["input_model_untouched"], report["before"]
    assert report["s0_equals_plain_d0"] and report["s0_equals_plain_d05"]  # strength 0: plain img2img, exactly
    assert report["injected_vs_plain_d05"] > 0.5  # mean 8-bit difference: the injection changes the image
    assert report["two_paintings"] > 0.5
    assert report["fast_s0_equals_plain_d0"] and report["paper_vs_fast"] > 0.5  # paper mode (default) is not fast


def test_paper_mode_in_comfyui_agrees_with_the_styleid_oracle(tiny_model, tmp_path):
    """Paper mode sampled by ComfyUI itself (its sampler wrapper, calc_cond_batch, euler, its UNet with our attn1
    patches) on the tiny weights, against the StyleID oracle of tests/test_style_image.py on the same weights
    (tiny_model's UNet is built from the same config and seed as the oracle's)."""
    import torch
    from test_style_image import ORACLE_RTOL, ORACLE_TIMESTEPS, _context, _distance, _latents, _Oracle

    photo, painting = _latents()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"photo": photo.tolist(), "painting": painting.tolist(), "context": _context().tolist(),
                                "timesteps": list(ORACLE_TIMESTEPS)}))
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_style_oracle.py", str(REPO),
                            str(tiny_model["single_file"]), str(spec), limit_s=900)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        oracle = _Oracle().run(photo, painting)
        plain = _Oracle(inject=lambda step: False, adain_start=False).run(photo, painting)
    finally:
        torch.set_num_threads(threads)
    node = torch.tensor(report["latent"])
    print(f"paper mode in ComfyUI vs StyleID oracle: {_distance(node, oracle):.2e}")
    assert _distance(node, oracle) < ORACLE_RTOL and _distance(node, plain) > 50 * ORACLE_RTOL


def _attn1_lora(path, seed: int = 0) -> None:
    """A kohya LoRA on the self-attention q/k/v of SD1.5's decoder transformers (output blocks 6-11, the blocks
    Style From Image injects), random weights: a style on exactly the layers the injection reads."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for up, width in ((2, 640), (3, 320)):
        for j in range(3):
            for proj in "qkv":
                name = f"lora_unet_up_blocks_{up}_attentions_{j}_transformer_blocks_0_attn1_to_{proj}"
                state[f"{name}.lora_down.weight"] = torch.randn(4, width, generator=gen) * 0.1
                state[f"{name}.lora_up.weight"] = torch.randn(width, 4, generator=gen) * 0.1
                state[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(state, str(path))


def test_paper_mode_composes_with_batch_cfg_mask_lora_and_samplers_in_comfyui(sd15_checkpoint, tmp_path):
    """Load Style LoRA -> Style From Image (paper) -> ComfyUI's KSampler at CFG 3 over a batch of two photos whose
    latent carries Masked Style Apply's noise mask, with euler, dpmpp_2m and ddim (2 steps of denoise 0.5: the
    composition, not the look, is checked). Each batch item is what its photo gives sampled alone (euler); outside
    the mask the latent is the photo's (ComfyUI's inpainting puts the photo's latent back at every step) and the
    composite's pixels are the photo's exactly; both models given to the nodes are unchanged after sampling."""
    from PIL import Image

    photo = np.asarray(Image.open(REPO / "examples" / "stylora_content.jpg").convert("RGB"))
    painting = np.asarray(Image.open(REPO / "examples" / "stylora_style.jpg").convert("RGB"))
    mask = np.zeros((72, 104), np.float32)
    mask[:, :56] = 1.0  # the left 7 of 13 latent columns; latent columns are 8-pixel aligned, so exactly 0 or 1
    (tmp_path / "loras").mkdir()
    _attn1_lora(tmp_path / "loras" / "attn1_style.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "photos": [_image(photo, (104, 72)), _image(photo[::-1].copy(), (104, 72))],
        "painting": [_image(painting, (80, 96))], "mask": mask.tolist(), "lora": "attn1_style.safetensors",
        "steps": 2, "denoise": 0.5, "cfg": 3.0, "samplers": ["euler", "dpmpp_2m", "ddim"]}))
    report = run_in_comfyui(REPO / "tests" / "comfyui_check_style_compose.py", str(REPO), str(sd15_checkpoint),
                            str(tmp_path / "loras"), str(spec), limit_s=1800)
    print("paper mode composed in ComfyUI:", json.dumps(report))
    assert report["lora_patches"] == 18  # 2 x 3 transformers x q, k, v: the style is on the model
    for sampler in ("euler", "dpmpp_2m", "ddim"):
        r = report[sampler]
        assert r["finite"] and min(r["std_per_item"]) > 0.05, (sampler, r)
        assert r["items_differ"] > 0.05, (sampler, r)  # the two photos give two results
        assert r["kept_vs_photo"] < 1e-5, (sampler, r)  # outside the mask: the photo's latent
        assert r["styled_vs_photo"] > 0.05, (sampler, r)  # inside: sampled
    # euler: each item is its photo sampled alone, to float32 batching order (measured 1.3e-7; item 2 given item
    # 1's queries: 7.3e-4, a small change at 2 steps of denoise 0.5, hence the tight bound).
    assert report["batch_vs_alone"] < 1e-5
    assert report["cfg1_vs_cfg"] > 0.01 and report["styled_vs_plain"] > 0.01
    assert report["image_finite"] and report["pixels_outside_equal"] and report["pixels_inside_changed"] > 0.01
    assert report["base_untouched"] and report["lora_model_untouched"]
