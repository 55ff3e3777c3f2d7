"""The training objectives against the formulas written out here (Ho et al. 2020; Salimans & Ho 2022 for
v-prediction; Hang et al. 2023 for min-SNR-gamma; Guttenberg 2023 for offset noise), with a stand-in UNet and VAE
whose outputs are known, so every term of the loss is checked, not only that it runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from stylora.trainer.losses import (
    PerceptualInputs,
    StyleLossWeights,
    denoising_loss,
    perceptual_net,
    perceptual_terms,
    prior_preservation_loss,
    style_loss,
)


class AffineUNet(torch.nn.Module):
    """pred = 0.5 z_t + mean(text states) + t / 1000: depends on every input the real UNet gets."""

    def forward(self, noisy, t, states, return_dict=False):
        return (0.5 * noisy + states.mean() + t.view(-1, 1, 1, 1).float() / 1000,)


def _reference(z0, states, seed, scheduler, offset, gamma):
    """The same draws from the same generator, then the loss written out."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=g)
    if offset:
        noise = noise + offset * torch.randn((*z0.shape[:2], 1, 1), generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = abar.sqrt() * noise - (1 - abar).sqrt() * z0 if v_pred else noise
    pred = 0.5 * noisy + states.mean() + t.view(-1, 1, 1, 1).float() / 1000
    loss = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma:
        snr = (abar / (1 - abar)).flatten()
        loss = loss * torch.clamp(snr, max=gamma) / (snr + 1 if v_pred else snr)
    return loss, noisy, t


@pytest.mark.parametrize(("prediction", "offset", "gamma"),
                         [("epsilon", 0.0, None), ("epsilon", 0.1, 5.0), ("v_prediction", 0.05, 5.0),
                          ("v_prediction", 0.0, None)])
def test_denoising_loss_equals_the_written_out_objective(prediction, offset, gamma):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction)
    gen = torch.Generator().manual_seed(11)
    z0, states = torch.randn(3, 4, 6, 5, generator=gen), torch.randn(3, 7, 8, generator=gen)
    # The defaults are no offset noise and no min-SNR weighting: the first case calls without them.
    options = {} if (offset, gamma) == (0.0, None) else {"noise_offset": offset, "min_snr_gamma": gamma}
    loss, noisy, pred, t = denoising_loss(AffineUNet(), scheduler, z0, states, torch.Generator().manual_seed(4),
                                          **options)
    ref_loss, ref_noisy, ref_t = _reference(z0, states, 4, scheduler, offset, gamma)
    assert torch.equal(t, ref_t) and loss.shape == (3,)
    torch.testing.assert_close(noisy, ref_noisy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)


