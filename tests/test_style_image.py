"""StyleFromImage (StyleID injection): the tensor functions, the node's declaration and its patching of a
ModelPatcher stand-in, without ComfyUI."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from fake_host import FakePatcher
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

pytestmark = pytest.mark.usefixtures("one_thread_and_an_empty_feature_cache")


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


class _Patcher(FakePatcher):
    """The one fake ModelPatcher (tests/fake_host.py) with SD1.5's noise schedule as its model_sampling."""

    def get_model_object(self, name):
        assert name == "model_sampling"
        return _Sampling()


class _Sampling:
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma for SD1.5's schedule: percent p is timestep (1 - p) * 999,
    its sigma interpolated in log sigma between the table's neighbours."""

    def percent_to_sigma(self, percent):
        if percent <= 0:
            return 999999999.9
        if percent >= 1:
            return 0.0
        t = (1 - percent) * 999.0
        lo, w = int(t), t - int(t)
        return math.exp((1 - w) * math.log(_sigma(lo)) + w * math.log(_sigma(min(lo + 1, 999))))


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


# --- the oracle: StyleID's algorithm written out plainly over a tiny diffusers UNet ---------------------------
#
# The oracle follows StyleID's reference procedure (Chung et al. 2024, DDIM in the VP parameterisation with
# timesteps and alphas_cumprod): DDIM inversion of the photo and the painting under an empty prompt, where each
# step evaluates the UNet at the next timestep on the latent of the level below; per timestep and injected block the
# photo's queries and the painting's keys/values are kept; sampling starts from the AdaIN of the two inverted latents
# (unbiased std + 1e-4, as StyleID) and each DDIM step injects: q~ = gamma q_photo + (1 - gamma) q, keys and values
# the painting's, logits times T. It shares no code with the node: its attention is written with einsum/softmax.
# The node's paper mode runs on the same UNet through ComfyUI's calling convention (model wrapper + attn1 replace
# patches), its DDIM steps in sigma space (x = x0 + sigma * eps).

ORACLE_TIMESTEPS = (801, 601, 401, 201, 1)  # sampled timesteps, noisiest first (5 DDIM steps)
ORACLE_RTOL = 1e-3  # max |node - oracle| / max |oracle| (measured 3.4e-4): float32 order, AdaIN eps 1e-5 vs 1e-4


def _alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD1.5's scaled_linear
    return torch.cumprod(1 - betas, 0)


def _sigma(t: int) -> float:
    a = float(_alphas()[t])
    return math.sqrt((1 - a) / a)


class _Processor:
    """A diffusers attention processor: plain attention, or (self-attention of an output block) the oracle's
    record/inject, or ComfyUI's attn1 replace patch from transformer_options (the node)."""

    def __init__(self, block: int | None, oracle: _Oracle | None):
        self.block, self.oracle = block, oracle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 transformer_options=None):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        temperature = 1.0
        if self.block is not None and self.oracle is not None:
            q, k, v, temperature = self.oracle.attn(self.block, q, k, v)
        patch = None
        if self.block is not None and transformer_options is not None:
            patch = transformer_options.get("patches_replace", {}).get("attn1", {}).get(("output", self.block, 0))
        if patch is not None:
            extra = {k_: v_ for k_, v_ in transformer_options.items() if k_ not in ("patches", "patches_replace")}
            out = patch(q, k, v, {**extra, "block": ("output", self.block), "block_index": 0,
                                  "n_heads": attn.heads})
        else:
            out = _einsum_attention(q, k, v, attn.heads, temperature)
        return attn.to_out[1](attn.to_out[0](out))


def _einsum_attention(q, k, v, heads, temperature):
    b, tq, inner = q.shape
    d = inner // heads
    qh, kh, vh = (t.reshape(t.shape[0], -1, heads, d) for t in (q, k, v))
    weights = (torch.einsum("bqhd,bkhd->bhqk", qh, kh) * temperature / math.sqrt(d)).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, vh).reshape(b, tq, inner)


@functools.lru_cache(maxsize=1)
def _tiny_unet_weights():
    from conftest import TINY_CONFIG
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_CONFIG / "unet")).eval()


