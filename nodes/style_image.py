"""StyleFromImage: a style from one painting, without training (StyleID: Chung, Hyun and Heo, "Style Injection in
Diffusion: A Training-free Approach for Adapting Large-scale Diffusion Models for Style Transfer", CVPR 2024).

In the self-attention of the UNet decoder (SD1.5 output blocks 6-11) the photo being styled keeps its queries and
attends to the painting's keys and values at the same noise level:

    q~  = gamma * q_content + (1 - gamma) * q_stylized            query preservation, gamma = 0.75
    out = softmax(T * q~ k_style^T / sqrt(d)) v_style             attention temperature T = 1.5

and the latent takes the painting latent's per-channel mean and std (AdaIN, Huang and Belongie 2017), which
carries the painting's colour tone. gamma may vary over the injected blocks and the steps (Scheduled Style
Injection, Kulkarni 2026, reports ArtFID 27.04 against StyleID's 28.80 with StyleID's pipeline); the default is
the paper's constant 0.75.

Two modes:
- `paper`: StyleID's algorithm along the sampler's own sigmas. A SAMPLER_SAMPLE wrapper DDIM-inverts the photo
  and the painting (deterministic, the negative prompt's conditioning: empty in the bundled workflow, as StyleID's
  unconditional inversion), keeping the photo's queries and the painting's keys/values per sigma and block, and
  hands the sampler the AdaIN of the two inverted latents as its start (the seed's noise is not used). Sampling then
  runs one UNet row per photo and prompt; the features come from the inversion.
- `fast`: no inversion. The photo's and the painting's latents, noised to the step's sigma with one fixed noise,
  ride in the UNet batch as reference rows, and the latent being denoised is AdaIN'd toward the noised painting at
  every injected step.
In both modes the painting's latent is encoded once per (painting, VAE, size) and its features are computed once
per (painting, model, conditioning, sigmas), kept in a process-wide LRU cache of at most FEATURE_CACHE_BYTES, so a
folder of photos pays for the painting once: per step and photo, 2 UNet rows at CFG 1 (paper: inversion +
sampling; fast: photo reference + the photo).

The tensor functions (attention, blend_queries, styled_attention, adain, invert, ...) need no ComfyUI; every ComfyUI
internal is reached through nodes/host.py.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import host

logger = logging.getLogger(__name__)

INJECTION_ATTACHMENT = host.INJECTION_ATTACHMENT  # the attachment and sampler-wrapper key of the injection
ROWS_KEY = "stylora_style_rows"  # transformer_options key the model wrapper sets for the attention patches
RUN_KEY = "stylora_style_run"  # transformer_options key the sampler wrapper sets for the model wrapper
NOISE_SEED = 0  # fast mode: one fixed noise for the reference rows, the same at every step (features do not flicker)
TRANSFORMER_OUTPUT_BLOCKS = range(3, 12)  # SD1.5 output blocks that carry a transformer
PAPER_BLOCKS = "6-11"
MODES = ("paper", "fast")
DEFAULT_MODE = "paper"
# The painting-feature cache's bound. Per sigma, SD1.5's blocks 6-11 hold about 47 MB of keys and values for one
# 512x512 painting (fp32), so 2 GiB keeps about 40 sampled sigmas: one painting at 40 steps, or two at 20.
FEATURE_CACHE_BYTES = 2 * 1024 ** 3
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




def parse_gamma_schedule(text: str) -> tuple[tuple[int, float, float], ...]:
    """'6-8:0.9>0.6, 9-11:0.75' -> per output block (block, gamma at the first sampled step, gamma at the last),
    linear in between; blocks not named keep the constant gamma. '' -> () (the constant everywhere)."""
    out: dict[int, tuple[float, float]] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        blocks, _, values = part.partition(":")
        first, _, last = values.partition(">")
        try:
            lo, hi = float(first), float(last or first)
        except ValueError:
            raise ValueError(f"gamma_schedule: {part!r} is not like '6-8:0.9>0.6' or '9-11:0.75'") from None
        if not (0 <= lo <= 1 and 0 <= hi <= 1):
            raise ValueError(f"gamma_schedule: {part!r}: gammas must be in 0..1")
        for i in parse_blocks(blocks):
            out[i] = (lo, hi)
    return tuple((i, lo, hi) for i, (lo, hi) in sorted(out.items()))


def gamma_at(gamma: float, schedule: tuple[tuple[int, float, float], ...], block: int, progress: float) -> float:
    """gamma of `block` at `progress` (0: the first sampled step, 1: the last) under `schedule`; else `gamma`."""
    for i, first, last in schedule:
        if i == block:
            return first + (last - first) * progress
    return gamma


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A content hash of tensors (shape, dtype and values), for cache keys."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class FeatureCache:
    """Least-recently-used map of feature dicts, at most `max_bytes` of tensors in all; an entry larger than the
    bound is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.entries: collections.OrderedDict[Any, tuple[dict, int]] = collections.OrderedDict()

    def get(self, key: Any) -> dict | None:
        if key not in self.entries:
            return None
        self.entries.move_to_end(key)
        return self.entries[key][0]

    def put(self, key: Any, value: dict) -> None:
        size = _nbytes(value)
        if key in self.entries:
            self.nbytes -= self.entries.pop(key)[1]
        if size > self.max_bytes:
            return
        self.entries[key] = (value, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            self.nbytes -= self.entries.popitem(last=False)[1][1]

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


PAINTING_FEATURES = FeatureCache(FEATURE_CACHE_BYTES)  # shared by every Style From Image in the process


def encoded_painting(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """vae.encode(pixels): pixels [S, H, W, 3] in 0..1 -> latents [S, 4, H/8, W/8], taken from PAINTING_FEATURES
    when this same VAE object encoded these pixels before (a weak reference tells a VAE that was freed and another
    one that took its id apart)."""
    key = ("latent", tensor_digest(pixels), id(vae))
    kept = PAINTING_FEATURES.get(key)
    if kept is not None and kept["vae"]() is vae:
        return kept["latent"]
    latent = vae.encode(pixels)
    PAINTING_FEATURES.put(key, {"vae": weakref.ref(vae), "latent": latent})
    return latent


@dataclasses.dataclass(eq=False)
class StyleRun:
    """One sampling run's state, handed from the sampler wrapper to the model wrapper (mutable: the inversion fills
    `record` step by step)."""

    model_key: tuple = dataclasses.field(metadata={"help": "the UNet's identity and patches, for the cache"})
    sigmas: list[float] = dataclasses.field(metadata={"help": "the sampled sigmas, decreasing"})
    record: dict | None = dataclasses.field(default=None, metadata={
        "help": "inversion: {(step, block): kept tensors} being filled; None while sampling"})
    keep: str = dataclasses.field(default="q", metadata={"help": "inversion: 'q' (photo) or 'kv' (painting)"})
    step: int = dataclasses.field(default=0, metadata={"help": "inversion: index of the sigma being evaluated"})
    photo: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "paper: {(step, block): (q,)} photo queries [B, T, C]"})
    painting: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "paper: {(step, block): (k, v)} painting keys/values [S, T, C] and 'latent' [S, 4, h, w]"})

    def step_of(self, sigma: float) -> int:
        """Index of the sampled sigma nearest to `sigma` (in log sigma): samplers that evaluate between the
        schedule's sigmas (heun, dpm_2, ...) take the nearest step's features."""
        logs = torch.tensor(self.sigmas).clamp_min(1e-8).log()
        return int((logs - math.log(max(sigma, 1e-8))).abs().argmin())