class TanhVAE:
    """decode(z) = tanh(z) (values in -1..1, as the SD VAE's); remembers its input."""

    def decode(self, z):
        self.seen = z
        return SimpleNamespace(sample=torch.tanh(z))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_perceptual_terms_decode_the_x0_prediction(prediction):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction)
    gen = torch.Generator().manual_seed(5)
    noisy, pred = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    t = torch.tensor([10, 500])
    target = torch.randint(0, 256, (2, 3, 3, 3), generator=gen, dtype=torch.uint8)
    seen = {}

    def perceptual(image, pixels):  # returns the two "losses" it was given, to compare them
        seen["image"], seen["pixels"] = image, pixels
        return image.mean(dim=(1, 2, 3)), pixels.mean(dim=(1, 2, 3))

    vae = TanhVAE()
    a, b = perceptual_terms(scheduler, vae, perceptual, noisy, pred, t, target, scaling=0.18215)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = ((noisy - (1 - abar).sqrt() * pred) / abar.sqrt() if prediction == "epsilon"
          else abar.sqrt() * noisy - (1 - abar).sqrt() * pred)
    torch.testing.assert_close(vae.seen, x0 / 0.18215, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["image"], (torch.tanh(x0 / 0.18215) / 2 + 0.5).clamp(0, 1), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(seen["pixels"], target.float() / 255)
    torch.testing.assert_close(a, seen["image"].mean(dim=(1, 2, 3)))
    torch.testing.assert_close(b, (target.float() / 255).mean(dim=(1, 2, 3)))


def test_perceptual_net_uses_the_given_one_builds_one_or_names_missing_weights(monkeypatch):
    from stylora.eval.weights import WeightsUnavailable
    from stylora.trainer import losses

    given, built = torch.nn.Identity(), torch.nn.Identity()
    assert perceptual_net(given) is given
    monkeypatch.setattr(losses, "PerceptualLoss", lambda: built)
    assert perceptual_net(None) is built

    def missing():
        raise WeightsUnavailable("alexnet-owt-7be5be79.pth missing")

    monkeypatch.setattr(losses, "PerceptualLoss", missing)
    with pytest.raises(ValueError, match="^lpips_weight/style_weight need pretrained feature networks: alexnet-owt"):
        perceptual_net(None)


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_prior_preservation_loss_is_the_instance_mean_plus_the_weighted_class_mean():
    scheduler = _scheduler()
    gen = torch.Generator().manual_seed(8)
    z0, states = torch.randn(5, 4, 3, 3, generator=gen), torch.randn(5, 7, 8, generator=gen)
    loss = prior_preservation_loss(AffineUNet(), scheduler, z0, states, torch.Generator().manual_seed(2),
                                   instances=2, prior_weight=0.3)
    per_sample, _, _ = _reference(z0, states, 2, scheduler, 0.0, None)
    expected = per_sample[:2].mean() + 0.3 * per_sample[2:].mean()
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("max_t", [0, 1000, 600])
def test_style_loss_adds_the_weighted_perceptual_terms_of_the_low_noise_samples_only(max_t):
    """style_loss = mse * mean(denoising) + (lpips * sum LPIPS + style * sum Gram) / B over the samples with
    t < perceptual_max_timestep, each term from its written-out formula; the perceptual pair sees only those."""
    scheduler = _scheduler()
    gen = torch.Generator().manual_seed(9)
    z0, states = torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, 7, 8, generator=gen)
    pixels = torch.randint(0, 256, (4, 3, 3, 3), generator=gen, dtype=torch.uint8)
    seen = {}

    def perceptual(image, target):  # "LPIPS" = mean image, "Gram" = mean target: known per sample
        seen["n"] = len(image)
        return image.mean(dim=(1, 2, 3)), target.mean(dim=(1, 2, 3))

    weights = StyleLossWeights(mse=0.7, lpips=2.0, style=3.0, perceptual_max_timestep=max_t, noise_offset=0.05,
                               min_snr_gamma=5.0)
    inputs = PerceptualInputs(TanhVAE(), perceptual, 0.18215, pixels)
    loss = style_loss(AffineUNet(), scheduler, z0, states, torch.Generator().manual_seed(6), weights, inputs)

    per_sample, noisy, t = _reference(z0, states, 6, scheduler, 0.05, 5.0)
    expected = 0.7 * per_sample.mean()
    low = t < max_t
    if low.any():
        pred = 0.5 * noisy + states.mean() + t.view(-1, 1, 1, 1).float() / 1000
        abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (noisy - (1 - abar).sqrt() * pred) / abar.sqrt()
        image = (torch.tanh(x0 / 0.18215) / 2 + 0.5).clamp(0, 1)
        lp, gram = image.mean(dim=(1, 2, 3))[low], (pixels.float() / 255).mean(dim=(1, 2, 3))[low]
        expected = expected + (2.0 * lp.sum() + 3.0 * gram.sum()) / 4
        assert seen["n"] == int(low.sum())
    else:
        assert "n" not in seen
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    without = style_loss(AffineUNet(), scheduler, z0, states, torch.Generator().manual_seed(6), weights)
    torch.testing.assert_close(without, 0.7 * per_sample.mean(), rtol=1e-5, atol=1e-7)
    assert not StyleLossWeights().perceptual and StyleLossWeights(lpips=0.1).perceptual
    assert StyleLossWeights(style=0.1).perceptual


