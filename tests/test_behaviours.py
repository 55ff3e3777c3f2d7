"""Behaviours that nothing else pins: each test here fails when the behaviour it names is broken.

Tiny models built from configs, random feature-network weights, stand-ins for ComfyUI's objects; no downloads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, make_style_folder
from fake_host import FakeCLIP, FakeComfy
from stylora.core.lora_file import DTYPES, kohya_modules, kohya_name, peft_to_kohya, read_lora, save_lora
from stylora.eval import backbones
from stylora.eval.metrics import LPIPS, ssim
from stylora.eval.weights import ALEXNET, FID_INCEPTION, LPIPS_LINEAR, VGG19
from stylora.nodes.mask import MaskedStyleApply, feather_mask, fit_mask
from stylora.nodes.metrics import StyleMetrics
from stylora.nodes.style_lora import LoadStyleLoRA
from stylora.trainer import losses as training_losses
from stylora.trainer.config import DreamBoothConfig, LoraTrainConfig
from stylora.trainer.dreambooth import train_dreambooth
from stylora.trainer.lora import train_lora

# --- 1. LoadStyleLoRA: a blend patches each style at strength x its normalised weight -------------------------


def test_blend_patches_each_style_at_strength_times_its_normalised_weight(tmp_path, monkeypatch):
    files = {}
    for name in ("a", "b", "c"):
        state = {"lora_unet_x.lora_down.weight": torch.zeros(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 2),
                 "lora_unet_x.alpha": torch.tensor(2.0)}
        files[name] = str(save_lora(tmp_path / f"{name}.safetensors", state, {"stylora.trigger": name}))
    comfy = FakeComfy(files).install(monkeypatch)
    model, clip = comfy.model(), FakeCLIP()
    _, _, info, _ = LoadStyleLoRA().load(model, clip, "a", 0.8, style_2="b", weight_2=3.0, style_3="c", weight_3=0.0)
    # weights 1 and 3 normalise to 0.25 and 0.75; a weight of 0 drops the style
    assert [s for _, s_model, s_clip in comfy.loaded for s in (s_model, s_clip)] == pytest.approx([0.2, 0.2, 0.6, 0.6])
    assert [s["weight"] for s in info["styles"]] == [0.25, 0.75] and info["trigger"] == "a, b"
    comfy.loaded.clear()
    LoadStyleLoRA().load(model, clip, "a", 0.5)
    assert [s for _, s, _ in comfy.loaded] == [0.5]  # a single style: its weight normalises to 1


# --- 2, 3. MaskedStyleApply: the composite uses the feathered weights; the noise mask's polarity -------------


def _mask_inputs():
    gen = torch.Generator().manual_seed(3)
    content, styled = torch.rand(1, 48, 64, 3, generator=gen), torch.rand(1, 48, 64, 3, generator=gen)
    mask = torch.zeros(1, 48, 64)
    mask[:, 8:40, 16:48] = 1.0
    return content, styled, mask


def test_masked_composite_blends_by_the_feathered_weights_not_the_hard_mask():
    content, styled, mask = _mask_inputs()
    image, _, weights = MaskedStyleApply().apply(content, mask, 6, False, styled=styled)
    expected_w = feather_mask(fit_mask(mask, 48, 64), 6)
    torch.testing.assert_close(weights, expected_w, rtol=0, atol=0)
    seam = (expected_w > 0) & (expected_w < 1)
    assert seam.sum() > 100  # a real seam inside the mask's edge
    w = expected_w[..., None]
    torch.testing.assert_close(image[seam], (content + w * (styled - content))[seam], rtol=1e-6, atol=1e-6)
    # on the seam the composite is neither image: a hard-mask composite would be `styled` there
    assert ((image[seam] - styled[seam]).abs().amax(-1) > 1e-3).float().mean() > 0.9
    assert ((image[seam] - content[seam]).abs().amax(-1) > 1e-3).float().mean() > 0.5


def test_latent_noise_mask_is_one_where_the_sampler_repaints_and_invert_flips_it():
    content, _, mask = _mask_inputs()
    latent = {"samples": torch.zeros(1, 4, 6, 8)}
    inside, outside = (slice(None), 0, slice(12, 36), slice(20, 44)), (slice(None), 0, slice(0, 4), slice(0, 8))
    _, masked, _ = MaskedStyleApply().apply(content, mask, 6, False, latent=latent)
    noise_mask = masked["noise_mask"]
    assert noise_mask.shape == (1, 1, 48, 64)
    assert (noise_mask[inside] == 1).all() and (noise_mask[outside] == 0).all()
    _, flipped, _ = MaskedStyleApply().apply(content, mask, 6, True, latent=latent)
    assert (flipped["noise_mask"][inside] == 0).all() and (flipped["noise_mask"][outside] == 1).all()


# --- 4. A written kohya file reproduces the trained adapter -----------------------------------------------------


@pytest.mark.parametrize("rank,alpha", [(4, 4), (4, 1), (2, 8)])
def test_kohya_file_reproduces_the_adapters_weight_delta(tmp_path, rank, alpha):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(TINY_CONFIG / "unet")))
    unet.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, p in unet.named_parameters():  # trained adapters have a non-zero B (peft initialises it to 0)
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    # The delta of each adapted layer from its forward pass: (layer(I) - base_layer(I))^T, [out, in].
    deltas = {}
    with torch.no_grad():
        for path, module in unet.named_modules():
            if isinstance(module, LoraLayer):
                eye = torch.eye(module.base_layer.in_features)
                deltas[kohya_name(path)] = (module(eye) - module.base_layer(eye)).T
    assert len(deltas) > 4
    out = save_lora(tmp_path / "style.safetensors",
                    peft_to_kohya(get_peft_model_state_dict(unet), alpha, DTYPES["fp32"]), {})
    modules = kohya_modules(read_lora(out)[0])
    assert modules.keys() == deltas.keys()
    for name, m in modules.items():
        assert m["down"].shape[0] == rank
        from_file = m["up"] @ m["down"] * (m["alpha"].item() / m["down"].shape[0])
        torch.testing.assert_close(from_file, deltas[name], rtol=1e-4, atol=1e-5, msg=name)


# --- 5. DreamBooth: the prior-preservation term, weighted by prior_loss_weight ----------------------------------


def test_dreambooth_loss_adds_the_prior_term_times_its_weight(tiny_model, tmp_path):
    instances, classes = make_style_folder(tmp_path / "inst"), make_style_folder(tmp_path / "cls")

    def first_loss(weight: float) -> float:
        cfg = DreamBoothConfig(data=str(instances), class_data=str(classes), base_model=str(tiny_model["diffusers"]),
                               output=str(tmp_path / f"db-{weight}.safetensors"), resolution=64, steps=1, batch_size=2,
                               num_class_images=2, min_images=1, checkpoint_every=0, lora=True, seed=0,
                               gradient_checkpointing=False, prior_loss_weight=weight)
        return train_dreambooth(cfg, progress=False).losses[0]

    # Same seed, same first batch and draws: the first step's loss is instance + weight * prior.
    l0, l1, l3 = first_loss(0.0), first_loss(1.0), first_loss(3.0)
    prior = l1 - l0
    assert prior > 1e-3
    assert l3 - l0 == pytest.approx(3 * prior, rel=1e-5)


# --- 6, 7. Perceptual terms in the training loss -----------------------------------------------------------------


class _ConstantPerceptual(torch.nn.Module):
    """Stands in for PerceptualLoss: LPIPS 0.25 and Gram 0.125 per image (no gradient), records batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, pred: torch.Tensor, target: torch.Tensor):
        self.calls.append(len(pred))
        zero = pred.mean(dim=(1, 2, 3)) * 0
        return zero + 0.25, zero + 0.125