def invert(predict: Callable[[torch.Tensor, float, dict], torch.Tensor], latent: torch.Tensor, sigmas: list[float],
           model_options: dict, keep: str) -> tuple[torch.Tensor, dict]:
    """Deterministic DDIM inversion of a clean latent along the sampled sigmas, as StyleID inverts.

    latent: [B, 4, h, w], model space (sigma 0). sigmas: the sampled sigmas s_0 > ... > s_{N-1} > 0. predict(x,
    sigma, model_options) -> the model's denoised latent (k-diffusion scaling: x = x0 + sigma * eps). Step i goes from
    the level below (s_{i+1}, 0 for the clean latent) up to s_i: the UNet sees the latent at the level below labelled
    with timestep s_i (StyleID's inversion, the DDIM-inversion update), its features at s_i are kept (`keep`: 'q'
    or 'kv'), and x_i = x0_pred + s_i * eps. Returns (the latent at s_0 [B, 4, h, w], {(i, block): tensors}).
    """
    run = StyleRun(model_key=(), sigmas=list(sigmas), record={}, keep=keep)
    options = host.with_transformer_option(model_options, RUN_KEY, run)
    x, level = latent, 0.0
    for i in reversed(range(len(sigmas))):
        s = float(sigmas[i])
        run.step = i
        # The UNet's input is x / sqrt(1 + sigma^2) (EPS scaling): rescaled so that it sees the VP latent of the
        # level below, x / sqrt(1 + level^2), while labelled s.
        x_in = x * math.sqrt((1 + s * s) / (1 + level * level))
        eps = (x_in - predict(x_in, s, options)) / s
        x = x + (s - level) * eps
        level = s
    return x, run.record


