"""Test models: SD1.x-shaped pipelines with random weights, written as diffusers folders or single files.

For the tests (tiny configs, tests/fixtures/tiny_sd15) and the benchmarks (the full SD1.5 configs: the same cost as
real weights); the package itself only loads models (stylora.trainer.base_model).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from stylora.core.files import atomic_write
from stylora.trainer.base_model import SHIPPED_SD15_CONFIG
from stylora.trainer.ldm_layout import pipeline_to_ldm

# Sampling a model with diffusers' default random initialisation gives the same texture whatever the photo, style
# or strength, for two reasons. (1) The random VAE encodes a photo to latents of std ~0.2, while SD's latent scaling
# factor 0.18215 (Rombach et al. 2022, sec. G) assumes std ~5.5: in the sampler's space the photo is ~0.04 against
# noise of std sigma, so even at denoise 0.3 the noise drowns it. (2) The random UNet predicts noise of std ~0.3-1.3
# unrelated to the noise added; the denoised estimate x0 = x_t - sigma * eps (Ho et al. 2020) is then dominated by
# sigma * eps. A samplable test model rescales two places, with the same architecture and cost:
SAMPLABLE_VAE_LATENT_SCALE = 32.0  # encoder mean x32 (log-variance + 2 ln 32), decoder input /32: same images
SAMPLABLE_UNET_OUTPUT_SCALE = 0.1  # the UNet's last convolution x0.1: eps std ~0.03, each step a small correction


def build_random_pipeline(config_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                          samplable: bool = False):
    """An SD1.x-shaped `StableDiffusionPipeline` with random weights from the configs in `config_dir`.

    For tests (tiny configs) and timing (the full SD1.5 configs: same cost as real weights). samplable=True
    rescales the VAE's latent and the UNet's output (SAMPLABLE_VAE_LATENT_SCALE, SAMPLABLE_UNET_OUTPUT_SCALE) so
    that a sampler's images are finite and depend on the photo, the style and the strength; False keeps diffusers'
    initialisation as it is.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config_dir = Path(config_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
    if samplable:
        k = SAMPLABLE_VAE_LATENT_SCALE
        with torch.no_grad():
            unet.conv_out.weight.mul_(SAMPLABLE_UNET_OUTPUT_SCALE)
            unet.conv_out.bias.mul_(SAMPLABLE_UNET_OUTPUT_SCALE)
            half = vae.quant_conv.out_channels // 2  # [mean | log-variance] of the latent distribution
            vae.quant_conv.weight[:half].mul_(k)
            vae.quant_conv.bias[:half].mul_(k)
            vae.quant_conv.bias[half:].add_(2 * math.log(k))  # the sampled latent's std scales with its mean
            vae.post_quant_conv.weight.div_(k)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    tok_dir = config_dir / "tokenizer" if (config_dir / "tokenizer").is_dir() else SHIPPED_SD15_CONFIG / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    scheduler = DDIMScheduler.from_config(json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def save_single_file(pipe, path: str | Path, dtype: torch.dtype | None = torch.float16,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the pipeline as one original-layout SD1.x `.safetensors` checkpoint (atomically)."""
    from safetensors.torch import save_file

    sd = pipeline_to_ldm(pipe.unet, pipe.vae, pipe.text_encoder, dtype=dtype)
    return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata or {}))


def copy_config_folder(src: str | Path, dst: str | Path) -> Path:
    """Copy a diffusers config folder (json and tokenizer files only, no weights)."""
    src, dst = Path(src), Path(dst)
    for f in src.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt"):
            (dst / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst / f.relative_to(src))
    return dst
