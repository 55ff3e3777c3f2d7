"""Style From Image composed with the rest of a sampling graph, in both modes: a batch of photos, CFG > 1 (cond and
uncond rows in one UNet call), a latent noise mask, a LoRA style on the same model, samplers other than euler, and
the input model left as it was. The node runs through its own sampler wrapper (`StyleInjection.sample`) over the
tiny SD1.5-shaped UNet of tests/test_style_image.py, with ComfyUI 0.3.64's sampling written out below
(comfy/samplers.py: calc_cond_batch, sampling_function, KSamplerX0Inpaint, KSAMPLER.sample; k-diffusion's euler,
heun and dpmpp_2m), and paper mode is checked against the StyleID oracle there, extended here with CFG and
ComfyUI's inpainting."""

from __future__ import annotations

import contextlib
import math
import sys
import types

import pytest
import torch
from stylora.nodes.style_image import PAINTING_FEATURES, StyleFromImage, attention
from test_style_image import (
    ORACLE_RTOL,
    ORACLE_TIMESTEPS,
    _alphas,
    _comfy_apply_model,
    _context,
    _distance,
    _fake_model,
    _LatentVAE,
    _Oracle,
    _sigma,
    _tiny_unet,
    _tiny_unet_weights,
)

SIGMAS = [_sigma(t) for t in ORACLE_TIMESTEPS] + [0.0]


pytestmark = pytest.mark.usefixtures("one_thread_and_an_empty_feature_cache")




@pytest.fixture
def comfy(monkeypatch):
    """ComfyUI's modules the node reaches while sampling (nodes/host.py): comfy.samplers.calc_cond_batch and
    comfy.ldm.modules.attention.optimized_attention, as written out here."""
    modules = {name: types.ModuleType(name) for name in
               ("comfy", "comfy.samplers", "comfy.ldm", "comfy.ldm.modules", "comfy.ldm.modules.attention")}
    modules["comfy.samplers"].calc_cond_batch = _calc_cond_batch
    modules["comfy.ldm.modules.attention"].optimized_attention = (
        lambda q, k, v, heads, attn_precision=None, transformer_options=None: attention(q, k, v, heads))
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


def _prompt() -> torch.Tensor:
    return torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(13))  # the positive prompt's embedding


def _entry(context: torch.Tensor) -> list[dict]:
    """Processed conditioning (CFGGuider.conds["positive"]): one entry, its cross-attention context."""
    return [{"model_conds": {"c_crossattn": types.SimpleNamespace(cond=context)}}]


def _photos():
    gen = torch.Generator().manual_seed(12)
    photo = torch.randn(1, 4, 16, 16, generator=gen)
    painting = torch.randn(1, 4, 16, 16, generator=gen) * torch.tensor([0.5, 1.5, 1.0, 2.0]).view(1, 4, 1, 1) + 0.3
    second = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(14)) * 0.8 - 0.2
    return photo, second, painting


# --- ComfyUI 0.3.64's sampling, written out --------------------------------------------------------------------

def _calc_cond_batch(model, conds, x, timestep, model_options):
    """comfy.samplers.calc_cond_batch for conditioning without areas, memory to spare: every given conditioning's
    rows in one UNet call through the model wrapper, the last conditioning's chunk first (ComfyUI reverses the
    list it batches), cond_or_uncond naming each chunk's index."""
    order = [i for i, c in enumerate(conds) if c is not None][::-1]
    b = x.shape[0]
    context = torch.cat([conds[i][0]["model_conds"]["c_crossattn"].cond.expand(b, -1, -1) for i in order])
    to = {**model_options.get("transformer_options", {}), "cond_or_uncond": order, "sigmas": timestep}
    c = {"c_crossattn": context, "transformer_options": to}
    xin, t = torch.cat([x] * len(order)), torch.cat([timestep] * len(order))
    wrapper = model_options.get("model_function_wrapper")
    out = wrapper(model.apply_model, {"input": xin, "timestep": t, "c": c, "cond_or_uncond": order}) if wrapper \
        else model.apply_model(xin, t, **c)
    result = [torch.zeros_like(x) for _ in conds]
    for j, i in enumerate(order):
        result[i] = out[j * b:(j + 1) * b]
    return result