def _resized(latent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """latent on like's device and dtype, resized to its h x w (bilinear) when they differ."""
    latent = latent.to(like.device, like.dtype)
    if latent.shape[-2:] != like.shape[-2:]:
        latent = F.interpolate(latent, size=like.shape[-2:], mode="bilinear", align_corners=False)
    return latent


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


def _row_tensors(value: Any, n: int, row: int) -> list[torch.Tensor]:
    """Row `row` of every batch tensor in `value` (nested), for the conditioning part of a cache key."""
    if isinstance(value, torch.Tensor):
        return [value[row]] if value.ndim and value.shape[0] == n else []
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _row_tensors(value[k], n, row)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _row_tensors(v, n, row)]
    return []


@dataclasses.dataclass(frozen=True, eq=False)
class StyleInjection:
    """What StyleFromImage installs: a model wrapper (`__call__`, ComfyUI's model_function_wrapper) and a sampler
    wrapper (`sample`, ComfyUI's SAMPLER_SAMPLE wrapper).

    Holds tensors but is never changed after creation, so ComfyUI's clone() shares it (__deepcopy__).
    """

    style: torch.Tensor = dataclasses.field(metadata={"help": "painting latents [S, 4, h, w], model space"})
    content: torch.Tensor = dataclasses.field(metadata={"help": "photo latents [B, 4, h, w], model space (fast)"})
    mode: str = dataclasses.field(default=DEFAULT_MODE, metadata={"help": "'paper' (inversion) or 'fast'"})
    blocks: tuple[int, ...] = dataclasses.field(default=(6, 7, 8, 9, 10, 11),
                                                metadata={"help": "output blocks whose self-attention is injected"})
    gamma: float = dataclasses.field(default=0.75, metadata={"help": "query preservation (StyleID: 0.75)"})
    gamma_schedule: tuple[tuple[int, float, float], ...] = dataclasses.field(default=(), metadata={
        "help": "per block (block, gamma at the first step, at the last); others keep gamma"})
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

    def rescaled_onto(self, model: Any, factor: float) -> None:
        """On `model` (a clone carrying this injection): this injection at `factor` times its strength; factor 0
        removes the wrappers, the patches and the record, so the model behaves as the one StyleFromImage was given,
        bit for bit (Style Strength's ramp)."""
        if factor:
            install(model, dataclasses.replace(self, strength=self.strength * factor))
            return
        host.remove_style_injection(model, self.inner, self.blocks, INJECTION_ATTACHMENT)

    @functools.cached_property
    def style_digest(self) -> str:
        return tensor_digest(self.style)

    def _model(self, apply_model: Callable, args: dict) -> torch.Tensor:
        if self.inner is not None:
            return self.inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def _with_rows(self, args: dict, rows: dict) -> dict:
        c = dict(args["c"])
        c["transformer_options"] = {**c.get("transformer_options", {}), ROWS_KEY: rows}
        return {**args, "c": c}

    def _gammas(self, progress: float) -> dict[int, float]:
        return {i: gamma_at(self.gamma, self.gamma_schedule, i, progress) for i in self.blocks}

    def _noised(self, latent: torch.Tensor, sigma: float, like: torch.Tensor) -> torch.Tensor:
        """fast: latent resized to like's h x w, plus sigma * the fixed noise (SD1.5's EPS noise scaling)."""
        latent = _resized(latent, like)
        gen = torch.Generator().manual_seed(NOISE_SEED)
        noise = torch.randn((1, *latent.shape[1:]), generator=gen).to(like.device, like.dtype)
        return latent + sigma * noise

    def __call__(self, apply_model: Callable, args: dict) -> torch.Tensor:
        run = args["c"].get("transformer_options", {}).get(RUN_KEY)
        sigma = float(args["timestep"].max())
        # 1. Inversion (paper): plain attention everywhere, the features kept for the sampling.
        if run is not None and run.record is not None:
            return self._model(apply_model, self._with_rows(args, {"record": run.record, "step": run.step,
                                                                   "keep": run.keep}))
        # 2. Outside the injected steps, or at strength 0: the model as it was.
        if self.strength == 0 or not self.sigma_end <= sigma <= self.sigma_start:
            return self._model(apply_model, args)
        if self.mode == "paper":
            if run is None or not run.photo:
                logger.warning("Style From Image (paper mode): this sampling ran without ComfyUI's sampler wrapper "
                               "(no inversion); the step is left uninjected")
                return self._model(apply_model, args)
            return self._paper_step(apply_model, args, run, sigma)
        return self._fast_step(apply_model, args, run, sigma)

    def _paper_step(self, apply_model: Callable, args: dict, run: StyleRun, sigma: float) -> torch.Tensor:
        """One sampling call in paper mode: only the rows being denoised; queries, keys and values from the
        inversion at the nearest sampled sigma."""
        x, cond_or_uncond = args["input"], args["cond_or_uncond"]
        n = x.shape[0]
        b = max(1, n // max(1, len(cond_or_uncond)))
        image = torch.arange(n) % b
        i = run.step_of(sigma)
        photos, paintings = run.photo[(i, self.blocks[0])][0].shape[0], run.painting["latent"].shape[0]
        rows = {"n": n, "gamma": self._gammas(i / max(1, len(run.sigmas) - 1)), "temperature": self.temperature,
                "strength": self.strength, "photo_pick": image % photos, "style_pick": image % paintings,
                "q": {blk: run.photo[(i, blk)][0] for blk in self.blocks},
                "kv": {blk: run.painting[(i, blk)] for blk in self.blocks}}
        return self._model(apply_model, self._with_rows(args, rows))

    def _fast_step(self, apply_model: Callable, args: dict, run: StyleRun | None, sigma: float) -> torch.Tensor:
        """One sampling call in fast mode: the rows being denoised, then the photos noised to sigma, then (when the
        painting's keys/values at this sigma are not cached) the paintings noised to sigma."""
        x, t, c, cond_or_uncond = args["input"], args["timestep"], args["c"], args["cond_or_uncond"]
        # 1. Rows: n being denoised (chunks of b, one chunk per cond/uncond), then photos, then paintings.
        n = x.shape[0]
        b = max(1, n // max(1, len(cond_or_uncond)))
        image = torch.arange(n, device=x.device) % b
        ref = self._noised(self.content, sigma, x)
        sty = self._noised(self.style, sigma, x)
        # 2. AdaIN of the rows being denoised toward the painting at the same noise level.
        w = self.adain * self.strength
        if w:
            x = x + w * (adain(x, sty[image % sty.shape[0]]) - x)
        # 3. The painting's keys/values at this sigma: cached per (painting, model, conditioning, sigma, blocks).
        row = cond_or_uncond.index(1) * b if 1 in cond_or_uncond else 0
        c_rows = {k: v for k, v in c.items() if k != "transformer_options"}
        key = None if run is None else (
            "fast", self.style_digest, run.model_key, tensor_digest(*_row_tensors(c_rows, n, row)),
            round(sigma, 6), self.blocks)
        cached = None if key is None else PAINTING_FEATURES.get(key)
        extra = [ref] if cached is not None else [ref, sty]
        rows = {"n": n, "gamma": self._gammas(0.0 if run is None else
                                              run.step_of(sigma) / max(1, len(run.sigmas) - 1)),
                "temperature": self.temperature, "strength": self.strength,
                "ref_index": image % ref.shape[0] + n, "style_pick": image % sty.shape[0]}
        if cached is not None:
            rows["kv"] = cached
        else:
            rows["style_rows"] = (n + ref.shape[0], n + ref.shape[0] + sty.shape[0])
            rows["store"] = {}
        # 4. One UNet pass over all rows; the reference rows take the negative prompt's conditioning.
        count = sum(e.shape[0] for e in extra)
        c2 = _extend_rows(c_rows, n, row, count)
        c2["transformer_options"] = {**c.get("transformer_options", {}), ROWS_KEY: rows}
        out = self._model(apply_model, {"input": torch.cat([x, *extra]), "timestep": torch.cat(
            [t, t[:1].expand(count)]), "c": c2, "cond_or_uncond": cond_or_uncond})
        if key is not None and cached is None:
            PAINTING_FEATURES.put(key, rows["store"])
        return out[:n]

    def paper_start(self, predict: Callable[[torch.Tensor, float, dict], torch.Tensor], latent_image: torch.Tensor,
                    run: StyleRun, model_options: dict, conditioning_key: str) -> torch.Tensor:
        """paper: invert the painting (or take it from the cache) and the photo along run.sigmas, keep their
        features on `run`, and return the sampler's start: the photo's inverted latent moved toward the painting's
        channel statistics (AdaIN, times adain * strength). latent_image: [B, 4, h, w] model space, clean."""
        # 1. The painting: inverted latent and keys/values, once per (painting, model, conditioning, sigmas, blocks).
        key = ("paper", self.style_digest, run.model_key, conditioning_key, tuple(run.sigmas), self.blocks)
        painting = PAINTING_FEATURES.get(key)
        if painting is None:
            style_t, kv = invert(predict, _resized(self.style, latent_image), run.sigmas, model_options, "kv")
            painting = {"latent": style_t, **{k: v for k, v in kv.items() if k[1] in self.blocks}}
            PAINTING_FEATURES.put(key, painting)
        # 2. The photo, its queries kept.
        photo_t, q = invert(predict, latent_image, run.sigmas, model_options, "q")
        run.photo = {k: v for k, v in q.items() if k[1] in self.blocks}
        run.painting = painting
        # 3. The start: AdaIN of the two inverted latents (photo i takes painting i mod S).
        style_t = painting["latent"][torch.arange(photo_t.shape[0]) % painting["latent"].shape[0]]
        w = self.adain * self.strength
        return photo_t + w * (adain(photo_t, style_t.to(photo_t)) - photo_t)

    def sample(self, executor: Callable, guider: Any, sigmas: torch.Tensor, extra_args: dict, callback: Any,
               noise: torch.Tensor, latent_image: torch.Tensor, denoise_mask: Any, disable_pbar: bool) -> torch.Tensor:
        """ComfyUI's SAMPLER_SAMPLE wrapper: the run's state for the model wrapper; in paper mode the inversion and
        the start latent (given to the sampler as the noise that lands on it)."""
        sampled = [float(s) for s in sigmas[:-1]]
        if self.strength == 0 or not sampled:
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        # 1. The run: which model (for the cache) and the sigmas (for the features' steps).
        run = StyleRun(model_key=host.sampler_model_key(guider), sigmas=sampled)
        model_options = extra_args["model_options"]
        # 2. paper: inversion under the negative prompt's conditioning, then the AdaIN start.
        if self.mode == "paper":
            conds = host.negative_conditioning(guider)
            start = self.paper_start(_Predict(guider, conds), latent_image, run, model_options,
                                     tensor_digest(*host.conditioning_tensors(conds)))
            noise = host.noise_for_start(executor.class_obj, guider, sigmas, latent_image, start)
        extra_args = {**extra_args, "model_options": host.with_transformer_option(model_options, RUN_KEY, run)}
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


@dataclasses.dataclass(frozen=True)
class _Predict:
    """predict(x, sigma, model_options) for `invert`: the guider's model under one conditioning."""

    guider: Any
    conds: list

    def __call__(self, x: torch.Tensor, sigma: float, model_options: dict) -> torch.Tensor:
        return host.predict_denoised(self.guider, self.conds, x, sigma, model_options)


def _plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    return host.plain_attention(q, k, v, extra_options, attention)


def styled_attn1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI attn1 replace patch (after the q/k/v projections). Inversion: plain attention, q or k/v kept.
    Sampling: the rows being denoised (the first n) take the injected attention; reference rows and calls without
    StyleInjection's rows get plain attention."""
    rows = extra_options.get(ROWS_KEY)
    if rows is None:
        return _plain(q, k, v, extra_options)
    block = host.attention_block(extra_options)
    if "record" in rows:
        rows["record"][(rows["step"], block)] = (q,) if rows["keep"] == "q" else (k, v)
        return _plain(q, k, v, extra_options)
    n, heads = rows["n"], extra_options["n_heads"]
    q_content = rows["q"][block][rows["photo_pick"]] if "q" in rows else q[rows["ref_index"].to(q.device)]
    if "kv" in rows:
        k_style, v_style = rows["kv"][block]
    else:
        lo, hi = rows["style_rows"]
        k_style, v_style = k[lo:hi], v[lo:hi]
        rows["store"][block] = (k_style, v_style)
    pick = rows["style_pick"].to(k_style.device)
    out = styled_attention(q_content.to(q), q[:n], k_style[pick].to(q), v_style[pick].to(q), rows["gamma"][block],
                           rows["temperature"], heads)
    if rows["strength"] < 1:
        out = rows["strength"] * out + (1 - rows["strength"]) * _plain(q[:n], k[:n], v[:n], extra_options)
    if q.shape[0] == n:
        return out.to(q.dtype)
    return torch.cat([out.to(q.dtype), _plain(q[n:], k[n:], v[n:], extra_options)])


def install(model: Any, injection: StyleInjection) -> None:
    """Put the model wrapper, the attention patches and the sampler wrapper on `model` (a clone) and record the
    injection on it."""
    host.install_style_injection(model, injection, styled_attn1, injection.blocks, injection.sample,
                                 INJECTION_ATTACHMENT)


def rescale_injection(model: Any, factor: float) -> None:
    """On a clone: the recorded injection's strength times `factor`; factor 0 removes the wrappers, the patches and
    the record, so the model behaves as the one StyleFromImage was given, bit for bit."""
    host.rescale_style_injection(model, factor, host.STYLE_IMAGE)


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
                   "latent takes the painting's colour statistics (AdaIN). paper: the photo and the painting are "
                   "DDIM-inverted along the sampler's sigmas and sampling starts from their AdaIN (the seed is not "
                   "used); fast: noised reference rows, no inversion. Either costs about twice plain img2img at "
                   "CFG 1; the painting's features are computed once and reused across photos.")

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
                "mode": (list(MODES), {"default": DEFAULT_MODE,
                                       "tooltip": "paper: StyleID as published (DDIM inversion of photo and "
                                                  "painting along the sampler's sigmas, start from their AdaIN; "
                                                  "deterministic, the seed is not used). fast: no inversion, "
                                                  "noised reference features (the seed's noise is sampled)."}),
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
                "gamma_schedule": ("STRING", {"default": "",
                                              "tooltip": "gamma per block and over the steps (Scheduled Style "
                                                         "Injection, Kulkarni 2026), e.g. '6-8:0.9>0.6, 9-11:0.7' "
                                                         "(first step > last step, linear); empty: the constant "
                                                         "gamma everywhere."}),
            },
        }

    def apply(self, model: Any, style_image: torch.Tensor, vae: Any, latent: dict, mode: str = DEFAULT_MODE,
              gamma: float = 0.75, temperature: float = 1.5, adain: float = 1.0, blocks: str = PAPER_BLOCKS,
              start_percent: float = 0.0, end_percent: float = 1.0, gamma_schedule: str = ""):
        # 1. Settings.
        if mode not in MODES:
            raise ValueError(f"StyleFromImage: mode must be one of {MODES}, got {mode!r}")
        if not 0 <= gamma <= 1:
            raise ValueError(f"StyleFromImage: gamma must be in 0..1, got {gamma}")
        if not temperature > 0:
            raise ValueError(f"StyleFromImage: temperature must be > 0, got {temperature}")
        if not 0 <= start_percent <= end_percent <= 1:
            raise ValueError(f"StyleFromImage: need 0 <= start_percent <= end_percent <= 1, got {start_percent}, "
                             f"{end_percent}")
        block_ids = parse_blocks(blocks)
        schedule = parse_gamma_schedule(gamma_schedule)
        taken = host.attn1_replaced_blocks(model, block_ids)
        if taken:
            raise ValueError(f"StyleFromImage: output blocks {taken} already have an attention patch (another "
                             "style-from-image or attention node upstream); chain only one")
        # 2. The painting, cropped to the photo's aspect and encoded at the photo's size (once per painting, VAE
        #    and size: a folder of photos encodes it once).
        samples = latent["samples"]
        pixels = fit_to(style_image[..., :3], samples.shape[-2] * 8, samples.shape[-1] * 8)
        style = encoded_painting(vae, pixels)
        # 3. Both latents in the model's space (SD1.5: times 0.18215), as the sampler sees the photo's.
        style = model.model.process_latent_in(style.float()).cpu()
        content = model.model.process_latent_in(samples.float()).cpu()
        # 4. The steps to inject, as sigmas (ComfyUI's percent_to_sigma, as ControlNet's start/end use).
        sigma_start, sigma_end = math.inf, 0.0
        if start_percent > 0 or end_percent < 1:
            sampling = model.get_model_object("model_sampling")
            sigma_start, sigma_end = sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)
        # 5. On a clone (the input model stays as it is): wrappers, attention patches, and the record of them.
        out = model.clone()
        install(out, StyleInjection(style=style, content=content, mode=mode, blocks=block_ids, gamma=gamma,
                                    gamma_schedule=schedule, temperature=temperature, adain=adain,
                                    sigma_start=sigma_start, sigma_end=sigma_end,
                                    inner=host.model_function_wrapper(model)))
        return (out,)
