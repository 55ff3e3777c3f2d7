"""What the nodes need from ComfyUI's internals, checked where they touch them.

The pack is tested with ComfyUI 0.3.64 (backend); ComfyUI's internals (`comfy.*`, `folder_paths`, ModelPatcher's
methods and fields) are not a stable API. Each node calls `has_module` / `has_attrs` just before it uses one: when a
piece is absent (a renamed function, a moved module), the log says once which piece and which node needs it, so a
person reading ComfyUI's console sees the cause before the AttributeError. The nodes then go on as before (a piece
may have moved only for a feature the run does not use).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

logger = logging.getLogger(__name__)

TESTED_WITH = "ComfyUI 0.3.64"
_warned: set[str] = set()  # pieces already reported: one warning per piece per process


def has_module(module: str, *names: str, used_by: str) -> bool:
    """True when `module` imports and has every attribute in `names`; otherwise warns once per missing piece
    (e.g. `comfy.sd.load_lora_for_models`), naming it and `used_by` (the node), and returns False. Outside ComfyUI
    (its top-level package does not import: the pack's own tests, the CLI) there is no host to report on: False,
    silently."""
    try:
        importlib.import_module(module.split(".")[0])
    except ImportError:
        return False
    try:
        found = importlib.import_module(module)
    except ImportError:
        return _report([module], used_by)
    return _report([f"{module}.{n}" for n in names if not hasattr(found, n)], used_by)


def has_attrs(obj: Any, label: str, *names: str, used_by: str) -> bool:
    """True when `obj` has every attribute in `names`; otherwise warns once per missing piece (`label.name`, e.g.
    `ModelPatcher.patches_uuid`), naming it and `used_by`, and returns False."""
    return _report([f"{label}.{n}" for n in names if not hasattr(obj, n)], used_by)


def _report(missing: list[str], used_by: str) -> bool:
    for piece in missing:
        if piece not in _warned:
            _warned.add(piece)
            logger.warning("Stylora: ComfyUI has no %s, which %s needs (tested with %s); this node may fail or "
                           "behave differently on this ComfyUI version", piece, used_by, TESTED_WITH)
    return not missing


# === Model folders and file lookups (folder_paths) ===========================================================


# === LoRA patches on ModelPatcher and CLIP (Load Style LoRA, Style Strength) =================================


# === The VAE (Content Encode's float32 copy) ==================================================================


# === Devices, progress, Cancel and memory (Style Metrics, Train Style) ========================================


# === Attention patches and the model wrapper (Style From Image) ===============================================

# The sampler wrapper (ComfyUI's SAMPLER_SAMPLE wrapper, comfy/patcher_extension.py) sees the sampler's sigmas, its
# clean starting latent and the guider: Style From Image's paper mode inverts there and hands the sampler its start.
SAMPLER_SAMPLE = "sampler_sample"  # comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE


def install_style_injection(model: Any, wrapper: Any, attn_patch: Any, blocks: tuple[int, ...], sampler_wrapper: Any,
                            key: str) -> None:
    """On a ModelPatcher clone: `wrapper` as model_function_wrapper, `attn_patch` as the attn1 replace patch of
    output blocks `blocks` (transformer 0), `sampler_wrapper` as the SAMPLER_SAMPLE wrapper under `key` (replacing
    one of ours already there), and `wrapper` recorded as attachment `key`."""
    has_attrs(model, "ModelPatcher", "set_model_unet_function_wrapper", "set_model_attn1_replace", "set_attachments",
              "add_wrapper_with_key", "remove_wrappers_with_key", used_by="Style From Image")
    has_module("comfy.ldm.modules.attention", "optimized_attention", used_by="Style From Image")
    model.set_model_unet_function_wrapper(wrapper)
    for i in blocks:
        model.set_model_attn1_replace(attn_patch, "output", i, 0)
    model.remove_wrappers_with_key(SAMPLER_SAMPLE, key)
    model.add_wrapper_with_key(SAMPLER_SAMPLE, key, sampler_wrapper)
    model.set_attachments(key, wrapper)


def remove_style_injection(model: Any, inner: Any, blocks: tuple[int, ...], key: str) -> None:
    """Undo install_style_injection on a clone: the model wrapper it had before (`inner`, or none), the attn1
    patches of `blocks`, our sampler wrapper and the attachment."""
    if inner is None:
        model.model_options.pop("model_function_wrapper", None)
    else:
        model.model_options["model_function_wrapper"] = inner
    to = model.model_options["transformer_options"]
    replace = {k: v for k, v in to["patches_replace"]["attn1"].items() if k not in {("output", i, 0) for i in blocks}}
    to["patches_replace"] = {**to["patches_replace"], "attn1": replace}
    model.remove_wrappers_with_key(SAMPLER_SAMPLE, key)
    model.remove_attachments(key)


def plain_attention(q: Any, k: Any, v: Any, extra_options: dict, fallback: Any) -> Any:
    """What a self-attention block computes without a replace patch: ComfyUI's optimized attention, or
    `fallback(q, k, v, heads)` outside ComfyUI."""
    try:
        from comfy.ldm.modules.attention import optimized_attention
    except ImportError:
        return fallback(q, k, v, extra_options["n_heads"])
    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def attention_block(extra_options: dict) -> int:
    """The output block number an attn1 patch is running in (ComfyUI passes ("output", number))."""
    return int(extra_options["block"][1])


def sampler_model_key(guider: Any) -> tuple:
    """What the UNet's weights are, for caching features: the BaseModel's identity and the patcher's patches_uuid
    (a LoRA applied or rescaled gives a new one)."""
    patcher = guider.model_patcher
    return id(patcher.model), str(getattr(patcher, "patches_uuid", ""))


def negative_conditioning(guider: Any) -> list:
    """The guider's processed negative conditioning (the positive when it has none): the prompt an inversion runs
    with."""
    conds = getattr(guider, "conds", {})
    return conds.get("negative") or conds.get("positive") or []


def conditioning_tensors(conds: list) -> list:
    """The tensors in processed conditioning entries (`model_conds[*].cond`), for a cache key."""
    return [c.cond for entry in conds for _, c in sorted(entry.get("model_conds", {}).items())
            if hasattr(c, "cond") and hasattr(c.cond, "shape")]


def predict_denoised(guider: Any, conds: list, x: Any, sigma: float, model_options: dict) -> Any:
    """The model's denoised prediction for latent x [B, 4, h, w] at `sigma` under `conds` alone (no CFG; one UNet
    row per latent), through ComfyUI's calc_cond_batch, so model wrappers and patches run as in sampling."""
    has_module("comfy.samplers", "calc_cond_batch", used_by="Style From Image")
    import comfy.samplers
    import torch

    timestep = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
    return comfy.samplers.calc_cond_batch(guider.inner_model, [conds], x, timestep, model_options)[0]


def noise_for_start(sampler: Any, guider: Any, sigmas: Any, latent_image: Any, start: Any) -> Any:
    """The noise that makes the sampler's first latent (model_sampling.noise_scaling(sigmas[0], noise, latent_image))
    equal `start`; masked regions are re-noised with it."""
    import torch

    sampling = guider.inner_model.model_sampling
    max_denoise = sampler.max_denoise(guider, sigmas)
    zero = torch.zeros_like(latent_image)
    scale = sampling.noise_scaling(sigmas[0], torch.ones_like(latent_image), zero.clone(), max_denoise)
    return (start - latent_image) / scale


def with_transformer_option(model_options: dict, key: str, value: Any) -> dict:
    """A copy of `model_options` with transformer_options[key] = value. ComfyUI merges transformer_options into
    each UNet call by copying nested dicts, so `value` should be an object (passed on by reference), not a dict."""
    return {**model_options, "transformer_options": {**model_options.get("transformer_options", {}), key: value}}