class _EpsSampling:
    """comfy.model_sampling.EPS + ModelSamplingDiscrete's sigma_max for SD1.5's schedule."""

    sigma_max = _sigma(999)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = torch.as_tensor(sigma, dtype=noise.dtype)
        sigma = sigma.view(-1, 1, 1, 1) if sigma.numel() > 1 else sigma.reshape(())
        noise = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return noise + latent_image


class _Guider:
    """CFGGuider after process_conds: model_patcher, conds, inner_model; called as sampling_function (CFG 1 skips
    the uncond rows, as ComfyUI's cfg1 optimisation)."""

    def __init__(self, patcher, apply_model, cfg, positive, negative):
        self.model_patcher, self.cfg = patcher, cfg
        self.conds = {"positive": _entry(positive), "negative": _entry(negative)}
        self.inner_model = types.SimpleNamespace(model_sampling=_EpsSampling(), apply_model=apply_model)
        self.calls: list[tuple[torch.Tensor, float, torch.Tensor]] = []  # (x, sigma, denoised) per evaluation

    def __call__(self, x, sigma, model_options):
        uncond = None if math.isclose(self.cfg, 1.0) else self.conds["negative"]
        cond_pred, uncond_pred = _calc_cond_batch(self.inner_model, [self.conds["positive"], uncond], x, sigma,
                                                  model_options)
        out = uncond_pred + (cond_pred - uncond_pred) * self.cfg
        self.calls.append((x, float(sigma[0]), out))
        return out