def test_the_perceptual_gate_leaves_out_a_sample_drawn_at_exactly_perceptual_max_timestep():
    """t < perceptual_max_timestep, strictly: with 10 timesteps and 12 samples the draw holds samples at, below and
    above the boundary (t = 4); those at t = 4 get no perceptual term."""
    scheduler = DDPMScheduler(num_train_timesteps=10, beta_schedule="linear", beta_start=0.01, beta_end=0.2)
    gen = torch.Generator().manual_seed(3)
    z0, states = torch.randn(12, 4, 2, 2, generator=gen), torch.randn(12, 7, 8, generator=gen)
    pixels = torch.randint(0, 256, (12, 3, 2, 2), generator=gen, dtype=torch.uint8)
    seen = {}

    def perceptual(image, target):  # "LPIPS" 1 and "Gram" 2 per sample: the sum counts the samples let through
        seen["pixels"] = target
        return torch.ones(len(image)), torch.full((len(image),), 2.0)

    weights = StyleLossWeights(mse=0.0, lpips=1.0, style=1.0, perceptual_max_timestep=4)
    loss = style_loss(AffineUNet(), scheduler, z0, states, torch.Generator().manual_seed(0), weights,
                      PerceptualInputs(TanhVAE(), perceptual, 0.18215, pixels))
    _, _, t = _reference(z0, states, 0, scheduler, 0.0, None)
    below, at = t < 4, t == 4
    assert below.any() and at.any() and (t > 4).any()  # the draw covers the boundary
    # (1 + 2) per sample below the boundary, over the batch of 12.
    torch.testing.assert_close(loss, torch.tensor(3.0 * int(below.sum()) / 12))
    torch.testing.assert_close(seen["pixels"], pixels[below].float() / 255)


def test_decoded_images_are_clamped_to_0_1_before_the_feature_networks():
    """A decoder output beyond [-1, 1] (the SD VAE's can be) maps to 0 and 1, not below or above."""

    class LinearVAE:  # decode(z) = 3 z: values far outside [-1, 1]
        def decode(self, z):
            return SimpleNamespace(sample=3 * z)

    scheduler = _scheduler()
    noisy = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0]).view(1, 1, 1, 5).expand(1, 4, 1, 5).contiguous()
    pred = torch.zeros_like(noisy)
    t = torch.tensor([0])
    seen = {}

    def perceptual(image, target):
        seen["image"] = image
        return image.sum(dim=(1, 2, 3)), target.sum(dim=(1, 2, 3))

    perceptual_terms(scheduler, LinearVAE(), perceptual, noisy, pred, t, torch.zeros(1, 3, 1, 5, dtype=torch.uint8),
                     scaling=1.0)
    # eps prediction 0: x0 = z_t / sqrt(abar_0); image = 3 x0 / 2 + 0.5, clamped.
    abar = float(scheduler.alphas_cumprod[0])
    x0 = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0]) / abar ** 0.5
    expected = (1.5 * x0 + 0.5).clamp(0, 1)
    assert expected[0] == 0 and expected[-1] == 1 and 0 < expected[1] < expected[3] < 1
    torch.testing.assert_close(seen["image"][0, 0, 0], expected)


def test_style_loss_weights_defaults_and_immutability():
    """The documented defaults (mse alone, perceptual terms off below t = 200, no offset, no min-SNR), and frozen:
    a recipe's weights cannot change mid-run, and they hash (usable as a cache key)."""
    import dataclasses

    w = StyleLossWeights()
    assert (w.mse, w.lpips, w.style, w.perceptual_max_timestep, w.noise_offset, w.min_snr_gamma) == \
        (1.0, 0.0, 0.0, 200, 0.0, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.mse = 2.0  # type: ignore[misc]
    assert hash(w) == hash(StyleLossWeights())
    assert StyleLossWeights(lpips=0.5).perceptual and StyleLossWeights(style=0.5).perceptual