def _run_losses(cfg: LoraTrainConfig, tmp_path, name: str, perceptual=None, **changes) -> list[float]:
    cfg = LoraTrainConfig(**{**cfg.to_dict(), "target_modules": cfg.target_modules,
                             "output": str(tmp_path / f"{name}.safetensors"), **changes})
    return train_lora(cfg, progress=False, perceptual=perceptual).losses


def test_perceptual_terms_enter_the_loss_with_their_weights_below_the_timestep_gate(tiny_model, style_folder,
                                                                                    tmp_path, monkeypatch):
    drawn: list[list[int]] = []  # the timesteps of each step's batch
    real_loss = training_losses.denoising_loss  # style_loss draws its timesteps here

    def recording_loss(*args, **kwargs):
        loss, noisy, pred, t = real_loss(*args, **kwargs)
        drawn.append(t.tolist())
        return loss, noisy, pred, t

    monkeypatch.setattr(training_losses, "denoising_loss", recording_loss)
    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "x.safetensors"),
                          base_model=str(tiny_model["diffusers"]), resolution=64, steps=4, batch_size=6, min_images=1,
                          checkpoint_every=0, warmup_steps=0, seed=0)
    plain = _run_losses(cfg, tmp_path, "plain")
    drawn.clear()
    stub = _ConstantPerceptual()
    gated = _run_losses(cfg, tmp_path, "gated", stub, lpips_weight=0.5, style_weight=2.0, perceptual_max_timestep=500)
    low = [sum(t < 500 for t in ts) for ts in drawn]
    assert any(0 < k < 6 for k in low), drawn  # the gate splits a batch
    assert stub.calls == [k for k in low if k]  # the perceptual net sees exactly the low-noise samples
    # The constant terms add (0.5 * 0.25 + 2.0 * 0.125) per low-noise sample, averaged over the batch of 6; their
    # gradient is 0, so the runs' weights, and MSE terms, stay the same.
    for p, g, k in zip(plain, gated, low):
        assert g - p == pytest.approx((0.5 * 0.25 + 2.0 * 0.125) * k / 6, abs=2e-6)


