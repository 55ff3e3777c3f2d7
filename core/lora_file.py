"""Style-LoRA files: kohya/A1111 key layout in safetensors, with self-describing metadata.

Layout (what kohya's sd-scripts writes for SD1.x, read by ComfyUI's LoraLoader, A1111 and
diffusers' `load_lora_weights`), one triple per adapted module:

    lora_unet_<diffusers module path with '.' -> '_'>.lora_down.weight   [rank, in]
    lora_unet_<...>.lora_up.weight                                        [out, rank]
    lora_unet_<...>.alpha                                                 scalar; scale = alpha / rank
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write
from .strength_rule import CALIBRATION_KEY, Calibration, calibrated_strength

logger = logging.getLogger(__name__)

KOHYA_UNET_PREFIX = "lora_unet_"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def kohya_name(module_path: str) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` -> `lora_unet_down_blocks_0_..._to_out_0`."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def peft_to_kohya(peft_state: dict[str, torch.Tensor], alpha: float, dtype: torch.dtype = torch.float16
                  ) -> dict[str, torch.Tensor]:
    """Convert a peft UNet adapter state dict (`<module>.lora_A.weight`, `<module>.lora_B.weight`) to kohya keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        for src, dst in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(src):
                module = key[: -len(src)]
                out[kohya_name(module) + dst] = value.detach().to("cpu", dtype).contiguous()
                out[kohya_name(module) + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)
                break
        else:
            raise KeyError(f"unexpected adapter key {key!r} (expected peft lora_A/lora_B weights)")
    return out


