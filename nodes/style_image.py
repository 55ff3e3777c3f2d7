"""StyleFromImage: a style from one painting, without training (StyleID: Chung, Hyun and Heo, "Style Injection in
Diffusion: A Training-free Approach for Adapting Large-scale Diffusion Models for Style Transfer", CVPR 2024).

In the self-attention of the UNet decoder (SD1.5 output blocks 6-11) the photo being styled keeps its queries and
attends to the painting's keys and values at the same noise level:

    q~  = gamma * q_content + (1 - gamma) * q_stylized            query preservation, gamma = 0.75
    out = softmax(T * q~ k_style^T / sqrt(d)) v_style             attention temperature T = 1.5

and the latent being denoised is given the painting latent's per-channel mean and std (AdaIN, Huang and
Belongie 2017), which carries the painting's colour tone.

Deviations from the paper, because ComfyUI's samplers run no DDIM inversion:
- the painting's and the photo's features come from their VAE latents noised to the current sigma with one fixed
  noise (seed 0, the same at every step), not from DDIM-inverted latents;
- AdaIN is applied to the latent the UNet sees at every injected step (StyleID sets it once on the inverted
  starting latent; a model wrapper cannot replace the sampler's starting latent).
Cost: both reference branches ride in the UNet batch ComfyUI already forms (cond and uncond together), so each
step runs the UNet on B_content + S_style more rows: one photo with CFG is 4 rows instead of 2, about twice the
sampling time (benchmarks/style_image_speed.py).

The tensor functions here (attention, blend_queries, styled_attention, adain) need no ComfyUI; `comfy` is imported
only inside the functions that run in it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .host import has_attrs, has_module

INJECTION_ATTACHMENT = "stylora_style_injection"  # ModelPatcher attachment: the StyleInjection installed
ROWS_KEY = "stylora_style_rows"  # transformer_options key the wrapper sets for the attention patches
NOISE_SEED = 0  # one fixed noise for the reference branches: the same at every step, so features do not flicker
TRANSFORMER_OUTPUT_BLOCKS = range(3, 12)  # SD1.5 output blocks that carry a transformer
PAPER_BLOCKS = "6-11"


# --- tensor functions -----------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, temperature: float = 1.0) -> torch.Tensor:
    """Multi-head attention softmax(temperature * q k^T / sqrt(d)) v.

    q: [B, Tq, heads*d], k and v: [B, Tk, heads*d] -> [B, Tq, heads*d]. temperature 1 is plain scaled dot-product
    attention (what ComfyUI's optimized attention computes); above 1 the attention is sharper.
    """
    b, tq, inner = q.shape
    if inner % heads:
        raise ValueError(f"heads={heads} does not divide the feature width {inner}")
    d = inner // heads
    qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=temperature / math.sqrt(d))
    return out.transpose(1, 2).reshape(b, tq, inner)


def blend_queries(q_content: torch.Tensor, q_stylized: torch.Tensor, gamma: float) -> torch.Tensor:
    """StyleID's query preservation: gamma * q_content + (1 - gamma) * q_stylized (gamma 1: the content's)."""
    return gamma * q_content + (1.0 - gamma) * q_stylized


def styled_attention(q_content: torch.Tensor, q_stylized: torch.Tensor, k_style: torch.Tensor, v_style: torch.Tensor,
                     gamma: float, temperature: float, heads: int) -> torch.Tensor:
    """The injected self-attention: blended queries attend to the style's keys and values, logits times T.

    q_*: [B, Tq, heads*d]; k_style, v_style: [B, Tk, heads*d] -> [B, Tq, heads*d].
    """
    return attention(blend_queries(q_content, q_stylized, gamma), k_style, v_style, heads, temperature)


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance normalisation: content [B, C, h, w] with each channel's mean and std replaced by those of
    style [B or 1, C, h', w'] (population std over h, w)."""
    if content.ndim != 4 or style.ndim != 4 or content.shape[1] != style.shape[1]:
        raise ValueError(f"adain needs [B, C, h, w] tensors with equal C, got {tuple(content.shape)} and "
                         f"{tuple(style.shape)}")
    c_mean, c_std = content.mean((2, 3), keepdim=True), content.std((2, 3), keepdim=True, unbiased=False)
    s_mean, s_std = style.mean((2, 3), keepdim=True), style.std((2, 3), keepdim=True, unbiased=False)
    return (content - c_mean) / (c_std + eps) * s_std + s_mean


