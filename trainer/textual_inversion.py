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

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import nn

from ..core.files import atomic_write
from ..core.version import __version__
from .config import TextualInversionConfig
from .dataset import BatchOrder, batch_latents, encode_latents
from .loop import Recipe, RunContext, TrainResult, run_training
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
    return run_training(cfg, TextualInversionRecipe, resume=resume, overwrite=overwrite, progress=progress)


class TextualInversionRecipe(Recipe):
    """New token vectors for the frozen text encoder, trained under Gal et al.'s style prompts with the plain
    epsilon MSE; written as an A1111/ComfyUI embedding."""

    kind, title, invariants = "textual_inversion", "Textual inversion", RESUME_INVARIANTS

    def __init__(self, run: RunContext):
        super().__init__(run)
        cfg, base, device = run.cfg, run.base, run.device
        assert isinstance(cfg, TextualInversionConfig)
        self.cfg = cfg
        # 1. The frozen base model; the text encoder stays fp32 (its new vectors are trained through it).
        self.unet, vae, self.text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        vae.to(device, dtype=torch.float32)
        self.unet.to(device, dtype=run.weight_dtype)
        self.text_encoder.to(device, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # checkpointing runs in training mode only; the UNet has no dropout

        # 2. The placeholder tokens, their vectors initialised from the initializer word's embedding (Gal et al.).
        init_ids = tokenizer(cfg.initializer, add_special_tokens=False).input_ids
        if len(init_ids) != 1:
            raise ValueError(f"initializer {cfg.initializer!r} is {len(init_ids)} CLIP tokens; choose a word of one "
                             "token (e.g. 'painting', 'art', 'style')")
        tokens = placeholder_tokens(cfg.num_vectors)
        first_id = len(tokenizer)
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise ValueError(f"the tokenizer of {cfg.base_model} already has the token {PLACEHOLDER}")
        frozen = self.text_encoder.get_input_embeddings()
        init = frozen.weight[init_ids[0]].detach().expand(cfg.num_vectors, -1)
        self.embedding = PlaceholderEmbedding(frozen, first_id, init).to(device)
        self.text_encoder.set_input_embeddings(self.embedding)
        self.text_encoder.requires_grad_(False)
        self.embedding.learned.requires_grad_(True)
        self.params = [self.embedding.learned]

        # 3. Prompts (every template, tokenised once) and latents (encoded once: the VAE is frozen).
        word = " ".join(tokens)
        self.template_ids = tokenizer([t.format(word) for t in STYLE_TEMPLATES], padding="max_length",
                                      truncation=True, max_length=tokenizer.model_max_length,
                                      return_tensors="pt").input_ids  # [T, 77]
        self.latent_cache = encode_latents(vae, run.dataset, False, device, run.show)
        vae.to("cpu")
        self.scaling = float(vae.config.scaling_factor)
        self.batches = BatchOrder(run.dataset, cfg.batch_size, cfg.seed)

    def prepare(self, optimizer: torch.optim.Optimizer, lr_schedule: Any) -> tuple[torch.optim.Optimizer, Any]:
        self.model, optimizer, lr_schedule = self.run.accelerator.prepare(self.text_encoder, optimizer, lr_schedule)
        return optimizer, lr_schedule

    def loss(self, index: int, g: torch.Generator) -> torch.Tensor:
        """Each image under a template drawn from `g`, the plain epsilon MSE (Gal et al.)."""
        ids, device, dtype = self.batches[index], self.run.device, self.run.weight_dtype
        latents, _ = batch_latents(ids, self.run.dataset, self.latent_cache, None, False, g, device)
        latents = (latents * self.scaling).to(device, dtype)
        which = torch.randint(len(STYLE_TEMPLATES), (len(ids),), generator=g)
        states = self.model(self.template_ids[which].to(device))[0].to(dtype)
        mse, *_ = denoising_loss(self.unet, self.noise_scheduler, latents, states, g)
        return mse.mean()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {EMBEDDING_KEY: self.embedding.learned.detach()}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        self.embedding.learned.data.copy_(state[EMBEDDING_KEY].to(self.embedding.learned))

    def write(self, steps: int, seconds: float, peak_mb: float) -> None:
        """The embedding in the A1111/ComfyUI layout, with its metadata."""
        vectors = self.embedding.learned.detach().float().cpu().contiguous()  # [num_vectors, D]
        meta = embedding_metadata(self.cfg, self.run.base, len(self.run.dataset), self.fingerprint, steps, seconds)
        meta["stylora.train_peak_memory_mb"] = f"{peak_mb:.0f}"
        atomic_write(Path(self.cfg.output), lambda tmp: save_file({EMBEDDING_KEY: vectors}, tmp, metadata=meta))


def embedding_metadata(cfg: TextualInversionConfig, base, images: int, fingerprint: str, steps: int,
                       seconds: float) -> dict[str, str]:
    """The header of an embedding file: what it was trained on and how, and how to use it."""
    name = Path(cfg.output).stem
    settings = cfg.to_metadata()  # local paths by name only: the file may be shared
    meta: dict[str, Any] = {
        "stylora.version": __version__,
        "stylora.kind": "textual_inversion",
        "stylora.base_model": settings["base_model"],
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
        "stylora.config": settings,
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