class _KSampler:
    """comfy.samplers.KSAMPLER (KSamplerX0Inpaint's mask blend) with k-diffusion's euler, heun or dpmpp_2m."""

    def __init__(self, name):
        self.name = name

    def max_denoise(self, model_wrap, sigmas):
        sigma = float(sigmas[0])
        return math.isclose(_EpsSampling.sigma_max, sigma, rel_tol=1e-05) or sigma > _EpsSampling.sigma_max

    def sample(self, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        sampling = guider.inner_model.model_sampling

        def model(x, sigma):  # KSamplerX0Inpaint
            s = sigma * torch.ones(x.shape[0])
            if denoise_mask is not None:
                x = x * denoise_mask + sampling.noise_scaling(s, noise, latent_image) * (1.0 - denoise_mask)
            out = guider(x, s, extra_args["model_options"])
            return out if denoise_mask is None else out * denoise_mask + latent_image * (1.0 - denoise_mask)

        x = sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(guider, sigmas))
        old = None
        for i in range(len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            denoised = model(x, s)
            if self.name == "dpmpp_2m":
                t, t_next = -s.log(), -s_next.log()
                h = t_next - t
                if old is not None and s_next != 0:
                    r = (t - (-sigmas[i - 1].log())) / h
                    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
                else:
                    denoised_d = denoised
                x = (s_next / s) * x - (-h).expm1() * denoised_d if s_next != 0 else denoised_d
                old = denoised
                continue
            d = (x - denoised) / s
            if self.name == "heun" and s_next != 0:
                x2 = x + d * (s_next - s)
                d2 = (x2 - model(x2, s_next)) / s_next
                d = (d + d2) / 2
            x = x + d * (s_next - s)
        return x


class _Executor:
    """ComfyUI's WrapperExecutor as the SAMPLER_SAMPLE wrapper sees it: callable, class_obj the sampler."""

    def __init__(self, sampler):
        self.class_obj = sampler

    def __call__(self, *args):
        return self.class_obj.sample(*args)


def _copy_nested(value):
    """comfy.model_patcher.create_model_options_clone: nested dicts copied, their leaves shared."""
    return {k: _copy_nested(v) for k, v in value.items()} if isinstance(value, dict) else value


def _sample(patcher, latent, cfg=1.0, sampler="euler", mask=None, noise=None, calls=None):
    """CFGGuider.inner_sample + KSAMPLER over the tiny UNet: `latent` [B, 4, h, w] model space, `mask` [B or 1, 1,
    h, w] (1: repaint), `noise` the seed's (default: seed 3). Returns the sampled latent; `calls` gets the guider's
    (x, sigma, denoised) evaluations."""
    apply_model = _comfy_apply_model(_tiny_unet())
    guider = _Guider(patcher, apply_model, cfg, _prompt(), _context())
    sigmas = torch.tensor(SIGMAS)
    if noise is None:
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    mask = None if mask is None else mask.expand(latent.shape[0], *mask.shape[1:])
    extra_args = {"model_options": _copy_nested(patcher.model_options), "seed": 3}
    extra_args["model_options"]["transformer_options"]["sample_sigmas"] = sigmas
    executor = _Executor(_KSampler(sampler))
    wrappers = [w for ws in patcher.wrappers.get("sampler_sample", {}).values() for w in ws]
    with torch.no_grad():
        if wrappers:
            out = wrappers[0](executor, guider, sigmas, extra_args, None, noise, latent, mask, True)
        else:
            out = executor(guider, sigmas, extra_args, None, noise, latent, mask, True)
    if calls is not None:
        calls += guider.calls
    return out


def _styled(base, photos, painting, mode="paper", **kw):
    (styled,) = StyleFromImage().apply(base, torch.rand(1, 16, 16, 3), _LatentVAE(painting),
                                       {"samples": photos / 0.18215}, mode=mode, **kw)
    return styled


# --- the StyleID oracle with CFG and ComfyUI's inpainting -----------------------------------------------------

class _CfgOracle(_Oracle):
    """StyleID (tests/test_style_image.py's oracle) sampled with classifier-free guidance: the inversions under the
    empty prompt as before; each sampling step's eps = eps(empty) + cfg (eps(prompt) - eps(empty)), both rows
    injected with the photo's queries and the painting's keys/values. `mask` [1, 1, h, w] (1: repaint) adds
    ComfyUI's inpainting: before each step the kept region is the photo plus sigma times the noise that lands on
    the start, after it the denoised latent there is the photo's, and the step moves from the unblended latent."""

    def __init__(self, cfg=1.0, mask=None, **kw):
        super().__init__(**kw)
        self.cfg, self.mask = cfg, mask

    def eps(self, x, t):
        e = super().eps(x, t)
        if self.mode != "sample":
            return e
        e_c = self.unet(x, torch.tensor([t]), encoder_hidden_states=_prompt()).sample
        return e + self.cfg * (e_c - e)  # CFG 1: the prompt's eps, as ComfyUI's cond-only rows

    def run(self, photo, painting):
        a = _alphas().float()
        with torch.no_grad():
            style_t, photo_t = self.invert(painting, "painting"), self.invert(photo, "photo")
            c_mean, c_std = photo_t.mean((2, 3), keepdim=True), photo_t.std((2, 3), keepdim=True)
            s_mean, s_std = style_t.mean((2, 3), keepdim=True), style_t.std((2, 3), keepdim=True)
            z = (photo_t - c_mean) / (c_std + 1e-4) * s_std + s_mean
            a0 = a[ORACLE_TIMESTEPS[0]]
            noise = (z / a0.sqrt() - photo) / ((1 - a0) / a0).sqrt()  # sigma-space start = photo + sigma_0 noise
            self.mode = "sample"
            for step, t in enumerate(ORACLE_TIMESTEPS):
                self.step = step
                z_in = z
                if self.mask is not None:
                    kept = a[t].sqrt() * (photo + ((1 - a[t]) / a[t]).sqrt() * noise)
                    z_in = z * self.mask + kept * (1 - self.mask)
                e = self.eps(z_in, t)
                x0 = (z_in - (1 - a[t]).sqrt() * e) / a[t].sqrt()
                if self.mask is not None:
                    x0 = x0 * self.mask + photo * (1 - self.mask)
                    e = (z - a[t].sqrt() * x0) / (1 - a[t]).sqrt()
                a_prev = a[ORACLE_TIMESTEPS[step + 1]] if step + 1 < len(ORACLE_TIMESTEPS) else torch.tensor(1.0)
                z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        return z


def _oracle(photo, painting, **kw):
    return _CfgOracle(**kw).run(photo, painting)


# --- the tests -----------------------------------------------------------------------------------------------

def test_paper_mode_batch_of_two_at_cfg_3_is_each_photo_by_the_styleid_oracle(comfy):
    """Two photos in one batch at CFG 3 (4 UNet rows per step, uncond chunk first): item i is photo i stylised by
    StyleID with guidance eps(empty) + 3 (eps(prompt) - eps(empty)); CFG 3 is not CFG 1."""
    photo, second, painting = _photos()
    out = _sample(_styled(_fake_model(), torch.cat([photo, second]), painting), torch.cat([photo, second]), cfg=3.0)
    for i, p in enumerate((photo, second)):
        assert _distance(out[i:i + 1], _oracle(p, painting, cfg=3.0)) < ORACLE_RTOL, i
    assert _distance(out[:1], _oracle(photo, painting, cfg=1.0)) > 50 * ORACLE_RTOL  # the guidance counts
    assert _distance(out[0:1], out[1:2]) > 0.1


def test_batch_items_are_each_photo_sampled_alone_in_both_modes(comfy):
    """Fast mode has no oracle: each item of a batch-2 run at CFG 3 is what its photo gives sampled alone (the same
    seed's noise row), in both modes."""
    photo, second, painting = _photos()
    both = torch.cat([photo, second])
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(both.shape, generator=gen)
    for mode in ("paper", "fast"):
        out = _sample(_styled(_fake_model(), both, painting, mode=mode), both, cfg=3.0, noise=noise)
        for i, p in enumerate((photo, second)):
            PAINTING_FEATURES.clear()
            alone = _sample(_styled(_fake_model(), p, painting, mode=mode), p, cfg=3.0, noise=noise[i:i + 1])
            assert _distance(out[i:i + 1], alone) < 1e-4, (mode, i)
        assert _distance(out[0:1], out[1:2]) > 0.1, mode


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_a_noise_mask_keeps_the_photo_outside_and_paper_mode_is_the_inpainting_oracle_inside(comfy, mode):
    """A latent noise mask (Masked Style Apply's, or any): outside it the sampled latent is the photo's, exactly
    (ComfyUI puts the photo's latent back after every evaluation); inside, paper mode is StyleID under ComfyUI's
    inpainting (the oracle above), not StyleID without the mask."""
    photo, second, painting = _photos()
    both = torch.cat([photo, second])
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:13, 2:10] = 1.0
    out = _sample(_styled(_fake_model(), both, painting, mode=mode), both, cfg=3.0, mask=mask)
    keep = mask[0, 0] == 0
    assert torch.isfinite(out).all() and torch.allclose(out[..., keep], both[..., keep], rtol=0, atol=1e-6), mode
    assert (out - both)[..., ~keep].abs().mean() > 0.1, mode  # inside: sampled
    if mode == "paper":
        for i, p in enumerate((photo, second)):
            assert _distance(out[i:i + 1], _oracle(p, painting, cfg=3.0, mask=mask)) < ORACLE_RTOL, i
        assert _distance(out[:1], _oracle(photo, painting, cfg=3.0)) > 50 * ORACLE_RTOL