def parse_blocks(text: str) -> tuple[int, ...]:
    """'6-11' or '6,8,10' -> output block indices; only SD1.5's transformer output blocks (3-11) are allowed."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"blocks: {text!r} is not like '6-11' or '6,8,10'") from None
        out += [i for i in range(first, last + 1) if i not in out]
    bad = [i for i in out if i not in TRANSFORMER_OUTPUT_BLOCKS]
    if not out or bad:
        raise ValueError(f"blocks: {text!r} must name SD1.5 output blocks 3-11 (those with self-attention)")
    return tuple(sorted(out))


def fit_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI IMAGE [S, H, W, C] centre-cropped to the aspect of height x width, then resized to it (bicubic,
    clamped to 0..1): the painting's strokes keep their proportions."""
    _, h, w, _ = image.shape
    if h * width > w * height:  # too tall
        keep = max(1, round(w * height / width))
        image = image[:, (h - keep) // 2:(h - keep) // 2 + keep]
    else:
        keep = max(1, round(h * width / height))
        image = image[:, :, (w - keep) // 2:(w - keep) // 2 + keep]
    x = F.interpolate(image.movedim(-1, 1).float(), size=(height, width), mode="bicubic", align_corners=False)
    return x.clamp(0, 1).movedim(1, -1)


# --- the injection under ComfyUI's sampling ---------------------------------------------------------------------

def _extend_rows(value: Any, n: int, row: int, extra: int) -> Any:
    """Every tensor in `value` (nested dicts/lists) whose first dim is the batch `n` gets `extra` copies of `row`
    appended: the reference rows use that row's conditioning (the negative prompt's when CFG batches it)."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == n:
        return torch.cat([value, value[row:row + 1].expand(extra, *value.shape[1:])])
    if isinstance(value, dict):
        return {k: _extend_rows(v, n, row, extra) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_extend_rows(v, n, row, extra) for v in value)
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class StyleInjection:
    """The model wrapper StyleFromImage installs (ComfyUI's `model_function_wrapper`).

    Each step it appends the photo's and the painting's latents, noised to the step's sigma, to the batch the
    sampler runs, AdaINs the rows being denoised toward the painting, and tells the attention patches which rows
    are which. Holds tensors but is never changed after creation, so ComfyUI's clone() shares it (__deepcopy__).
    """

    style: torch.Tensor = dataclasses.field(metadata={"help": "painting latents [S, 4, h, w], model space"})
    content: torch.Tensor = dataclasses.field(metadata={"help": "photo latents [B, 4, h, w], model space"})
    blocks: tuple[int, ...] = dataclasses.field(default=(6, 7, 8, 9, 10, 11),
                                                metadata={"help": "output blocks whose self-attention is injected"})
    gamma: float = dataclasses.field(default=0.75, metadata={"help": "query preservation (StyleID: 0.75)"})
    temperature: float = dataclasses.field(default=1.5, metadata={"help": "attention logit scale (StyleID: 1.5)"})
    adain: float = dataclasses.field(default=1.0, metadata={"help": "how far the latent moves to the painting's "
                                                                    "channel statistics, 0..1"})
    strength: float = dataclasses.field(default=1.0, metadata={"help": "0..1, set by Style Strength: output blend "
                                                                       "of injected and plain attention"})
    sigma_start: float = dataclasses.field(default=math.inf, metadata={"help": "inject while sigma <= this"})
    sigma_end: float = dataclasses.field(default=0.0, metadata={"help": "inject while sigma >= this"})
    inner: Callable | None = dataclasses.field(default=None, metadata={"help": "a wrapper the model had before"})

    def __deepcopy__(self, memo: dict) -> StyleInjection:
        return self

    def _noised(self, latent: torch.Tensor, sigma: float, like: torch.Tensor) -> torch.Tensor:
        """latent resized to like's h x w, plus sigma * the fixed noise (SD1.5's EPS noise scaling)."""
        h, w = like.shape[-2:]
        latent = latent.to(like.device, like.dtype)
        if latent.shape[-2:] != (h, w):
            latent = F.interpolate(latent, size=(h, w), mode="bilinear", align_corners=False)
        gen = torch.Generator().manual_seed(NOISE_SEED)
        noise = torch.randn((1, latent.shape[1], h, w), generator=gen).to(like.device, like.dtype)
        return latent + sigma * noise

    def __call__(self, apply_model: Callable, args: dict) -> torch.Tensor:
        x, t, c, cond_or_uncond = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]

        def run(a: dict) -> torch.Tensor:
            return self.inner(apply_model, a) if self.inner else apply_model(a["input"], a["timestep"], **a["c"])

        sigma = float(t.max())
        if self.strength == 0 or not self.sigma_end <= sigma <= self.sigma_start:
            return run(args)
        # 1. Rows: n being denoised (chunks of b, one chunk per cond/uncond), then photos, then paintings.
        n = x.shape[0]
        b = max(1, n // max(1, len(cond_or_uncond)))
        image = torch.arange(n, device=x.device) % b
        ref = self._noised(self.content, sigma, x)
        sty = self._noised(self.style, sigma, x)
        ref_index, style_index = image % ref.shape[0], image % sty.shape[0]
        # 2. AdaIN of the rows being denoised toward the painting at the same noise level.
        w = self.adain * self.strength
        if w:
            x = x + w * (adain(x, sty[style_index]) - x)
        # 3. One UNet pass over all rows; the reference rows take the negative prompt's conditioning.
        extra = ref.shape[0] + sty.shape[0]
        row = cond_or_uncond.index(1) * b if 1 in cond_or_uncond else 0
        c2 = _extend_rows({k: v for k, v in c.items() if k != "transformer_options"}, n, row, extra)
        c2["transformer_options"] = {**c.get("transformer_options", {}), ROWS_KEY: {
            "n": n, "ref_index": ref_index + n, "style_index": style_index + n + ref.shape[0],
            "gamma": self.gamma, "temperature": self.temperature, "strength": self.strength}}
        out = run({"input": torch.cat([x, ref, sty]), "timestep": torch.cat([t, t[:1].expand(extra)]), "c": c2,
                   "cond_or_uncond": cond_or_uncond})
        return out[:n]


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """What the block computes without the patch: ComfyUI's optimized attention (inside ComfyUI), else ours."""
    try:
        from comfy.ldm.modules.attention import optimized_attention
    except ImportError:
        return attention(q, k, v, extra_options["n_heads"])
    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def styled_attn1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI attn1 replace patch (after the q/k/v projections): injects the painting's keys and values into the
    rows being denoised; the reference rows and any call without StyleInjection's rows get plain attention."""
    rows = extra_options.get(ROWS_KEY)
    if rows is None:
        return _plain_attention(q, k, v, extra_options)
    n, heads = rows["n"], extra_options["n_heads"]
    ri, si = rows["ref_index"].to(q.device), rows["style_index"].to(q.device)
    out = styled_attention(q[ri], q[:n], k[si], v[si], rows["gamma"], rows["temperature"], heads)
    if rows["strength"] < 1:
        out = rows["strength"] * out + (1 - rows["strength"]) * _plain_attention(q[:n], k[:n], v[:n], extra_options)
    return torch.cat([out.to(q.dtype), _plain_attention(q[n:], k[n:], v[n:], extra_options)])


def install(model: Any, injection: StyleInjection) -> None:
    """Put the wrapper and the attention patches on `model` (a clone) and record the injection on it."""
    has_attrs(model, "ModelPatcher", "set_model_unet_function_wrapper", "set_model_attn1_replace", "set_attachments",
              used_by="Style From Image")
    has_module("comfy.ldm.modules.attention", "optimized_attention", used_by="Style From Image")
    model.set_model_unet_function_wrapper(injection)
    for i in injection.blocks:
        model.set_model_attn1_replace(styled_attn1, "output", i, 0)
    model.set_attachments(INJECTION_ATTACHMENT, injection)


def rescale_injection(model: Any, factor: float) -> None:
    """On a clone: the recorded injection's strength times `factor`; factor 0 removes the wrapper, the patches and
    the record, so the model behaves as the one StyleFromImage was given, bit for bit."""
    injection = model.get_attachment(INJECTION_ATTACHMENT)
    if injection is None:
        return
    if factor:
        install(model, dataclasses.replace(injection, strength=injection.strength * factor))
        return
    if injection.inner is None:
        model.model_options.pop("model_function_wrapper", None)
    else:
        model.model_options["model_function_wrapper"] = injection.inner
    to = model.model_options["transformer_options"]
    replace = {k: v for k, v in to["patches_replace"]["attn1"].items()
               if k not in {("output", i, 0) for i in injection.blocks}}
    to["patches_replace"] = {**to["patches_replace"], "attn1": replace}
    model.remove_attachments(INJECTION_ATTACHMENT)


class StyleFromImage:
    """Styles the photo after one painting, training-free (StyleID, CVPR 2024)."""

    CATEGORY = "Stylora"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the painting's style injected; sample the same latent with it (through "
                       "Style Strength to set how strongly).",)
    DESCRIPTION = ("Training-free style from one painting (StyleID, Chung et al. CVPR 2024). In the UNet decoder's "
                   "self-attention the photo keeps its queries and attends to the painting's keys and values; the "
                   "latent takes the painting's colour statistics (AdaIN). Costs about one extra UNet pass per step "
                   "(twice the sampling time with CFG on one photo).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "An SD1.5 model (Load Checkpoint, or already styled by Load Style "
                                               "LoRA)."}),
                "style_image": ("IMAGE", {"tooltip": "The painting. Several images: photo i takes painting "
                                                     "i mod count."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE, to encode the painting."}),
                "latent": ("LATENT", {"tooltip": "The photo's latent (Content Encode), the same one KSampler "
                                                 "samples: its queries are the ones preserved."}),
                "gamma": ("FLOAT", {"default": 0.75, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "Query preservation: 1 keeps the photo's layout most, 0 follows "
                                               "the image being denoised (StyleID: 0.75)."}),
                "temperature": ("FLOAT", {"default": 1.5, "min": 0.1, "max": 5.0, "step": 0.05,
                                          "tooltip": "Attention temperature: multiplies the attention logits; "
                                                     "above 1 sharper, stronger strokes (StyleID: 1.5)."}),
                "adain": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "How far the latent takes the painting's colour statistics (AdaIN); "
                                               "0 keeps the photo's colours."}),
                "blocks": ("STRING", {"default": PAPER_BLOCKS,
                                      "tooltip": "UNet output blocks to inject, e.g. '6-11' (the paper's: the "
                                                 "decoder's higher-resolution half) or '3-11' (more style)."}),
            },
            "optional": {
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Inject from this point of the noise schedule (0: the "
                                                       "noisiest)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Inject until this point of the noise schedule (1: the end)."}),
            },
        }

    def apply(self, model: Any, style_image: torch.Tensor, vae: Any, latent: dict, gamma: float = 0.75,
              temperature: float = 1.5, adain: float = 1.0, blocks: str = PAPER_BLOCKS, start_percent: float = 0.0,
              end_percent: float = 1.0):
        # 1. Settings.
        if not 0 <= gamma <= 1:
            raise ValueError(f"StyleFromImage: gamma must be in 0..1, got {gamma}")
        if not temperature > 0:
            raise ValueError(f"StyleFromImage: temperature must be > 0, got {temperature}")
        if not 0 <= start_percent <= end_percent <= 1:
            raise ValueError(f"StyleFromImage: need 0 <= start_percent <= end_percent <= 1, got {start_percent}, "
                             f"{end_percent}")
        block_ids = parse_blocks(blocks)
        replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
        taken = [i for i in block_ids if ("output", i, 0) in replace]
        if taken:
            raise ValueError(f"StyleFromImage: output blocks {taken} already have an attention patch (another "
                             "style-from-image or attention node upstream); chain only one")
        # 2. The painting, cropped to the photo's aspect and encoded at the photo's size.
        samples = latent["samples"]
        pixels = fit_to(style_image[..., :3], samples.shape[-2] * 8, samples.shape[-1] * 8)
        style = vae.encode(pixels)
        # 3. Both latents in the model's space (SD1.5: times 0.18215), as the sampler sees the photo's.
        style = model.model.process_latent_in(style.float()).cpu()
        content = model.model.process_latent_in(samples.float()).cpu()
        # 4. The steps to inject, as sigmas (ComfyUI's percent_to_sigma, as ControlNet's start/end use).
        sigma_start, sigma_end = math.inf, 0.0
        if start_percent > 0 or end_percent < 1:
            sampling = model.get_model_object("model_sampling")
            sigma_start, sigma_end = sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)
        # 5. On a clone (the input model stays as it is): wrapper, attention patches, and the record of both.
        out = model.clone()
        install(out, StyleInjection(style=style, content=content, blocks=block_ids, gamma=gamma,
                                    temperature=temperature, adain=adain, sigma_start=sigma_start,
                                    sigma_end=sigma_end, inner=model.model_options.get("model_function_wrapper")))
        return (out,)