def _tiny_unet(oracle: _Oracle | None = None):
    """The tiny SD1.5-shaped UNet (random weights, seed 0), its attention processors set for `oracle` or the node."""
    unet = _tiny_unet_weights()
    procs = {}
    for name in unet.attn_processors:
        parts = name.split(".")  # up_blocks.U.attentions.J.transformer_blocks.0.attn1.processor
        block = 3 * int(parts[1]) + int(parts[3]) if parts[0] == "up_blocks" and parts[-2] == "attn1" else None
        procs[name] = _Processor(block, oracle)
    unet.set_attn_processor(procs)
    return unet


def _context() -> torch.Tensor:
    return torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(11))  # the 'empty prompt' embedding


def _latents():
    gen = torch.Generator().manual_seed(12)
    photo = torch.randn(1, 4, 16, 16, generator=gen)
    painting = torch.randn(1, 4, 16, 16, generator=gen) * torch.tensor([0.5, 1.5, 1.0, 2.0]).view(1, 4, 1, 1) + 0.3
    return photo, painting


class _Oracle:
    """StyleID over the tiny UNet. gamma(block, step) and inject(step) make the schedule and gate variants."""

    def __init__(self, blocks=(6, 7, 8, 9, 10, 11), gamma=None, temperature=1.5, inject=None, adain_start=True):
        self.blocks, self.temperature, self.adain_start = blocks, temperature, adain_start
        self.gamma = gamma or (lambda block, step: 0.75)
        self.inject = inject or (lambda step: True)
        self.unet, self.mode, self.step, self.feats = _tiny_unet(self), None, 0, {}

    def attn(self, block, q, k, v):
        if block not in self.blocks:
            return q, k, v, 1.0
        if self.mode in ("photo", "painting"):
            self.feats[(self.mode, self.step, block)] = (q, k, v)
            return q, k, v, 1.0
        if self.mode == "sample" and self.inject(self.step):
            q_photo = self.feats[("photo", self.step, block)][0]
            _, k_s, v_s = self.feats[("painting", self.step, block)]
            g = self.gamma(block, self.step)
            return g * q_photo + (1 - g) * q, k_s, v_s, self.temperature
        return q, k, v, 1.0

    def eps(self, x, t):
        return self.unet(x, torch.tensor([t]), encoder_hidden_states=_context()).sample

    def invert(self, x0, role):
        a = _alphas().float()
        self.mode, x, a_cur = role, x0, torch.tensor(1.0)
        for step in reversed(range(len(ORACLE_TIMESTEPS))):
            t = ORACLE_TIMESTEPS[step]
            self.step = step
            e = self.eps(x, t)
            x = (x - (1 - a_cur).sqrt() * e) * (a[t].sqrt() / a_cur.sqrt()) + (1 - a[t]).sqrt() * e
            a_cur = a[t]
        return x

    def run(self, photo, painting):
        """-> the stylised clean latent [1, 4, h, w] (VP = model space at alpha 1)."""
        a = _alphas().float()
        with torch.no_grad():
            style_t, photo_t = self.invert(painting, "painting"), self.invert(photo, "photo")
            z = photo_t
            if self.adain_start:
                c_mean, c_std = photo_t.mean((2, 3), keepdim=True), photo_t.std((2, 3), keepdim=True)
                s_mean, s_std = style_t.mean((2, 3), keepdim=True), style_t.std((2, 3), keepdim=True)
                z = (photo_t - c_mean) / (c_std + 1e-4) * s_std + s_mean
            self.mode = "sample"
            for step, t in enumerate(ORACLE_TIMESTEPS):
                self.step = step
                e = self.eps(z, t)
                x0 = (z - (1 - a[t]).sqrt() * e) / a[t].sqrt()
                a_prev = a[ORACLE_TIMESTEPS[step + 1]] if step + 1 < len(ORACLE_TIMESTEPS) else torch.tensor(1.0)
                z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        return z


class _LatentVAE:
    """Encodes to a given latent (divided by SD1.5's 0.18215, which the node multiplies back)."""

    def __init__(self, latent):
        self.latent = latent

    def encode(self, pixels):
        return self.latent / 0.18215


def _comfy_apply_model(unet):
    """ComfyUI's BaseModel.apply_model for an EPS model over a diffusers UNet: x / sqrt(1 + sigma^2) in, the
    timestep whose sigma it is, denoised = x - sigma * eps out."""
    table = torch.tensor([_sigma(t) for t in range(1000)])

    def apply_model(x, sigma, c_crossattn=None, transformer_options=None):
        s = sigma.view(-1, 1, 1, 1)
        t = (table.log()[None] - sigma.log()[:, None]).abs().argmin(1)
        eps = unet(x / (1 + s ** 2).sqrt(), t, encoder_hidden_states=c_crossattn,
                   cross_attention_kwargs={"transformer_options": transformer_options}).sample
        return x - s * eps

    return apply_model