@contextlib.contextmanager
def _lora_weights():
    """The tiny UNet with a low-rank change on the keys and values of its decoder's self-attention (the layers the
    injection reads and the inversion records), while the block runs: what a style LoRA patched in gives."""
    unet = _tiny_unet_weights()
    layers = [m for name, m in unet.named_modules() if name.startswith("up_blocks") and name.endswith(
        ("attn1.to_k", "attn1.to_v"))]
    saved = [m.weight.detach().clone() for m in layers]
    gen = torch.Generator().manual_seed(15)
    with torch.no_grad():
        for m in layers:
            out_f, in_f = m.weight.shape
            m.weight += torch.randn(out_f, 2, generator=gen) @ torch.randn(2, in_f, generator=gen) * 0.3
    try:
        yield
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.weight.copy_(w)


def test_paper_mode_on_a_load_style_lora_model_inverts_and_samples_with_the_loras_weights(comfy, monkeypatch,
                                                                                        tmp_path):
    """Load Style LoRA, then Style From Image on its model, after a run on the plain model (whose painting
    features are cached): the painting is inverted again with the style's weights (a new patches_uuid), and the
    result is StyleID over the LoRA'd UNet at CFG 3, not over the plain one."""
    from fake_host import FakeCLIP, FakeComfy
    from safetensors.torch import save_file
    from stylora.nodes.style_lora import LoadStyleLoRA

    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 8), "lora_unet_x.lora_up.weight": torch.ones(8, 2),
               "lora_unet_x.alpha": torch.tensor(2.0)}, str(tmp_path / "s.safetensors"))
    fake = FakeComfy(styles={"s.safetensors": str(tmp_path / "s.safetensors")})
    base = fake.model()
    fake.install(monkeypatch)  # over the `comfy` fixture's top-level module; comfy.samplers stays
    photo, _, painting = _photos()
    plain = _sample(_styled(base, photo, painting), photo, cfg=3.0)
    lora, _, _, _ = LoadStyleLoRA().load(base, FakeCLIP(), "s.safetensors", 1.0)
    assert lora.patches and lora.patches_uuid != base.patches_uuid and not base.patches
    with _lora_weights():
        out = _sample(_styled(lora, photo, painting), photo, cfg=3.0)
        oracle = _oracle(photo, painting, cfg=3.0)
    assert _distance(out, oracle) < ORACLE_RTOL
    assert _distance(plain, oracle) > 50 * ORACLE_RTOL  # the style's weights change the result


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_paper_mode_gives_each_sampler_evaluation_the_features_of_its_sigma(comfy, sampler):
    """heun evaluates twice per step (at the step's sigma and the next), dpmpp_2m once with a two-step update: every
    evaluation at CFG 3 is StyleID's guided prediction with the queries, keys and values inverted at that sigma."""
    photo, _, painting = _photos()
    calls = []
    out = _sample(_styled(_fake_model(), photo, painting), photo, cfg=3.0, sampler=sampler, calls=calls)
    oracle = _CfgOracle(cfg=3.0)
    steps = []
    with torch.no_grad():
        oracle.invert(painting, "painting")
        oracle.invert(photo, "photo")
        oracle.mode = "sample"
        for x, sigma, denoised in calls:
            oracle.step = min(range(len(ORACLE_TIMESTEPS)), key=lambda i: abs(math.log(SIGMAS[i] / sigma)))
            steps.append(oracle.step)
            e = oracle.eps(x / math.sqrt(1 + sigma * sigma), ORACLE_TIMESTEPS[oracle.step])
            assert _distance(denoised, x - sigma * e) < ORACLE_RTOL, (sigma, oracle.step)
    assert steps == {"heun": [0, 1, 1, 2, 2, 3, 3, 4, 4], "dpmpp_2m": [0, 1, 2, 3, 4]}[sampler]
    assert torch.isfinite(out).all()