def kohya_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a kohya state dict by module name: {name: {"down", "up", "alpha"?}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        if slot is None:
            raise KeyError(f"unexpected LoRA key {key!r}")
        modules.setdefault(name, {})[slot] = value
    return modules


def save_lora(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write a kohya-layout LoRA atomically. Metadata values are stored as strings (JSON for non-strings)."""
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file's tensors and metadata. Only safetensors: pickled formats can run code."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickled .ckpt/.pt/.bin can run code)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors has its own exception types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    return state, meta


def update_metadata(path: str | Path, updates: dict[str, str]) -> Path:
    """Rewrite a LoRA file with `updates` merged into its metadata, atomically: the tensors (names, dtypes, shapes,
    bytes) are written back unchanged, so every loader maps the same keys to the same weights."""
    from safetensors.torch import save_file

    state, meta = read_lora(path)
    meta.update(updates)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def describe(path: str | Path) -> str:
    """A readable summary of a LoRA file: what it was trained on and how, for `stylora lora info`."""
    state, meta = read_lora(path)
    modules = kohya_modules(state) if all(k.startswith(("lora_unet_", "lora_te")) for k in state) else {}
    ranks = sorted({int(m["down"].shape[0]) for m in modules.values() if "down" in m})
    n_params = sum(t.numel() for t in state.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    size_mb = Path(path).stat().st_size / 1e6
    lines = [f"{Path(path).name}: {len(modules)} modules, rank {'/'.join(map(str, ranks)) or '?'}, "
             f"{n_params:,} parameters ({', '.join(dtypes)}), {size_mb:.2f} MB"]
    lines += [f"  WARNING: {w}" for w in lora_warnings(state, meta)]
    order = ["stylora.version", "stylora.base_model", "stylora.base_model_sha256", "ss_base_model_version",
             "stylora.trigger", "stylora.rank", "stylora.alpha", "stylora.resolution", "stylora.steps",
             "stylora.loss_weights", "stylora.dataset_size", "stylora.dataset_fingerprint",
             "stylora.suggested_strength", "stylora.suggested_denoise", "modelspec.architecture",
             "modelspec.title", "modelspec.date"]
    width = max((len(k) for k in meta), default=0)
    for key in order + sorted(k for k in meta if k not in order and k not in ("stylora.config", CALIBRATION_KEY)):
        if key in meta:
            lines.append(f"  {key:<{width}}  {meta[key]}")
    if CALIBRATION_KEY in meta:
        lines.append(describe_calibration(meta[CALIBRATION_KEY]))
    else:
        lines.append("  calibration: none (Style Strength uses its default ramps; stylora calibrate measures one)")
    if "stylora.config" in meta:
        lines.append("  stylora.config (training settings):")
        for k, v in json.loads(meta["stylora.config"]).items():
            lines.append(f"    {k}: {v}")
    if not meta:
        lines.append("  (no metadata)")
    return "\n".join(lines)


def base_family(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str | None:
    """The model family a LoRA was made for, from its cross-attention input width (the text embedding: SD1.x 768,
    SD2.x 1024, SDXL 2048), SDXL's second text encoder (`lora_te2_` keys) or, without such keys, its metadata's
    `ss_base_model_version` / `modelspec.architecture`; None when nothing tells."""
    widths = {int(v.shape[-1]) for k, v in state.items() if v.ndim >= 2 and
              any(p in k for p in ("attn2_to_k.lora_down", "attn2_to_v.lora_down", "attn2.to_k.lora_A",
                                   "attn2.to_v.lora_A", "attn2_to_k.lora_A", "attn2_to_v.lora_A"))}
    if any(k.startswith("lora_te2_") for k in state) or 2048 in widths:
        return "SDXL"
    if 1024 in widths:
        return "SD2.x"
    if 768 in widths:
        return "SD1.x"
    tag = (meta.get("ss_base_model_version", "") + " " + meta.get("modelspec.architecture", "")).lower()
    return "SDXL" if "xl" in tag else "SD2.x" if "v2" in tag or "sd2" in tag else "SD1.x" if tag.strip() else None


def lora_warnings(state: dict[str, torch.Tensor], meta: dict[str, str]) -> list[str]:
    """What makes a LoRA file unusable with Stylora's nodes and an SD1.5 model, one line each (empty: nothing)."""
    warnings = []
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        more = f" (+{len(non_finite) - 3} more)" if len(non_finite) > 3 else ""
        warnings.append(f"{len(non_finite)} tensor(s) with NaN/inf values ({', '.join(non_finite[:3])}{more}): "
                        "the nodes refuse this file (a diverged training run or a damaged file)")
    family = base_family(state, meta)
    if family not in ("SD1.x", None):
        warnings.append(f"an {family} LoRA: it does not fit SD1.5 models; Stylora's nodes refuse it")
    return warnings


def describe_calibration(text: str) -> str:
    """The calibration entry as `lora info` shows it: the measured curve and what a few strengths map to."""
    try:
        cal = Calibration.from_json(text)
    except ValueError as e:
        return f"  calibration: unreadable ({e})"
    curve = ", ".join(f"{s:g}: {v:.3f}" for s, v in zip(cal.strengths, cal.ssim))
    remap = ", ".join(f"{s:g} -> {calibrated_strength(s, cal):.2f}" for s in (0.25, 0.5, 0.75, 1.0))
    lines = [f"  calibration: SSIM to the photo by strength ({cal.photos} photos, max_denoise {cal.max_denoise:g}): "
             f"{curve}",
             f"    strength -> raw strength (target SSIM at strength 1: {cal.target_ssim_at_full:g}): {remap}"]
    lines += [f"    {k}: {v}" for k, v in sorted(cal.details.items())]
    return "\n".join(lines)


# Key suffixes of the LoRA formats ComfyUI's loader reads for SD1.x (kohya/A1111, LoCon, peft/diffusers, DoRA).
_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight")
_UP = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight")
_EXTRA = (".alpha", ".dora_scale", ".lora_mid.weight")


def lora_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group a LoRA state dict into {module prefix: {"down", "up"}} and list the keys of unknown formats."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        for suffixes, slot in ((_DOWN, "down"), (_UP, "up"), (_EXTRA, None)):
            hit = next((s for s in suffixes if key.endswith(s)), None)
            if hit:
                if slot:
                    modules.setdefault(key[: -len(hit)], {})[slot] = value
                break
        else:
            unknown.append(key)
    return modules, unknown


def check_lora_fits(state: dict[str, torch.Tensor], key_map: dict[str, Any],
                    target_shapes: dict[str, tuple[int, ...]], limit: int = 5) -> list[str]:
    """Why a LoRA does not fit a model (an empty list: every module maps to a weight of matching shape and every
    tensor is finite).

    key_map: LoRA module prefix -> model weight key (ComfyUI's `model_lora_keys_unet/clip`; a tuple's first item is
    the key). target_shapes: model weight key -> shape. ComfyUI itself only logs unmapped keys and skips
    wrong-shape patches at sampling time; an SDXL or SD2 LoRA then half-applies silently, which is what this
    check refuses. At most `limit` problems of each kind are listed, with a count of the rest.
    """
    modules, unknown = lora_prefixes(state)
    # NaN/inf weights (a diverged training run, a damaged file) would turn every image black or into noise.
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    unmapped, mismatched, incomplete = [], [], []
    for prefix, parts in modules.items():
        if set(parts) != {"down", "up"}:
            incomplete.append(prefix)
            continue
        target = key_map.get(prefix)
        if isinstance(target, tuple):
            target = target[0]
        if target is None or target not in target_shapes:
            unmapped.append(prefix)
            continue
        shape = target_shapes[target]
        out_ch, in_ch = parts["up"].shape[0], parts["down"].shape[1]
        if len(shape) < 2 or shape[0] != out_ch or shape[1] != in_ch:
            mismatched.append(f"{prefix}: LoRA maps {in_ch}->{out_ch}, model weight is {tuple(shape)}")
    problems = []
    for label, items in (("tensors with NaN/inf values", non_finite), ("unknown keys", unknown),
                         ("modules with no matching model layer", unmapped),
                         ("modules of the wrong shape", mismatched), ("modules missing up or down", incomplete)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    if not modules and not unknown:
        problems.append("no LoRA weights in the file")
    return problems


def normalize_blend(weights: list[float]) -> list[float]:
    """Blend weights scaled to sum to 1 (signs kept), so a blend of styles has the strength of one style."""
    total = sum(abs(w) for w in weights)
    if total == 0:
        raise ValueError(f"blend weights must not all be 0, got {weights}")
    return [w / total for w in weights]
