"""`train_textual_inversion`: a folder of paintings in, a style token embedding for SD1.x's text encoder out
(Gal et al., "An Image is Worth One Word", ICLR 2023).

Everything is frozen but `num_vectors` new token vectors, initialised from a descriptive word; the images are
trained under style prompts ("a painting in the style of <token>", the templates of Gal et al.) with the plain
epsilon-prediction MSE. The data pipeline, step loop, checkpoints, logs and resource record are the other
trainers' (trainer/dataset.py, trainer/loop.py). The file holds one tensor `emb_params` [num_vectors, D], the key
A1111 and ComfyUI read (ComfyUI: `embedding:<file name>` in a prompt, from models/embeddings); diffusers loads it
with `pipe.load_textual_inversion(path, token="<word>")`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import nn

from ..core.files import atomic_write
from ..core.version import __version__
from .base_model import load_base_model, resolve_source
from .checkpoint import RunCheckpoints, start_or_resume
from .config import TextualInversionConfig
from .dataset import BatchOrder, batch_latents, encode_latents, load_style_dataset
from .loop import TrainProgress, TrainResult, finish_run, optimizer_and_schedule, start_accelerator, train_steps
from .losses import denoising_loss

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "emb_params"  # the tensor's key in A1111's safetensors embeddings, which ComfyUI reads too
PLACEHOLDER = "<stylora-style>"  # the token while training; the file name is the word in ComfyUI and A1111
# Gal et al.'s style prompt templates ({} is the placeholder): the vector learns what the prompts leave unsaid.
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
# Settings that must not change between a run and its resumption (they change what is being trained).
RESUME_INVARIANTS = ("data", "base_model", "base_config", "initializer", "num_vectors", "resolution", "batch_size",
                     "grad_accum", "seed", "steps", "learning_rate", "lr_scheduler", "warmup_steps")


class PlaceholderEmbedding(nn.Module):
    """The text encoder's token embedding with learned rows for the placeholder tokens (ids >= first_id).

    forward(input_ids [B, L]) -> [B, L, D]: the frozen table's rows, the learned vectors [N, D] where the ids are
    placeholders. Only `learned` is trained, so the optimizer and checkpoints hold N x D numbers, not the table.
    """

    def __init__(self, frozen: nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.frozen, self.first_id = frozen, first_id
        self.learned = nn.Parameter(init.detach().clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.frozen(input_ids.clamp(max=self.first_id - 1))
        placeholder = input_ids >= self.first_id
        rows = self.learned[(input_ids - self.first_id).clamp(0, len(self.learned) - 1)].to(base.dtype)
        return torch.where(placeholder[..., None], rows, base)


def placeholder_tokens(num_vectors: int) -> list[str]:
    """The placeholder's tokens: <stylora-style>, <stylora-style>_1, ... (diffusers' naming for multi-vector)."""
    return [PLACEHOLDER] + [f"{PLACEHOLDER}_{i}" for i in range(1, num_vectors)]


def train_textual_inversion(cfg: TextualInversionConfig, *, resume: bool = False, overwrite: bool = False,
                            progress: bool = True) -> TrainResult:
    """Learn a style embedding as `cfg` says and write it to `cfg.output` (see TextualInversionConfig)."""
    t_start = time.time()
    cfg = dataclasses.replace(cfg, base_model=resolve_source(cfg.base_model))  # recorded as an absolute path
    output = Path(cfg.output)

    # 1. Fresh run or resumption, and a writable --output (nothing deleted before the data and model loaded).
    resume_from = start_or_resume(output, resume, overwrite, cfg.steps)

    # 2. Accelerator: device placement, mixed precision, gradient accumulation, multi-GPU.
    accelerator, weight_dtype, show = start_accelerator(cfg.mixed_precision, cfg.grad_accum, progress)
    device = accelerator.device

    # 3. Scan the style images: every file either used or reported with a reason.
    dataset = load_style_dataset(cfg.data, cfg.resolution, "center", use_captions=False, min_images=cfg.min_images,
                                 max_image_pixels=cfg.max_image_pixels, progress=show)
    logger.info("%d usable images, %d skipped", len(dataset), len(dataset.skipped))

    # 4. The frozen base model; the text encoder stays fp32 (its new vectors are trained through it).
    base = load_base_model(cfg.base_model, cfg.base_config)
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    vae.to(device, dtype=torch.float32)
    unet.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # checkpointing runs in training mode only; the UNet has no dropout, so nothing else changes

    # 5. The placeholder tokens, their vectors initialised from the initializer word's embedding (Gal et al.).
    init_ids = tokenizer(cfg.initializer, add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        raise ValueError(f"initializer {cfg.initializer!r} is {len(init_ids)} CLIP tokens; choose a word of one "
                         "token (e.g. 'painting', 'art', 'style')")
    tokens = placeholder_tokens(cfg.num_vectors)
    first_id = len(tokenizer)
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ValueError(f"the tokenizer of {cfg.base_model} already has the token {PLACEHOLDER}")
    frozen = text_encoder.get_input_embeddings()
    init = frozen.weight[init_ids[0]].detach().expand(cfg.num_vectors, -1)
    embedding = PlaceholderEmbedding(frozen, first_id, init).to(device)
    text_encoder.set_input_embeddings(embedding)
    text_encoder.requires_grad_(False)
    embedding.learned.requires_grad_(True)
    params = [embedding.learned]

    # 6. Prompts (every template, tokenised once) and latents (encoded once: the VAE is frozen).
    word = " ".join(tokens)
    template_ids = tokenizer([t.format(word) for t in STYLE_TEMPLATES], padding="max_length", truncation=True,
                             max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # [T, 77]
    latent_cache = encode_latents(vae, dataset, False, device, show)
    vae.to("cpu")
    scaling = float(vae.config.scaling_factor)

    # 7. Optimizer and learning-rate schedule over the new vectors only.
    optimizer, lr_schedule = optimizer_and_schedule(accelerator, params, cfg, cfg.learning_rate)
    text_encoder, optimizer, lr_schedule = accelerator.prepare(text_encoder, optimizer, lr_schedule)

    # 8. Resume: the vectors, optimizer moments and schedule position from the newest complete checkpoint.
    checkpoints = RunCheckpoints(accelerator, output, lambda: {EMBEDDING_KEY: embedding.learned.detach()},
                                 optimizer, lr_schedule,
                                 {"config": cfg.to_dict(), "dataset_fingerprint": dataset.fingerprint},
                                 cfg.keep_checkpoints)
    start_step = checkpoints.resume(
        resume_from, cfg, RESUME_INVARIANTS,
        lambda weights: embedding.learned.data.copy_(weights[EMBEDDING_KEY].to(embedding.learned)), show)

    # 9. One micro-batch: each image under a template drawn from `g`, the plain epsilon MSE (Gal et al.).
    batches = BatchOrder(dataset, cfg.batch_size, cfg.seed)

    def micro_step(index: int, g: torch.Generator) -> torch.Tensor:
        ids = batches[index]
        latents, _ = batch_latents(ids, dataset, latent_cache, None, False, g, device)
        latents = (latents * scaling).to(device, weight_dtype)
        which = torch.randint(len(STYLE_TEMPLATES), (len(ids),), generator=g)
        states = text_encoder(template_ids[which].to(device))[0].to(weight_dtype)
        mse, *_ = denoising_loss(unet, noise_scheduler, latents, states, g)
        return mse.mean()

    # 10. The training loop (trainer/loop.py): backward, optimizer step, logs, checkpoints.
    track = TrainProgress(output, cfg.steps, start_step, cfg.log_every, "Textual inversion", show,
                          enabled=accelerator.is_main_process)
    step = train_steps(accelerator, text_encoder, params, optimizer, lr_schedule, checkpoints, track, cfg,
                       start_step, micro_step)

    # 11. Write the embedding (A1111/ComfyUI layout) with its metadata, and the resource record.
    def write_embedding(seconds: float, peak_mb: float) -> None:
        vectors = embedding.learned.detach().float().cpu().contiguous()  # [num_vectors, D]
        meta = embedding_metadata(cfg, base, len(dataset), dataset.fingerprint, step, seconds)
        meta["stylora.train_peak_memory_mb"] = f"{peak_mb:.0f}"
        atomic_write(output, lambda tmp: save_file({EMBEDDING_KEY: vectors}, tmp, metadata=meta))

    return finish_run(accelerator, checkpoints, track, cfg, "textual_inversion", start_step, step, t_start,
                      dataset.skipped, write_embedding)


def embedding_metadata(cfg: TextualInversionConfig, base, images: int, fingerprint: str, steps: int,
                       seconds: float) -> dict[str, str]:
    """The header of an embedding file: what it was trained on and how, and how to use it."""
    name = Path(cfg.output).stem
    meta: dict[str, Any] = {
        "stylora.version": __version__,
        "stylora.kind": "textual_inversion",
        "stylora.base_model": base.source,
        "stylora.base_model_sha256": base.sha256,
        "stylora.trigger": f"embedding:{name}",
        "stylora.initializer": cfg.initializer,
        "stylora.num_vectors": str(cfg.num_vectors),
        "stylora.resolution": str(cfg.resolution),
        "stylora.steps": str(steps),
        "stylora.dataset_size": str(images),
        "stylora.dataset_fingerprint": fingerprint,
        "stylora.prompt_templates": list(STYLE_TEMPLATES),
        "stylora.train_seconds": f"{seconds:.1f}",
        "stylora.config": cfg.to_dict(),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/textual-inversion",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.usage_hint": f"ComfyUI: 'a painting in the style of embedding:{name}' (models/embeddings); "
                                f"A1111: '{name}' in the prompt; diffusers: load_textual_inversion(path, "
                                f"token='<{name}>')",
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