def _state(patcher) -> str:
    """What a node and sampling must not change on a ModelPatcher they are given."""
    return repr((patcher.patches, patcher.patches_uuid, patcher.model_options, patcher.wrappers,
                 sorted(patcher.attachments.items(), key=lambda kv: kv[0])))


def _passthrough(apply_model, args):
    """Another node's model_function_wrapper (it changes nothing)."""
    return apply_model(args["input"], args["timestep"], **args["c"])


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_the_input_model_is_unchanged_by_the_node_and_by_masked_batched_cfg_sampling(comfy, mode):
    """A model carrying a LoRA patch, another node's attention patch, model wrapper and attachment: the same after
    Style From Image and after sampling its output (batch 2, CFG 3, a mask), and the output the same after
    sampling too."""
    photo, second, painting = _photos()
    both = torch.cat([photo, second])
    base = _fake_model()
    base.add_patches({"diffusion_model.x.weight": ("lora",)}, 0.8)
    base.set_model_attn1_replace(attention, "input", 4, 0)
    base.set_model_unet_function_wrapper(_passthrough)
    base.set_attachments("another_node", ("kept",))
    before = _state(base)
    styled = _styled(base, both, painting, mode=mode)
    assert _state(base) == before
    styled_before = _state(styled)
    mask = torch.ones(1, 1, 16, 16)
    mask[..., :, 8:] = 0.0
    out = _sample(styled, both, cfg=3.0, mask=mask)
    assert _state(base) == before and _state(styled) == styled_before
    assert (out - _sample(base, both, cfg=3.0, mask=mask)).abs().mean() > 0.05  # the injection ran
