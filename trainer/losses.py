"""Training objectives: the diffusion denoising loss (with min-SNR weighting and offset noise) and the perceptual
terms (LPIPS, Gram style loss) on the decoded x0 prediction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..eval.metrics import PerceptualLoss
from ..eval.weights import WeightsUnavailable


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_states: torch.Tensor, g: torch.Generator,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The diffusion training objective for a batch of clean latents z0 [B, 4, h, w] (scaled).

    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps with t ~ U{0..T-1} (Ho et al. 2020); the UNet predicts eps (or v).
    Noise and timesteps come from `g`, so a batch's draw depends only on its seed. Optional offset noise
    (Guttenberg 2023) and min-SNR-gamma weighting (Hang et al. 2023).
    Returns (per-sample loss [B], z_t, prediction, t).
    """
    device, dtype = latents.device, latents.dtype
    noise = torch.randn(latents.shape, generator=g)
    if noise_offset:
        noise += noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g)
    noise = noise.to(device, dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, encoder_states, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = compute_snr(noise_scheduler, t)
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr if epsilon else snr + 1)
    return loss, noisy, pred, t


def perceptual_terms(noise_scheduler, vae, perceptual: torch.nn.Module, noisy: torch.Tensor, pred: torch.Tensor,
                     t: torch.Tensor, target_pixels: torch.Tensor, scaling: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """LPIPS and Gram losses [B] between the decoded x0 prediction and the training images.

    x0 = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t) for epsilon prediction, sqrt(abar_t) z_t - sqrt(1 - abar_t) v
    for v-prediction (Salimans & Ho 2022). Only meaningful at low noise, where that prediction is sharp; the
    caller selects those samples. Gradients reach `pred` (and so the LoRA weights) through the frozen VAE
    decoder and feature networks. target_pixels: uint8 [B, 3, H, W].
    """
    abar = noise_scheduler.alphas_cumprod.to(pred.device)[t].view(-1, 1, 1, 1).float()
    z_t, out = noisy.float(), pred.float()
    if noise_scheduler.config.prediction_type == "epsilon":
        x0 = (z_t - (1 - abar).sqrt() * out) / abar.sqrt()
    else:
        x0 = abar.sqrt() * z_t - (1 - abar).sqrt() * out
    decoded = vae.decode(x0 / scaling).sample  # [-1, 1], fp32: the SD VAE overflows in fp16
    image = (decoded / 2 + 0.5).clamp(0, 1)
    return perceptual(image, target_pixels.float() / 255)


def perceptual_net(given: torch.nn.Module | None) -> torch.nn.Module:
    """`given`, or the LPIPS + Gram loss network (eval.metrics.PerceptualLoss) built from the published weights."""
    if given is not None:
        return given
    try:
        return PerceptualLoss()
    except WeightsUnavailable as e:  # the run must not quietly drop a loss term the user asked for
        raise ValueError(f"lpips_weight/style_weight need pretrained feature networks: {e}") from e


@dataclass(frozen=True)
class StyleLossWeights:
    """The terms of the style-LoRA loss: mse * MSE + (lpips * LPIPS + style * Gram) on the low-noise samples."""

    mse: float = 1.0
    lpips: float = 0.0
    style: float = 0.0
    perceptual_max_timestep: int = 200  # perceptual terms only for t below this (a sharp x0 prediction)
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None

    @property
    def perceptual(self) -> bool:
        return self.lpips > 0 or self.style > 0


@dataclass
class PerceptualInputs:
    """What the perceptual terms of one micro-batch need: the frozen VAE decoder, the LPIPS + Gram network, the
    latent scaling factor and the batch's training images (uint8 [B, 3, H, W], on the CPU)."""

    vae: torch.nn.Module
    net: torch.nn.Module
    scaling: float
    target_pixels: torch.Tensor


def style_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_states: torch.Tensor, g: torch.Generator,
               weights: StyleLossWeights, perceptual: PerceptualInputs | None = None) -> torch.Tensor:
    """The style-LoRA loss of a micro-batch of scaled latents [B, 4, h, w]: weights.mse * mean denoising MSE
    (min-SNR weighted), plus (weights.lpips * sum LPIPS + weights.style * sum Gram) / B over the samples drawn at
    t < weights.perceptual_max_timestep, when `perceptual` is given. A scalar."""
    mse, noisy, pred, t = denoising_loss(unet, noise_scheduler, latents, encoder_states, g, weights.noise_offset,
                                         weights.min_snr_gamma)
    loss = weights.mse * mse.mean()
    if perceptual is None:
        return loss
    low_noise = t < weights.perceptual_max_timestep
    if not low_noise.any():
        return loss
    lp, gram = perceptual_terms(noise_scheduler, perceptual.vae, perceptual.net, noisy[low_noise], pred[low_noise],
                                t[low_noise], perceptual.target_pixels[low_noise.cpu()].to(latents.device),
                                perceptual.scaling)
    return loss + (weights.lpips * lp.sum() + weights.style * gram.sum()) / len(latents)


def prior_preservation_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_states: torch.Tensor,
                            g: torch.Generator, instances: int, prior_weight: float) -> torch.Tensor:
    """DreamBooth's loss (Ruiz et al. 2023) of a batch whose first `instances` samples are instance images and the
    rest class images: mean MSE(instance) + prior_weight * mean MSE(class). A scalar."""
    mse, *_ = denoising_loss(unet, noise_scheduler, latents, encoder_states, g)
    return mse[:instances].mean() + prior_weight * mse[instances:].mean()
