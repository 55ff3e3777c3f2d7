"""Every ComfyUI internal the pack touches, each reached through one function here with a feature check.

The pack is tested with ComfyUI 0.3.64 (backend); ComfyUI's internals (`comfy.*`, `folder_paths`, ModelPatcher's
methods and fields) are not a stable API. Each function below checks the pieces it is about to use: when ComfyUI is
there but a piece is absent (a renamed function, a moved module, a changed field), it raises HostMismatch, whose
one line names the missing piece, the node that needs it and the tested ComfyUI version, before anything is changed
(not an AttributeError deep in sampling). Outside ComfyUI (its top-level package does not import: the pack's own
tests, the CLI) the lookups return nothing or a stand-in, as each docstring says, and what needs ComfyUI itself
raises HostUnavailable. No other module of the pack imports `comfy` or `folder_paths` or reads ModelPatcher's
fields. `has_module` / `has_attrs` only warn (once per missing piece) and return a bool, for code that can go on
without the piece.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TESTED_WITH = "ComfyUI 0.3.64"
_warned: set[str] = set()  # pieces already reported: one warning per piece per process


class HostMismatch(RuntimeError):
    """ComfyUI is there but lacks an internal the pack uses: the message names the pieces, the node and the
    tested version."""

    def __init__(self, missing: list[str], used_by: str):
        self.missing, self.used_by = missing, used_by
        super().__init__(f"Stylora: this ComfyUI has no {', '.join(missing)}, which {used_by} needs (Stylora is "
                         f"tested with {TESTED_WITH}); use that version or a Stylora release made for this one")


class HostUnavailable(RuntimeError):
    """Something that only works inside ComfyUI was asked for outside it."""


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


def _module(name: str, *attrs: str, used_by: str, needed: bool = False) -> Any:
    """ComfyUI's module `name` after checking it has `attrs`. Outside ComfyUI (the top-level package of `name` does
    not import): None, or HostUnavailable when `needed`. ComfyUI there but the module or an attribute missing:
    HostMismatch."""
    try:
        importlib.import_module(name.split(".")[0])
    except ImportError:
        if needed:
            raise HostUnavailable(f"{used_by}: ComfyUI's {name} is not importable (the node runs inside "
                                  "ComfyUI)") from None
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise HostMismatch([name], used_by) from None
    _require(module, name, attrs, used_by)
    return module


def _require(obj: Any, label: str, attrs: tuple[str, ...], used_by: str) -> None:
    """HostMismatch naming `label.attr` for each of `attrs` that `obj` lacks."""
    missing = [f"{label}.{a}" for a in attrs if not hasattr(obj, a)]
    if missing:
        raise HostMismatch(missing, used_by)


# === Model folders and file lookups (folder_paths) ===========================================================

STYLE_FOLDER_KEY = "stylora"  # folder_paths key of models/styles (namespaced: ComfyUI has no generic "styles")
METRICS_FOLDER_KEY = "stylora_metrics"  # folder_paths key of models/stylora_metrics (Style Metrics' weights)
MODEL_FOLDERS = ((STYLE_FOLDER_KEY, "styles"), (METRICS_FOLDER_KEY, "stylora_metrics"))  # (key, folder in models/)
STYLE_KEYS = (STYLE_FOLDER_KEY, "loras")  # where style files are looked up, in this order


def register_model_folders(folder_paths: Any = None) -> None:
    """Add models/styles under the key 'stylora' and models/stylora_metrics under 'stylora_metrics' to `folder_paths`
    (default: ComfyUI's; nothing outside it), each merged with any extra_model_paths.yaml entry for its key and
    accepting the model file extensions ComfyUI accepts."""
    used_by = "the models/styles folder"
    fp = folder_paths if folder_paths is not None else _module("folder_paths", used_by=used_by)
    if fp is None:
        return
    _require(fp, "folder_paths", ("models_dir", "folder_names_and_paths", "supported_pt_extensions"), used_by)
    for key, folder in MODEL_FOLDERS:
        default = os.path.join(fp.models_dir, folder)
        entry = fp.folder_names_and_paths.get(key)
        if entry is None:
            fp.folder_names_and_paths[key] = ([default], set(fp.supported_pt_extensions))
        elif default not in entry[0]:
            entry[0].append(default)


def style_files() -> list[str]:
    """Style files ComfyUI can see: models/styles first, then models/loras (empty without ComfyUI)."""
    fp = _module("folder_paths", "folder_names_and_paths", "get_filename_list", used_by="Load Style LoRA")
    names: list[str] = []
    for key in STYLE_KEYS if fp is not None else ():
        if key in fp.folder_names_and_paths:
            names += [n for n in fp.get_filename_list(key) if n not in names]
    return names


def style_path(name: str) -> str:
    """The file of style `name`: models/styles first, then models/loras. FileNotFoundError when in neither."""
    fp = _module("folder_paths", "folder_names_and_paths", "get_full_path", used_by="Load Style LoRA", needed=True)
    for key in STYLE_KEYS:
        if key in fp.folder_names_and_paths:
            path = fp.get_full_path(key, name)
            if path:
                return path
    raise FileNotFoundError(f"LoadStyleLoRA: style {name!r} is in neither models/styles nor models/loras")


def metrics_folders() -> list[str]:
    """The folders of models/stylora_metrics (with extra_model_paths.yaml's), where Style Metrics' network weights
    are looked up first; empty outside ComfyUI or before the folder is registered."""
    fp = _module("folder_paths", "folder_names_and_paths", "get_folder_paths", used_by="Style Metrics' weights")
    if fp is None or METRICS_FOLDER_KEY not in fp.folder_names_and_paths:
        return []
    return list(fp.get_folder_paths(METRICS_FOLDER_KEY))


def checkpoint_names() -> list[str]:
    """ComfyUI's checkpoints list (empty without ComfyUI)."""
    fp = _module("folder_paths", "get_filename_list", used_by="Train Style")
    return fp.get_filename_list("checkpoints") if fp is not None else []


def checkpoint_file(name: str) -> str | None:
    """The file of checkpoint `name` in ComfyUI's checkpoints folders; None when it is not there (or no ComfyUI)."""
    fp = _module("folder_paths", "get_full_path", used_by="Train Style")
    return (fp.get_full_path("checkpoints", name) or None) if fp is not None else None


def input_folder() -> Path:
    """ComfyUI's input folder."""
    fp = _module("folder_paths", "get_input_directory", used_by="TrainStyle", needed=True)
    return Path(fp.get_input_directory())


def styles_folder() -> Path:
    """models/styles, where trained styles are written (the folder registered for Load Style LoRA)."""
    fp = _module("folder_paths", "models_dir", used_by="TrainStyle", needed=True)
    return Path(fp.models_dir) / dict(MODEL_FOLDERS)[STYLE_FOLDER_KEY]


def refresh_style_list() -> None:
    """Forget ComfyUI's cached list of styles, so Load Style LoRA lists a new one on the next look (ComfyUI also
    notices the folder's changed time; this does not depend on its resolution). Nothing outside ComfyUI."""
    fp = _module("folder_paths", "filename_list_cache", used_by="Train Style")
    if fp is not None:
        fp.filename_list_cache.pop(STYLE_FOLDER_KEY, None)


# === LoRA patches on ModelPatcher and CLIP (Load Style LoRA, Style Strength) =================================

STYLE_ATTACHMENT = "stylora_style_adapters"  # ModelPatcher attachment: the patch adapters LoadStyleLoRA added
# ModelPatcher attachment: one (calibration JSON or None, patch strength) per style LoadStyleLoRA applied
CALIBRATION_ATTACHMENT = "stylora_style_calibrations"


def attachment(model: Any, key: str, used_by: str) -> Any:
    """What is recorded on a ModelPatcher under `key` (None when nothing is)."""
    _require(model, "ModelPatcher", ("get_attachment",), used_by)
    return model.get_attachment(key)


def attach(model: Any, key: str, value: Any, used_by: str) -> None:
    """Record `value` on a ModelPatcher under `key`; it survives clones (shared by reference)."""
    _require(model, "ModelPatcher", ("set_attachments",), used_by)
    model.set_attachments(key, value)


def clip_patcher(clip: Any, used_by: str) -> Any:
    """The ModelPatcher of ComfyUI's CLIP (the text encoder's weights and patches)."""
    _require(clip, "CLIP", ("patcher",), used_by)
    return clip.patcher


def scale_patches(patches: dict[str, list[tuple]], ours: set[int], factor: float) -> dict[str, list[tuple]]:
    """ComfyUI patch lists with the strength of our patches (adapter id in `ours`) multiplied by `factor`.

    A patch is (strength_patch, adapter, strength_model, offset, function); factor 0 drops ours altogether,
    so the result is exactly the patches the model had before the style. Other patches are kept as they are.
    """
    out: dict[str, list[tuple]] = {}
    for key, plist in patches.items():
        new = []
        for p in plist:
            if id(p[1]) in ours:
                if factor == 0:
                    continue
                p = (p[0] * factor, *p[1:])
            new.append(p)
        if new:
            out[key] = new
    return out


def style_adapters(before: Any, after: Any, used_by: str = "Load Style LoRA") -> tuple:
    """Adapters of the style patches on ModelPatcher `after`: those recorded on `before` plus every patch `after`
    added to `before`'s."""
    for patcher in (before, after):
        _require(patcher, "ModelPatcher", ("patches",), used_by)
    known = tuple(attachment(before, STYLE_ATTACHMENT, used_by) or ())
    old = {id(p) for plist in before.patches.values() for p in plist}
    added = tuple(p[1] for plist in after.patches.values() for p in plist if id(p) not in old)
    return known + added


def scaled_clone(model: Any, factor: float, used_by: str) -> Any:
    """A clone of ModelPatcher `model` with the style's patches (those recorded under STYLE_ATTACHMENT) scaled by
    `factor` (0: removed) and a new patches_uuid, so ComfyUI bakes the weights again instead of reusing those of
    the unscaled model. A model without style patches is cloned as it is. `model` itself is left unchanged."""
    ours = attachment(model, STYLE_ATTACHMENT, used_by)
    _require(model, "ModelPatcher", ("clone", "patches") if ours else ("clone",), used_by)
    out = model.clone()
    if ours:
        out.patches = scale_patches(model.patches, {id(a) for a in ours}, factor)
        _new_patches_uuid(out, used_by)
    return out


def _new_patches_uuid(patcher: Any, used_by: str) -> None:
    """A new patches_uuid on a ModelPatcher whose patches changed. It is only written, so a patcher without one still
    gets the right patches: its absence is warned about (ComfyUI may then reuse the weights baked before)."""
    has_attrs(patcher, "ModelPatcher", "patches_uuid", used_by=used_by)
    patcher.patches_uuid = uuid.uuid4()


def rescale_clip_style(clip: Any, factor: float, used_by: str) -> Any:
    """A clone of ComfyUI's CLIP with its style patches (LoRAs with lora_te_* keys) scaled by `factor` (0: removed),
    as `scaled_clone` does for the model; `clip` itself when it carries none."""
    source = clip_patcher(clip, used_by)
    ours = attachment(source, STYLE_ATTACHMENT, used_by)
    if not ours:
        return clip
    _require(clip, "CLIP", ("clone",), used_by)
    _require(source, "ModelPatcher", ("patches",), used_by)
    out = clip.clone()
    out.patcher.patches = scale_patches(source.patches, {id(a) for a in ours}, factor)
    _new_patches_uuid(out.patcher, used_by)
    return out


def sd15_mismatch(model: Any, used_by: str = "Load Style LoRA") -> str | None:
    """None when ModelPatcher `model` holds an SD1.5 model; otherwise the name of its model config."""
    models = _module("comfy.supported_models", "SD15", used_by=used_by, needed=True)
    _require(model, "ModelPatcher", ("model",), used_by)
    _require(model.model, "BaseModel", ("model_config",), used_by)
    config = model.model.model_config
    return None if isinstance(config, models.SD15) else type(config).__name__


def lora_key_map(model: Any, clip: Any, used_by: str = "Load Style LoRA") -> dict[str, Any]:
    """ComfyUI's kohya-name -> weight-key map of the UNet and the text encoder (the one LoraLoader uses)."""
    lora = _module("comfy.lora", "model_lora_keys_unet", "model_lora_keys_clip", used_by=used_by, needed=True)
    _require(clip, "CLIP", ("cond_stage_model",), used_by)
    key_map = lora.model_lora_keys_unet(model.model, {})
    return lora.model_lora_keys_clip(clip.cond_stage_model, key_map)


def weight_shapes(model: Any, clip: Any, used_by: str = "Load Style LoRA") -> dict[str, tuple[int, ...]]:
    """Weight key -> shape of the UNet's and the text encoder's weights, the keys `lora_key_map` maps to."""
    _require(model.model, "BaseModel", ("state_dict",), used_by)
    _require(clip.cond_stage_model, "CLIP.cond_stage_model", ("state_dict",), used_by)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    return shapes


def load_lora(model: Any, clip: Any, state: dict[str, torch.Tensor], strength_model: float, strength_clip: float,
              used_by: str = "Load Style LoRA") -> tuple[Any, Any]:
    """(model, clip) clones with the kohya LoRA `state` patched in, as stock LoraLoader does."""
    sd = _module("comfy.sd", "load_lora_for_models", used_by=used_by, needed=True)
    return sd.load_lora_for_models(model, clip, state, strength_model, strength_clip)


# === The VAE (Content Encode's float32 copy) ==================================================================

def float32_vae(vae: Any, used_by: str = "Content Encode (float32 retry)") -> Any:
    """A float32 copy of ComfyUI's VAE, built from its weights (for images a half-precision VAE overflows on)."""
    sd = _module("comfy.sd", "VAE", used_by=used_by, needed=True)
    _require(vae, "VAE", ("get_sd",), used_by)
    return sd.VAE(sd=vae.get_sd(), dtype=torch.float32)


# === Devices, progress, Cancel and memory (Style Metrics, Train Style) ========================================

def torch_device(used_by: str = "Style Metrics") -> torch.device:
    """ComfyUI's compute device; outside ComfyUI CUDA when there is one, else the CPU."""
    mm = _module("comfy.model_management", "get_torch_device", used_by=used_by)
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def release_models(used_by: str = "Train Style") -> None:
    """Free memory: ComfyUI unloads the models it holds on the GPU and empties the allocator's cache; Python's
    garbage (e.g. a trainer's model copies) is collected."""
    gc.collect()
    mm = _module("comfy.model_management", "unload_all_models", "soft_empty_cache", used_by=used_by)
    if mm is not None:
        mm.unload_all_models()
        mm.soft_empty_cache()


class _NoBar:
    """The progress bar outside ComfyUI: shows nothing."""

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        pass


def progress_bar(total: int, used_by: str = "Train Style") -> Any:
    """ComfyUI's progress bar of the running node (`update_absolute(done, total)`), or one that shows nothing."""
    utils = _module("comfy.utils", "ProgressBar", used_by=used_by)
    return _NoBar() if utils is None else utils.ProgressBar(total)


def cancelled(used_by: str = "Train Style") -> bool:
    """Whether the user pressed Cancel (ComfyUI's interrupt flag); never outside ComfyUI."""
    mm = _module("comfy.model_management", "processing_interrupted", used_by=used_by)
    return mm is not None and bool(mm.processing_interrupted())


def is_interrupt(error: BaseException) -> bool:
    """Whether `error` is ComfyUI's interrupt (InterruptProcessingException, which its progress hook raises)."""
    return type(error).__name__ == "InterruptProcessingException"


def raise_cancelled(message: str, used_by: str = "Train Style") -> None:
    """End the node the way ComfyUI ends a cancelled prompt (its InterruptProcessingException; the flag is
    cleared), or with InterruptedError outside ComfyUI."""
    mm = _module("comfy.model_management", "interrupt_current_processing", "InterruptProcessingException",
                 used_by=used_by)
    if mm is None:
        raise InterruptedError(message)
    mm.interrupt_current_processing(False)
    raise mm.InterruptProcessingException(message)


# === Attention patches and the model wrapper (Style From Image) ===============================================

# The sampler wrapper (ComfyUI's SAMPLER_SAMPLE wrapper, comfy/patcher_extension.py) sees the sampler's sigmas, its
# clean starting latent and the guider: Style From Image's paper mode inverts there and hands the sampler its start.
SAMPLER_SAMPLE = "sampler_sample"  # comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE
INJECTION_ATTACHMENT = "stylora_style_injection"  # ModelPatcher attachment and sampler-wrapper key of the injection
STYLE_IMAGE = "Style From Image"


def rescale_style_injection(model: Any, factor: float, used_by: str) -> None:
    """On a clone: the injection Style From Image recorded (if any) rescaled by `factor` through its own
    `rescaled_onto(model, factor)` (factor 0 removes it), so Style Strength needs nothing of the node's module."""
    injection = attachment(model, INJECTION_ATTACHMENT, used_by)
    if injection is not None:
        injection.rescaled_onto(model, factor)


def attn1_replaced_blocks(model: Any, blocks: tuple[int, ...], used_by: str = STYLE_IMAGE) -> list[int]:
    """The output blocks among `blocks` whose self-attention (transformer 0) already has an attn1 replace patch."""
    _require(model, "ModelPatcher", ("model_options",), used_by)
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    return [i for i in blocks if ("output", i, 0) in replace]


def model_function_wrapper(model: Any, used_by: str = STYLE_IMAGE) -> Any:
    """The model_function_wrapper already on a ModelPatcher (another node's), or None."""
    _require(model, "ModelPatcher", ("model_options",), used_by)
    return model.model_options.get("model_function_wrapper")


def install_style_injection(model: Any, wrapper: Any, attn_patch: Any, blocks: tuple[int, ...], sampler_wrapper: Any,
                            key: str) -> None:
    """On a ModelPatcher clone: `wrapper` as model_function_wrapper, `attn_patch` as the attn1 replace patch of
    output blocks `blocks` (transformer 0), `sampler_wrapper` as the SAMPLER_SAMPLE wrapper under `key` (replacing
    one of ours already there), and `wrapper` recorded as attachment `key`."""
    _require(model, "ModelPatcher", ("set_model_unet_function_wrapper", "set_model_attn1_replace", "set_attachments",
                                     "add_wrapper_with_key", "remove_wrappers_with_key"), STYLE_IMAGE)
    _module("comfy.ldm.modules.attention", "optimized_attention", used_by=STYLE_IMAGE)
    model.set_model_unet_function_wrapper(wrapper)
    for i in blocks:
        model.set_model_attn1_replace(attn_patch, "output", i, 0)
    model.remove_wrappers_with_key(SAMPLER_SAMPLE, key)
    model.add_wrapper_with_key(SAMPLER_SAMPLE, key, sampler_wrapper)
    model.set_attachments(key, wrapper)


def remove_style_injection(model: Any, inner: Any, blocks: tuple[int, ...], key: str) -> None:
    """Undo install_style_injection on a clone: the model wrapper it had before (`inner`, or none), the attn1
    patches of `blocks`, our sampler wrapper and the attachment."""
    _require(model, "ModelPatcher", ("model_options", "remove_wrappers_with_key", "remove_attachments"), STYLE_IMAGE)
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
    samplers = _module("comfy.samplers", "calc_cond_batch", used_by=STYLE_IMAGE, needed=True)
    timestep = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
    return samplers.calc_cond_batch(guider.inner_model, [conds], x, timestep, model_options)[0]


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