def _node_run(mode="paper", photo=None, painting=None, sigmas=None, noise_seed=3, gamma_schedule="", **kw):
    """The node's injection over the tiny UNet: ComfyUI's calling convention (calc_cond_batch's call of the model
    wrapper), its paper start, then plain Euler steps in sigma space (= DDIM). Returns (clean latent, UNet rows per
    call)."""
    from stylora.nodes.style_image import RUN_KEY, StyleRun

    if photo is None:
        photo, painting = _latents()
    sigmas = sigmas or [_sigma(t) for t in ORACLE_TIMESTEPS]
    base = _fake_model()
    (styled,) = StyleFromImage().apply(base, torch.rand(1, 16, 16, 3), _LatentVAE(painting),
                                       {"samples": photo / 0.18215}, mode=mode, gamma_schedule=gamma_schedule, **kw)
    injection = styled.get_attachment(INJECTION_ATTACHMENT)
    apply_model = _comfy_apply_model(_tiny_unet())
    rows: list[int] = []

    def counted(x, t, **c):
        rows.append(x.shape[0])
        return apply_model(x, t, **c)

    def predict(x, sigma, model_options):  # calc_cond_batch for one conditioning (CFG 1)
        to = {**model_options["transformer_options"], "cond_or_uncond": [0]}
        c = {"c_crossattn": _context().expand(x.shape[0], -1, -1), "transformer_options": to}
        args = {"input": x, "timestep": torch.full((x.shape[0],), float(sigma)), "c": c, "cond_or_uncond": [0]}
        return model_options["model_function_wrapper"](counted, args)

    run = StyleRun(model_key=("tiny", "0"), sigmas=sigmas)
    options = styled.model_options
    with torch.no_grad():
        if mode == "paper":
            x = injection.paper_start(predict, photo, run, options, "empty")
        else:
            x = photo + sigmas[0] * torch.randn(photo.shape, generator=torch.Generator().manual_seed(noise_seed))
        options = {**options, "transformer_options": {**options["transformer_options"], RUN_KEY: run}}
        for i, s in enumerate(sigmas):
            den = predict(x, s, options)
            nxt = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
            x = den + nxt * (x - den) / s
    return x, rows


def _distance(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())




def test_paper_mode_agrees_with_the_styleid_oracle_and_fast_mode_distance_is_reported():
    photo, painting = _latents()
    oracle = _Oracle().run(photo, painting)
    node, rows = _node_run("paper", photo, painting)
    err = _distance(node, oracle)
    # The oracle's own sensitivity: without injection the result is far away, so the tolerance means something.
    plain = _Oracle(inject=lambda step: False, adain_start=False).run(photo, painting)
    print(f"paper vs StyleID oracle: {err:.2e} (max abs / max |oracle|); oracle without injection: "
          f"{_distance(plain, oracle):.3f}")
    assert err < ORACLE_RTOL and _distance(plain, oracle) > 50 * ORACLE_RTOL
    # Cost: 5 inversion rows for the painting, 5 for the photo, then 1 row per step.
    assert rows == [1] * 15
    fast, _ = _node_run("fast", photo, painting)
    print(f"fast vs StyleID oracle: {_distance(fast, oracle):.3f}")


def test_paper_mode_second_photo_reuses_the_paintings_features():
    photo, painting = _latents()
    _, first = _node_run("paper", photo, painting)
    node, second = _node_run("paper", photo.flip(-1), painting)
    assert len(first) == 15 and second == [1] * 10  # photo inversion + sampling: 2 UNet rows per step
    assert _distance(node, _Oracle().run(photo.flip(-1), painting)) < ORACLE_RTOL  # the cached features are right
    _, fast_first = _node_run("fast", photo, painting)
    _, fast_second = _node_run("fast", photo.flip(-1), painting)
    assert fast_first == [3] * 5 and fast_second == [2] * 5  # x + photo reference (+ painting, first photo only)


