"""StyleFromImage (StyleID injection): the tensor functions, the node's declaration and its patching of a
ModelPatcher stand-in, without ComfyUI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from stylora import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from stylora.nodes.strength import StyleStrength
from stylora.nodes.style_image import (
    INJECTION_ATTACHMENT,
    StyleFromImage,
    adain,
    attention,
    blend_queries,
    fit_to,
    parse_blocks,
    styled_attention,
)


def _qkv(seed: int, b: int = 2, t: int = 12, width: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, width, generator=gen) for _ in range(3))


# --- tensor functions -----------------------------------------------------------------------------------------

def test_style_keys_equal_to_content_with_gamma_1_and_t_1_is_plain_self_attention():
    q, k, v = _qkv(0)
    heads, d = 4, 4
    out = styled_attention(q, torch.randn_like(q), k, v, gamma=1.0, temperature=1.0, heads=heads)
    # torch's SDPA on [B, heads, T, d], and ComfyUI's attention_basic formula softmax(q k^T d^-0.5) v.
    split = [t.reshape(2, 12, heads, d).transpose(1, 2) for t in (q, k, v)]
    sdpa = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(2, 12, 16)
    weights = (split[0] @ split[1].transpose(-1, -2) * d ** -0.5).softmax(-1)
    basic = (weights @ split[2]).transpose(1, 2).reshape(2, 12, 16)
    assert torch.allclose(out, sdpa, atol=1e-6) and torch.allclose(out, basic, atol=1e-5)
    assert out[0, 0, :3].tolist() == pytest.approx([0.29234, 0.00947, 0.37612], abs=1e-4)  # pinned
    # gamma 0 and q_stylized = q: also plain; the style's keys and values change the result.
    assert torch.allclose(styled_attention(torch.zeros_like(q), q, k, v, 0.0, 1.0, heads), sdpa, atol=1e-6)
    _, k2, v2 = _qkv(1)
    assert not torch.allclose(styled_attention(q, q, k2, v2, 1.0, 1.0, heads), sdpa, atol=1e-3)


def test_query_blend_weights():
    qc, qs = torch.full((1, 2, 4), 2.0), torch.full((1, 2, 4), -2.0)
    assert torch.equal(blend_queries(qc, qs, 0.75), torch.full((1, 2, 4), 1.0))  # 0.75*2 + 0.25*(-2)
    assert torch.equal(blend_queries(qc, qs, 1.0), qc) and torch.equal(blend_queries(qc, qs, 0.0), qs)
    # The blend enters the attention: gamma 0.75 equals attention with the blended query.
    q, k, v = _qkv(2)
    q2 = torch.randn_like(q)
    assert torch.allclose(styled_attention(q, q2, k, v, 0.75, 1.0, 4), attention(0.75 * q + 0.25 * q2, k, v, 4))


def test_temperature_sharpens_attention():
    q, k, _ = _qkv(3, b=1, t=10, width=10)
    v = torch.eye(10)[None]  # one head, value = identity: the output rows are the attention weights
    probs = {temp: attention(q, k, v, 1, temperature=temp) for temp in (1.0, 1.5)}
    assert torch.allclose(probs[1.5].sum(-1), torch.ones(1, 10), atol=1e-5)
    assert torch.allclose(probs[1.0], (q @ k.transpose(1, 2) / math.sqrt(10)).softmax(-1), atol=1e-5)
    assert torch.allclose(probs[1.5], (1.5 * q @ k.transpose(1, 2) / math.sqrt(10)).softmax(-1), atol=1e-5)
    entropy = {t: float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()) for t, p in probs.items()}
    assert entropy[1.5] < entropy[1.0] - 0.05, entropy


def test_adain_gives_the_style_channel_statistics():
    gen = torch.Generator().manual_seed(4)
    content = torch.randn(2, 4, 9, 13, generator=gen) * 3 + 1
    style = torch.randn(1, 4, 5, 7, generator=gen) * torch.tensor([0.5, 2, 1, 4]).view(1, 4, 1, 1) - 2
    out = adain(content, style)
    assert out.shape == content.shape
    assert torch.allclose(out.mean((2, 3)), style.mean((2, 3)).expand(2, 4), atol=1e-5)
    assert torch.allclose(out.std((2, 3), unbiased=False), style.std((2, 3), unbiased=False).expand(2, 4), atol=1e-4)
    # The content's layout survives: per channel, out is an increasing affine map of the content.
    assert torch.corrcoef(torch.stack([out[0, 0].flatten(), content[0, 0].flatten()]))[0, 1] > 0.999
    with pytest.raises(ValueError, match="equal C"):
        adain(content, style[:, :3])


def test_blocks_and_painting_fit():
    assert parse_blocks("6-11") == (6, 7, 8, 9, 10, 11) and parse_blocks("3, 9,6-7") == (3, 6, 7, 9)
    for bad in ("0-2", "12", "x", ""):
        with pytest.raises(ValueError, match="blocks"):
            parse_blocks(bad)
    tall = torch.rand(1, 100, 40, 3)
    out = fit_to(tall, 16, 24)  # landscape target: the middle 27 rows of the tall painting, resized
    assert out.shape == (1, 16, 24, 3) and 0 <= out.min() and out.max() <= 1


# --- the node on a ModelPatcher stand-in --------------------------------------------------------------------

def test_declaration_and_registration():
    assert NODE_CLASS_MAPPINGS["StyleFromImage"] is StyleFromImage
    assert NODE_DISPLAY_NAME_MAPPINGS["StyleFromImage"] == "Style From Image (Stylora)"
    assert StyleFromImage.CATEGORY == "Stylora" and StyleFromImage.DESCRIPTION
    inputs = StyleFromImage.INPUT_TYPES()
    assert list(inputs["required"]) == ["model", "style_image", "vae", "latent", "mode", "gamma", "temperature",
                                        "adain", "blocks"]
    assert inputs["required"]["mode"][0] == ["paper", "fast"] and inputs["required"]["mode"][1]["default"] == "paper"
    assert list(inputs["optional"]) == ["start_percent", "end_percent", "gamma_schedule"]
    assert inputs["required"]["gamma"][1]["default"] == 0.75 and inputs["required"]["temperature"][1]["default"] == 1.5
    assert inputs["required"]["blocks"][1]["default"] == "6-11"
    for group in inputs.values():
        for name, (_, options) in group.items():
            assert options.get("tooltip"), name
    assert len(StyleFromImage.RETURN_TYPES) == len(StyleFromImage.OUTPUT_TOOLTIPS) == 1


class _Model:
    """BaseModel stand-in: the latent scaling of SD1.5."""

    def process_latent_in(self, x):
        return x * 0.18215


class _Patcher:
    """The parts of ComfyUI's ModelPatcher the nodes use; clone() deep-copies model_options as ComfyUI's does."""

    def __init__(self):
        self.model, self.patches, self.attachments, self.wrappers = _Model(), {}, {}, {}
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = _Patcher()
        n.model, n.patches = self.model, {k: v[:] for k, v in self.patches.items()}
        n.model_options, n.attachments = copy.deepcopy(self.model_options), dict(self.attachments)
        n.wrappers = {t: {k: w[:] for k, w in ws.items()} for t, ws in self.wrappers.items()}
        return n

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def set_model_unet_function_wrapper(self, f):
        self.model_options["model_function_wrapper"] = f

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn1"] = {**to["patches_replace"].get("attn1", {}),
                                          (block_name, number, transformer_index): patch}
        self.model_options["transformer_options"] = to

    def get_attachment(self, key):
        return self.attachments.get(key)

    def set_attachments(self, key, value):
        self.attachments[key] = value

    def remove_attachments(self, key):
        self.attachments.pop(key, None)


def _fake_model() -> _Patcher:
    """The one place the tests make a ModelPatcher stand-in."""
    return _Patcher()


class _VAE:
    def encode(self, pixels):  # [S, H, W, 3] -> [S, 4, H/8, W/8]
        x = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([x, x[:, :1]], 1) * 4 - 2


class _UNet:
    """A one-block 'UNet' with ComfyUI's calling convention: self-attention of the latent's pixels through the
    ("output", 6, 0) attn1 replace patch when installed, the prompt added to the tokens."""

    def __init__(self):
        gen = torch.Generator().manual_seed(5)
        self.w = [torch.randn(4, 8, generator=gen) for _ in range(3)] + [torch.randn(8, 4, generator=gen)]
        self.seen: list[dict] = []

    def __call__(self, x, t, c_crossattn=None, transformer_options=None):
        n, ch, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2) + c_crossattn[:, :1, :4]
        q, k, v = (tokens @ m for m in self.w[:3])
        to = transformer_options or {}
        patch = to.get("patches_replace", {}).get("attn1", {}).get(("output", 6, 0))
        extra = {**{k_: v_ for k_, v_ in to.items() if k_ not in ("patches", "patches_replace")}, "n_heads": 2,
                 "block": ("output", 6), "block_index": 0}
        self.seen.append({"n": n, "context": c_crossattn[:, 0, 0].tolist(), "patched": patch is not None})
        o = patch(q, k, v, extra) if patch else attention(q, k, v, 2)
        eps = (o @ self.w[3]).transpose(1, 2).reshape(n, ch, h, w)
        return x - t.view(-1, 1, 1, 1) * eps


def _sample_step(patcher, unet, x, sigma=2.0, cond_or_uncond=(0, 1)):
    """What comfy.samplers.calc_cond_batch does for one batched cond+uncond step of content batch b."""
    b = x.shape[0]
    xin = torch.cat([x] * len(cond_or_uncond))
    context = torch.cat([torch.full((b, 3, 8), float(i + 1)) for i in cond_or_uncond])  # cond 1.0, uncond 2.0
    to = {**patcher.model_options["transformer_options"], "cond_or_uncond": list(cond_or_uncond),
          "sigmas": torch.tensor([sigma] * len(xin))}
    c = {"c_crossattn": context, "transformer_options": to}
    t = torch.full((len(xin),), sigma)
    wrapper = patcher.model_options.get("model_function_wrapper")
    if wrapper:
        return wrapper(unet, {"input": xin, "timestep": t, "c": c, "cond_or_uncond": list(cond_or_uncond)})
    return unet(xin, t, **c)


def _styled(painting_seed: int = 6, mode: str = "fast", **kw):
    gen = torch.Generator().manual_seed(painting_seed)
    base = _fake_model()
    latent = {"samples": torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(7))}
    painting = torch.rand(1, 64, 48, 3, generator=gen)
    (styled,) = StyleFromImage().apply(base, painting, _VAE(), latent, mode=mode, **kw)
    return base, styled, latent


def test_node_patches_a_clone_and_leaves_the_input_model_untouched():
    base, styled, latent = _styled()
    assert base.model_options == {"transformer_options": {}} and base.attachments == {}
    injection = styled.get_attachment(INJECTION_ATTACHMENT)
    assert styled.model_options["model_function_wrapper"] is injection
    assert sorted(styled.model_options["transformer_options"]["patches_replace"]["attn1"]) == [
        ("output", i, 0) for i in range(6, 12)]
    assert styled.wrappers == {"sampler_sample": {INJECTION_ATTACHMENT: [injection.sample]}}
    assert base.wrappers == {}
    assert injection.style.shape == (1, 4, 5, 7) and injection.gamma == 0.75 and injection.temperature == 1.5
    assert torch.allclose(injection.content, latent["samples"] * 0.18215)  # model space, as the sampler sees it
    # Downstream clones share the injection (its tensors are not copied per clone).
    assert styled.clone().model_options["model_function_wrapper"] is injection
    with pytest.raises(ValueError, match="already have an attention patch"):
        StyleFromImage().apply(styled, torch.rand(1, 8, 8, 3), _VAE(), latent)
    with pytest.raises(ValueError, match="gamma must be in 0..1, got 1.5"):
        StyleFromImage().apply(base, torch.rand(1, 8, 8, 3), _VAE(), latent, gamma=1.5)


def test_injection_under_cfg_with_a_batch_of_two_and_style_strength():
    base, styled, _ = _styled()
    unet = _UNet()
    x = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(8))
    plain = _sample_step(base, unet, x)
    out = _sample_step(styled, unet, x)
    # One UNet pass per step: 4 rows (2 photos x cond/uncond) + 2 photo references + 1 painting, all patched;
    # the reference rows take the negative prompt's conditioning (2.0).
    assert unet.seen[-1] == {"n": 7, "context": [1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0], "patched": True}
    assert out.shape == plain.shape == (4, 4, 5, 7) and (out - plain).abs().mean() > 1e-2
    # A different painting, a different result, through the attention alone too (AdaIN off).
    _, other, _ = _styled(painting_seed=9)
    assert (_sample_step(other, unet, x) - out).abs().mean() > 1e-3
    kv_only = [_sample_step(_styled(painting_seed=seed, adain=0.0)[1], unet, x) for seed in (6, 9)]
    assert (kv_only[0] - kv_only[1]).abs().mean() > 1e-3
    # Style Strength 0: the injection is gone, the step is the input model's bit for bit, and denoise 0.
    zero, denoise, _ = StyleStrength().apply(styled, 0.0)[:3]
    assert denoise == 0.0 and zero.get_attachment(INJECTION_ATTACHMENT) is None
    assert "model_function_wrapper" not in zero.model_options and zero.wrappers == {"sampler_sample": {}}
    assert torch.equal(_sample_step(zero, unet, x), plain)
    # Low strength: a quarter of the way (lora ramp 0.5 at s = 0.25) between plain and full injection.
    half, _, _ = StyleStrength().apply(styled, 0.25)[:3]
    assert half.get_attachment(INJECTION_ATTACHMENT).strength == 0.5
    assert styled.get_attachment(INJECTION_ATTACHMENT).strength == 1.0  # the input is untouched
    mid = _sample_step(half, unet, x)
    assert 0 < (mid - plain).abs().mean() < (out - plain).abs().mean()
    # Outside start/end the step is plain too; the stand-in has no model_sampling, so use the injection directly.
    import dataclasses

    late = _fake_model()
    late.model_options = copy.deepcopy(styled.model_options)
    late.model_options["model_function_wrapper"] = dataclasses.replace(
        styled.get_attachment(INJECTION_ATTACHMENT), sigma_start=1.0)
    assert torch.allclose(_sample_step(late, unet, x, sigma=2.0), plain, atol=1e-6)


def test_adain_in_the_wrapper_moves_the_latent_statistics():
    _, styled, _ = _styled(adain=1.0)
    _, no_adain, _ = _styled(adain=0.0)
    unet = _UNet()
    x = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(8))
    _sample_step(styled, unet, x, sigma=0.0, cond_or_uncond=(0,))
    _sample_step(no_adain, unet, x, sigma=0.0, cond_or_uncond=(0,))
    assert unet.seen[-1]["n"] == unet.seen[-2]["n"] == 4  # 1 row + 2 photo references + 1 painting
    injection = styled.get_attachment(INJECTION_ATTACHMENT)
    wrapped = []
    injection(lambda xx, t, **c: wrapped.append(xx) or xx, {
        "input": x, "timestep": torch.zeros(1), "cond_or_uncond": [0],
        "c": {"c_crossattn": torch.zeros(1, 3, 8), "transformer_options": {}}})
    seen = wrapped[0][:1]  # at sigma 0 the painting row is its clean latent: the row takes its statistics
    assert torch.allclose(seen.mean((2, 3)), injection.style.mean((2, 3)), atol=1e-4)


def test_a_lora_style_and_a_painting_style_in_one_model_both_follow_the_strength_knob():
    from stylora.nodes.strength import STYLE_ATTACHMENT

    # A model that Load Style LoRA styled (one patch, recorded as the style's) and then Style From Image.
    base = _fake_model()
    adapter = object()
    base.patches = {"diffusion_model.x.weight": [(1.0, adapter, 1.0, None, None)]}
    base.set_attachments(STYLE_ATTACHMENT, (adapter,))
    latent = {"samples": torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(7))}
    (both,) = StyleFromImage().apply(base, torch.rand(1, 64, 48, 3, generator=torch.Generator().manual_seed(6)),
                                     _VAE(), latent)
    for s, scale in ((0.25, 0.5), (0.5, 1.0), (1.0, 1.0)):
        out, denoise, _ = StyleStrength().apply(both, s)[:3]
        assert out.patches["diffusion_model.x.weight"][0][0] == pytest.approx(scale)  # the LoRA's patch strength
        assert out.get_attachment(INJECTION_ATTACHMENT).strength == pytest.approx(scale)  # the injection's
        assert denoise == pytest.approx(s * 0.75)
    zero, denoise, _ = StyleStrength().apply(both, 0.0)[:3]
    assert zero.patches == {} and zero.get_attachment(INJECTION_ATTACHMENT) is None and denoise == 0.0
    assert "model_function_wrapper" not in zero.model_options
    assert both.patches["diffusion_model.x.weight"][0][0] == 1.0  # the input model untouched
