"""Stable Diffusion 1.x base models: found from a hub id, a diffusers folder or a single-file
checkpoint, checked to really be SD1.x, hashed, and loaded as diffusers components."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SHIPPED_SD15_CONFIG = Path(__file__).parent / "sd15"
SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# A key every SD1.x single-file checkpoint has; its second dimension is the text embedding width
# (768 for SD1.x, 1024 for SD2.x). SDXL has no such key at this position in the same shape.
_SD1_PROBE = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@dataclass
class BaseModel:
    """The frozen parts of an SD1.x pipeline, as diffusers/transformers modules, plus provenance."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler_config: dict[str, Any]  # the pipeline's scheduler config (beta schedule, prediction type)
    source: str  # what the user passed
    name: str  # a short human name (file stem or hub id)
    sha256: str  # full sha256 of the single file, or of the UNet weights file of a folder
    legacy_hash: str  # A1111/kohya "model hash": 8 hex chars of sha256 of 64 KiB at 1 MiB


def classify_source(source: str) -> str:
    """'single_file', 'diffusers_dir' or 'hub'. Raises for a path that does not exist or is pickled."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(
                f"--base-model {source}: pickled checkpoints ({p.suffix}) can run code when loaded and are refused; "
                "use the .safetensors version of the model"
            )
        if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            got = p.suffix or "no extension"
            raise ValueError(f"--base-model {source}: expected a .safetensors checkpoint, got {got!r}")
        return "single_file"
    if p.is_dir():
        if not (p / "model_index.json").is_file() and not (p / "unet").is_dir():
            raise ValueError(f"--base-model {source}: folder is not a diffusers pipeline (no model_index.json)")
        return "diffusers_dir"
    looks_like_path = source.startswith((".", "/", "~")) or "\\" in source \
        or source.lower().endswith(SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES)
    if looks_like_path or source.count("/") != 1:
        raise FileNotFoundError(
            f"--base-model {source}: no such file or folder, and not a hub id of the form 'owner/name'"
        )
    return "hub"


def resolve_source(source: str) -> str:
    """A local file or folder as its absolute path (what a metadata reader can find again); a hub id as typed."""
    p = Path(source).expanduser()
    return str(p.resolve()) if p.exists() else source


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def legacy_model_hash(path: str | Path) -> str:
    """The short hash A1111 and kohya's `ss_sd_model_hash` use: sha256 of 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def check_sd1_single_file(path: str | Path, cross_attention_dim: int = 768) -> None:
    """Refuse a single file that is not an SD1.x checkpoint, reading only its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shape = tuple(f.get_slice(_SD1_PROBE).get_shape()) if _SD1_PROBE in keys else None
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"--base-model {path}: not a readable safetensors file ({e})") from e
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ValueError(f"--base-model {path}: this is an SDXL checkpoint; Stylora trains on SD1.x (e.g. SD1.5)")
    if shape is None:
        raise ValueError(f"--base-model {path}: no SD1.x UNet found (key {_SD1_PROBE} missing); "
                         "is it a full checkpoint?")
    if shape[1] != cross_attention_dim:
        kind = "an SD2.x" if shape[1] == 1024 else f"a {shape[1]}-wide text-embedding"
        raise ValueError(f"--base-model {path}: {kind} checkpoint; Stylora trains on SD1.x "
                         "(768-wide CLIP text embeddings)")


def _download_hub(repo_id: str) -> Path:
    """Local snapshot of a hub pipeline (the HF cache first; the network only if needed)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*",
                "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise RuntimeError(
            f"--base-model {repo_id}: not in the Hugging Face cache and the hub is unreachable ({type(e).__name__}). "
            "Pass a local diffusers folder or a single-file SD1.5 checkpoint (e.g. ComfyUI's "
            "models/checkpoints/v1-5-pruned-emaonly.safetensors) instead."
        ) from e


def load_base_model(source: str, config_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load an SD1.x base model from a hub id, a diffusers folder or a single `.safetensors` file.

    A single file is read with the configs in `config_dir` (default: the SD1.5 configs shipped with the
    pack), so it works without network. Weights are returned on CPU in `dtype`, frozen, in eval mode.
    """
    from diffusers import StableDiffusionPipeline

    kind = classify_source(source)
    if kind == "single_file":
        config_dir = Path(config_dir) if config_dir else SHIPPED_SD15_CONFIG
        try:
            unet_cfg = json.loads((config_dir / "unet" / "config.json").read_text(encoding="utf-8"))
            width = int(unet_cfg["cross_attention_dim"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--base-config {config_dir}: no readable diffusers configs (unet/config.json with "
                             f"cross_attention_dim: {type(e).__name__}: {e})") from e
        check_sd1_single_file(source, width)
        logger.info("loading single-file checkpoint %s (configs: %s)", source, config_dir)
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                source, config=str(config_dir), local_files_only=True, dtype=dtype,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:  # diffusers' loading errors
            raise ValueError(f"--base-model {source}: cannot load it as an SD1.x checkpoint with the configs in "
                             f"{config_dir} ({type(e).__name__}: {_first_line(e)})") from e
        sha, legacy, name = file_sha256(source), legacy_model_hash(source), Path(source).stem
    else:
        folder = Path(source) if kind == "diffusers_dir" else _download_hub(source)
        logger.info("loading diffusers pipeline %s", folder)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder), dtype=dtype, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, local_files_only=True,
            )
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:  # diffusers' loading errors
            raise ValueError(f"--base-model {source}: cannot load the diffusers pipeline in {folder} "
                             f"({type(e).__name__}: {_first_line(e)}); is a component missing or damaged?") from e
        width = int(pipe.unet.config.cross_attention_dim)
        if width != 768 and kind == "hub":
            raise ValueError(f"--base-model {source}: cross_attention_dim {width}; not an SD1.x pipeline")
        weight_file = next((w for w in (folder / "unet" / "diffusion_pytorch_model.safetensors",
                                        folder / "unet" / "diffusion_pytorch_model.bin") if w.is_file()), None)
        sha = file_sha256(weight_file) if weight_file else ""
        legacy = legacy_model_hash(weight_file) if weight_file else ""
        name = source if kind == "hub" else folder.name
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config),
                     source, name, sha, legacy)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