def test_paper_mode_gamma_schedule_matches_the_oracle():
    photo, painting = _latents()
    schedule = "6-8:0.9>0.5, 10:0.2"

    def gamma(block, step):
        if block in (6, 7, 8):
            return 0.9 + (0.5 - 0.9) * step / 4
        return 0.2 if block == 10 else 0.75

    node, _ = _node_run("paper", photo, painting, gamma_schedule=schedule)
    assert _distance(node, _Oracle(gamma=gamma).run(photo, painting)) < ORACLE_RTOL
    assert _distance(node, _Oracle().run(photo, painting)) > 5 * ORACLE_RTOL  # the schedule matters


@pytest.mark.parametrize("variant", ["gamma", "temperature", "blocks", "gate"])
def test_paper_mode_settings_match_the_oracle(variant):
    photo, painting = _latents()
    node_kw, oracle_kw = {
        "gamma": ({"gamma": 0.3}, {"gamma": lambda block, step: 0.3}),
        "temperature": ({"temperature": 0.7}, {"temperature": 0.7}),
        "blocks": ({"blocks": "4,9-10"}, {"blocks": (4, 9, 10)}),
        # start_percent 0.5 is timestep 499.5 (ComfyUI's percent_to_sigma): between the 2nd and 3rd sampled sigma.
        "gate": ({"start_percent": 0.5}, {"inject": lambda step: step >= 2}),
    }[variant]
    node, _ = _node_run("paper", photo, painting, **node_kw)
    oracle = _Oracle(**oracle_kw).run(photo, painting)
    assert _distance(node, oracle) < ORACLE_RTOL, variant
    assert _distance(node, _Oracle().run(photo, painting)) > 5 * ORACLE_RTOL, variant  # the setting matters


# --- pinned details: the painting's crop, the declared ranges, the fast mode's reference rows, the cache ------

def test_fit_to_keeps_the_middle_of_the_painting():
    ramp = torch.arange(100.0) / 100  # value = row (or column) index / 100
    tall = ramp.view(1, 100, 1, 1).expand(1, 100, 40, 3)
    # Landscape 16x24 from 100x40: 40 * 16 / 24 = 26.7 -> 27 rows kept, from row (100 - 27) // 2 = 36. Output row 0
    # samples input row (0 + 0.5) * 27 / 16 - 0.5 = 0.34 of the crop: value (36 + 0.34) / 100.
    out = fit_to(tall, 16, 24)
    assert out[0, 0, :, 0] == pytest.approx(torch.full((24,), 0.3634), abs=2e-3)
    assert out[0, 8, 0, 0] == pytest.approx((36 + 8.5 * 27 / 16 - 0.5) / 100, abs=2e-3)
    wide = ramp.view(1, 1, 100, 1).expand(1, 40, 100, 3)
    out = fit_to(wide, 24, 16)  # portrait: 27 columns from column 36
    assert out[0, :, 0, 0] == pytest.approx(torch.full((24,), 0.3634), abs=2e-3)


def test_declared_ranges():
    req, opt = StyleFromImage.INPUT_TYPES()["required"], StyleFromImage.INPUT_TYPES()["optional"]
    spec = {name: {k: v for k, v in group[name][1].items() if k in ("default", "min", "max", "step")}
            for group, names in ((req, ("gamma", "temperature", "adain")),
                                 (opt, ("start_percent", "end_percent"))) for name in names}
    assert spec == {"gamma": {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.05},
                    "temperature": {"default": 1.5, "min": 0.1, "max": 5.0, "step": 0.05},
                    "adain": {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05},
                    "start_percent": {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01},
                    "end_percent": {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}}
    assert opt["gamma_schedule"][1]["default"] == ""