def test_gram_style_term_is_positive_for_different_images_and_scales_with_its_weight(tiny_model, style_folder,
                                                                                      tmp_path):
    from stylora.eval.metrics import PerceptualLoss

    perceptual = PerceptualLoss(pretrained=False)
    a, b = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).chunk(2)
    assert perceptual(a, b)[1].item() > 0 and perceptual(a, a)[1].item() == 0
    cfg = LoraTrainConfig(data=str(style_folder), output=str(tmp_path / "x.safetensors"),
                          base_model=str(tiny_model["diffusers"]), resolution=64, steps=1, batch_size=2, min_images=1,
                          checkpoint_every=0, perceptual_max_timestep=1000, seed=0)
    base = _run_losses(cfg, tmp_path, "w0")[0]
    one = _run_losses(cfg, tmp_path, "w1", perceptual, style_weight=1e3)[0]
    two = _run_losses(cfg, tmp_path, "w2", perceptual, style_weight=2e3)[0]
    assert one - base > 1e-3
    assert two - base == pytest.approx(2 * (one - base), rel=1e-4)


# --- 8. LPIPS: unit-length feature channels before the linear heads ---------------------------------------------


def test_lpips_normalises_each_feature_vector_to_unit_length_before_the_linear_heads():
    net = LPIPS("alex", pretrained=False)
    taps: list[torch.Tensor] = []
    hooks = [net.features[i].register_forward_hook(lambda m, i, o: taps.append(o.clone()))
             for i in LPIPS.TAPS["alex"]]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    value = net(x, y)
    for h in hooks:
        h.remove()
    fx, fy = taps[:5], taps[5:]
    by_hand = torch.zeros(2)
    for lin, a, b in zip(net.lins, fx, fy):
        a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length across channels, per pixel
        b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        w = lin.weight.view(1, -1, 1, 1)
        by_hand += ((a - b) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    torch.testing.assert_close(value, by_hand, rtol=1e-5, atol=1e-7)
    # the normalisation matters for these features: the distance of the raw features is far from LPIPS
    raw = sum(((lin.weight.view(1, -1, 1, 1) * (a - b) ** 2).sum(1).mean(dim=(1, 2)) for lin, a, b in
               zip(net.lins, fx, fy)))
    assert not torch.allclose(raw, by_hand, rtol=0.1)


# --- 9, 10. StyleMetrics: styled vs content, its own networks, the style-set feature cache ----------------------


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """Random-weight files under the published names, as the weights lookup finds them."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("weights")

    def save(spec, state):
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / (spec.name.rsplit(".", 1)[0]
                                                                              + ".safetensors")))

    def features(module):
        return {f"features.{k}": v for k, v in backbones.random_init(module, seed=7).state_dict().items()}

    save(ALEXNET, features(backbones.alexnet_features()))
    save(VGG19, features(backbones.vgg_features(backbones.VGG19_LAYOUT)))
    save(FID_INCEPTION, backbones.random_init(backbones.FIDInceptionV3(), seed=7).state_dict())
    g = torch.Generator().manual_seed(7)
    save(LPIPS_LINEAR["alex"], {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) / c
                                for i, c in enumerate(LPIPS.CHANNELS["alex"])})
    return folder


@pytest.fixture
def own_weights(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLORA_WEIGHTS_DIR", str(weights_dir))
    monkeypatch.setenv("STYLORA_OFFLINE", "1")
    monkeypatch.setenv("STYLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("torch.hub.get_dir", lambda: str(tmp_path / "hub"))
    return weights_dir


def _images(seed: int, n: int = 2):
    gen = torch.Generator().manual_seed(seed)
    content = torch.rand(n, 48, 48, 3, generator=gen)
    styled = (0.6 * content + 0.4 * torch.rand(n, 48, 48, 3, generator=gen)).clamp(0, 1)
    return content, styled


def test_style_metrics_loads_its_own_networks_and_compares_styled_with_content(own_weights, tmp_path):
    node = StyleMetrics()  # nothing injected: the networks come from STYLORA_WEIGHTS_DIR
    content, styled = _images(0)
    style = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    scores = json.loads(node.measure(content, styled, style=style)["result"][1])
    assert {"ssim", "lpips", "content", "gram"} <= scores["metrics"].keys(), scores["unavailable"]
    assert set(node._nets) == {"lpips", "vgg", "inception"}
    assert scores["per_image"]["ssim"] == pytest.approx(ssim(styled, content).tolist(), rel=1e-6)
    assert max(scores["per_image"]["ssim"]) < 0.95
    assert scores["per_image"]["lpips"] == pytest.approx(LPIPS("alex")(styled, content).tolist(), rel=1e-5)
    assert min(scores["per_image"]["lpips"]) > 0 and min(scores["per_image"]["content"]) > 0


def test_style_metrics_second_run_reads_the_style_set_features_from_the_cache(own_weights, tmp_path):
    style_folder = make_style_folder(tmp_path / "style")
    node = StyleMetrics()
    content, styled = _images(2)
    first = json.loads(node.measure(content, styled, style_folder=str(style_folder))["result"][1])
    assert np.isfinite(first["metrics"]["fid"]) and node._nets["inception"].published
    seen: list[int] = []  # images through the Inception network, per call
    node._nets["inception"].net.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    second = json.loads(node.measure(content, styled, style_folder=str(style_folder))["result"][1])
    assert sum(seen) == 2  # the styled images only; the six style images' features come from the cache
    assert second["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"])
    for f in (tmp_path / "cache" / "features").iterdir():  # without the cache the style set is computed again
        f.unlink()
    seen.clear()
    node.measure(content, styled, style_folder=str(style_folder))
    assert sum(seen) == 2 + 6
