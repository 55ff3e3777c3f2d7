"""Base models: the three kinds of source, refusal of what is not SD1.x, and the LDM single-file layout."""

from __future__ import annotations

import pytest
import torch
from stylora.trainer.base_model import check_sd1_single_file, classify_source, load_base_model


def test_single_file_and_diffusers_folder_load_the_same_weights(tiny_model):
    a = load_base_model(str(tiny_model["diffusers"]))
    b = load_base_model(str(tiny_model["single_file"]), config_dir=tiny_model["config"])
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert b.name == "tiny-sd15" and len(b.sha256) == 64 and len(b.legacy_hash) == 8


def test_single_file_has_the_three_original_key_groups(tiny_model):
    from safetensors import safe_open

    with safe_open(str(tiny_model["single_file"]), "pt") as f:
        keys = list(f.keys())
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys  # first upsampler (no attention)
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys


def test_sources_are_classified_and_bad_ones_refused(tmp_path, tiny_model):
    assert classify_source(str(tiny_model["single_file"])) == "single_file"
    assert classify_source(str(tiny_model["diffusers"])) == "diffusers_dir"
    assert classify_source("stable-diffusion-v1-5/stable-diffusion-v1-5") == "hub"
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickled"):
        classify_source(str(tmp_path / "model.ckpt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        classify_source(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        classify_source(str(tmp_path))


def test_sd2_and_sdxl_checkpoints_refused(tmp_path):
    from safetensors.torch import save_file

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(320, 1024)}, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(ValueError, match="SD2"):
        check_sd1_single_file(tmp_path / "sd2.safetensors")
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ValueError, match="SDXL"):
        check_sd1_single_file(tmp_path / "xl.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        check_sd1_single_file(tmp_path / "junk.safetensors")


def test_samplable_random_model_scales_latents_by_32_and_noise_predictions_by_a_tenth():
    """samplable=True: the same random weights except the VAE latent (x32 in, /32 out: the same decoded image) and
    the UNet's last convolution (x0.1); checked against the plain build, layer by layer."""
    from conftest import TINY_CONFIG
    from model_builders import build_random_pipeline

    plain, samplable = build_random_pipeline(TINY_CONFIG, seed=3), build_random_pipeline(TINY_CONFIG, seed=3,
                                                                                         samplable=True)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    latent = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        dist_p, dist_s = plain.vae.encode(image).latent_dist, samplable.vae.encode(image).latent_dist
        assert torch.allclose(dist_s.mean, 32 * dist_p.mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(dist_s.std, 32 * dist_p.std, rtol=1e-4)
        assert torch.allclose(samplable.vae.decode(32 * latent).sample, plain.vae.decode(latent).sample, atol=1e-5)
        ctx = torch.randn(1, 77, plain.unet.config.cross_attention_dim, generator=gen)
        eps_p = plain.unet(latent, 500, ctx).sample
        assert torch.allclose(samplable.unet(latent, 500, ctx).sample, 0.1 * eps_p, atol=1e-6)
    same = {k for k, v in plain.unet.state_dict().items() if torch.equal(v, samplable.unet.state_dict()[k])}
    assert set(plain.unet.state_dict()) - same == {"conv_out.weight", "conv_out.bias"}