def test_fast_reference_rows_are_the_latents_plus_sigma_times_the_fixed_noise():
    _, styled, latent = _styled()
    injection = styled.get_attachment(INJECTION_ATTACHMENT)
    like = torch.zeros(1, 4, 5, 7)
    noise = torch.randn((1, 4, 5, 7), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(injection._noised(injection.content, 2.0, like), latent["samples"] * 0.18215 + 2 * noise)
    # A latent of another size is resized to the batch's first (bilinear), then noised.
    small = injection._noised(injection.style, 0.0, torch.zeros(1, 4, 10, 14))
    assert small.shape == (1, 4, 10, 14)
    assert torch.allclose(small, F.interpolate(injection.style, size=(10, 14), mode="bilinear", align_corners=False))


def test_the_node_encodes_the_painting_at_the_photos_size_and_removal_keeps_other_patches():
    seen = []

    class _RecordingVAE(_VAE):
        def encode(self, pixels):
            seen.append(tuple(pixels.shape))
            return super().encode(pixels)

    base = _fake_model()
    base.set_model_attn1_replace(attention, "input", 4, 0)  # another node's patch on an input block
    latent = {"samples": torch.zeros(1, 4, 5, 7)}
    (styled,) = StyleFromImage().apply(base, torch.rand(1, 30, 50, 4), _RecordingVAE(), latent)
    assert seen == [(1, 40, 56, 3)]  # 5 x 7 latent = 40 x 56 pixels, RGB only
    zero = StyleStrength().apply(styled, 0.0)[0]
    assert zero.model_options["transformer_options"]["patches_replace"]["attn1"] == {("input", 4, 0): attention}


def test_gamma_schedule_parsing_and_feature_cache_bound():
    from stylora.nodes.style_image import FeatureCache, gamma_at, parse_gamma_schedule

    schedule = parse_gamma_schedule("6-7:0.9>0.5, 10:0.2")
    assert schedule == ((6, 0.9, 0.5), (7, 0.9, 0.5), (10, 0.2, 0.2))
    assert gamma_at(0.75, schedule, 6, 0.25) == pytest.approx(0.8) and gamma_at(0.75, schedule, 9, 0.5) == 0.75
    assert parse_gamma_schedule("") == ()
    for bad in ("6:x", "6:1.5", "2:0.5"):
        with pytest.raises(ValueError, match="gamma_schedule|blocks"):
            parse_gamma_schedule(bad)
    cache = FeatureCache(max_bytes=3 * 400)  # three 10x10 float32 tensors
    for i in range(4):
        cache.put(i, {"k": torch.zeros(10, 10)})
    assert list(cache.entries) == [1, 2, 3] and cache.nbytes == 1200  # the oldest went
    assert cache.get(1) is not None and list(cache.entries) == [2, 3, 1]  # a hit is the newest
    cache.put(9, {"k": torch.zeros(20, 20)})  # larger than the bound: not kept, nothing evicted
    assert 9 not in cache.entries and len(cache.entries) == 3


def test_a_folder_of_photos_encodes_the_painting_once_per_vae_and_size():
    seen = []

    class _CountingVAE(_VAE):
        def encode(self, pixels):
            seen.append(tuple(pixels.shape))
            return super().encode(pixels)

    painting = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(3))
    vae, base = _CountingVAE(), _fake_model()

    def styled_latent(vae, painting, h=2, w=2, photo=0.0):
        (m,) = StyleFromImage().apply(base, painting, vae, {"samples": torch.full((1, 4, h, w), photo)})
        return m.get_attachment(INJECTION_ATTACHMENT).style

    # Three photos, one painting, one VAE: encoded once; every photo's injection holds the same painting latent,
    # the 8x8 average of the painting times 4 - 2, times SD1.5's 0.18215 (worked from _VAE's formula).
    first = styled_latent(vae, painting, photo=0.1)
    assert styled_latent(vae, painting, photo=0.2).equal(first)
    assert styled_latent(vae, painting, photo=0.3).equal(first)
    assert seen == [(1, 16, 16, 3)]
    pooled = painting.movedim(-1, 1).reshape(1, 3, 2, 8, 2, 8).mean((3, 5))
    expected = torch.cat([pooled, pooled[:, :1]], 1) * 4 - 2
    assert torch.allclose(first, expected * 0.18215, atol=1e-6)
    # Another painting, another size, another VAE object: each encoded anew.
    styled_latent(vae, painting.flip(1))
    styled_latent(vae, painting, h=3, w=3)
    other = _CountingVAE()
    styled_latent(other, painting)
    assert seen == [(1, 16, 16, 3)] * 2 + [(1, 24, 24, 3), (1, 16, 16, 3)]
    # Two VAEs taking turns keep an entry each; an entry left by a freed VAE whose id another one took is not used.
    styled_latent(vae, painting)
    styled_latent(other, painting)
    assert len(seen) == 4
    from stylora.nodes.style_image import PAINTING_FEATURES, encoded_painting, tensor_digest

    third = _CountingVAE()
    PAINTING_FEATURES.put(("latent", tensor_digest(painting), id(third)),
                          {"vae": weakref.ref(_CountingVAE()), "latent": torch.zeros(1, 4, 2, 2)})
    assert torch.allclose(encoded_painting(third, painting), expected, atol=1e-6) and len(seen) == 5


def test_adain_worked_by_hand():
    # content channel values 1, 3 (mean 2, population std 1); style 10, 14 (mean 12, std 2): 1 -> 10, 3 -> 14.
    content = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    style = torch.tensor([10.0, 14.0]).view(1, 1, 2, 1)
    assert torch.allclose(adain(content, style, eps=0.0), torch.tensor([10.0, 14.0]).view(1, 1, 1, 2))
    with pytest.raises(ValueError, match="equal C"):
        adain(content, torch.zeros(1, 2, 1, 2))


def test_attention_refuses_heads_that_do_not_divide_the_width():
    q, k, v = _qkv(1, width=12)
    with pytest.raises(ValueError, match="heads=5 does not divide the feature width 12"):
        attention(q, k, v, heads=5)


def test_feature_cache_keeps_an_entry_of_exactly_its_bound_and_drops_a_larger_one():
    from stylora.nodes.style_image import FeatureCache

    cache = FeatureCache(max_bytes=64)
    cache.put("exact", {"t": torch.zeros(16)})  # 16 float32 = 64 bytes
    cache.put("over", {"t": torch.zeros(17)})
    assert cache.get("exact") is not None and cache.get("over") is None and cache.nbytes == 64


def test_row_tensors_take_the_row_of_batch_tensors_only():
    from stylora.nodes.style_image import _row_tensors

    batch, other = torch.arange(6.0).view(3, 2), torch.arange(8.0).view(4, 2)
    got = _row_tensors({"b": [batch, other], "a": torch.tensor(5.0), "c": "text"}, 3, 1)
    assert len(got) == 1 and got[0].tolist() == [2.0, 3.0]


def test_injection_defaults_are_the_papers_and_strength_0_samples_as_given():
    from stylora.nodes.style_image import StyleInjection

    injection = StyleInjection(style=torch.zeros(1, 4, 2, 2), content=torch.zeros(1, 4, 2, 2))
    assert (injection.mode, injection.blocks, injection.gamma, injection.temperature, injection.adain,
            injection.strength) == ("paper", (6, 7, 8, 9, 10, 11), 0.75, 1.5, 1.0, 1.0)
    calls = []

    def executor(*args):
        calls.append(args)
        return "sampled"

    off = dataclasses.replace(injection, strength=0.0)
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    assert off.sample(executor, "guider", sigmas, {}, None, "noise", "latent", None, True) == "sampled"
    assert calls == [("guider", sigmas, {}, None, "noise", "latent", None, True)]


def test_adain_eps_is_added_to_the_contents_std():
    # float64 content 1, 1.00002 (std 1e-5): (x - mean) / (1e-5 + eps 1e-5) * 2 + 12 = 11, 13 (worked by hand).
    content = torch.tensor([1.0, 1.00002], dtype=torch.float64).view(1, 1, 1, 2)
    style = torch.tensor([10.0, 14.0], dtype=torch.float64).view(1, 1, 1, 2)
    assert torch.allclose(adain(content, style), torch.tensor([11.0, 13.0], dtype=torch.float64).view(1, 1, 1, 2),
                          atol=1e-6)


@pytest.mark.parametrize("photos, batch, chunks", [(1, 2, [0]), (2, 1, [0, 1])])
def test_fast_mode_takes_each_rows_photo_by_its_index_in_the_chunk(photos, batch, chunks):
    """Fast mode's reference rows follow the photos (n rows being denoised, then one per photo): row i of each
    cond/uncond chunk takes photo i mod photos. One photo sampled as a batch of 2 (two seeds): both rows take it;
    two photos but one sampled at CFG (a chunk of one row each): each chunk's row takes photo 0."""
    from stylora.nodes.style_image import ROWS_KEY, StyleInjection

    injection = StyleInjection(style=torch.rand(1, 4, 2, 2), content=torch.rand(photos, 4, 2, 2), mode="fast")
    n = batch * len(chunks)
    seen = {}

    def apply_model(x, t, **c):
        seen.update(c["transformer_options"][ROWS_KEY])
        return torch.zeros_like(x)

    args = {"input": torch.rand(n, 4, 2, 2), "timestep": torch.full((n,), 1.0), "cond_or_uncond": chunks,
            "c": {"c_crossattn": torch.rand(n, 3, 8), "transformer_options": {}}}
    assert injection(apply_model, args).shape == (n, 4, 2, 2)
    assert seen["ref_index"].tolist() == [n] * n  # photo 0's reference row, right after the n rows
    assert seen["style_pick"].tolist() == [0] * n
