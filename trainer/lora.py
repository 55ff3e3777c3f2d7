"""`train_lora`: a folder of paintings in, a style LoRA for SD1.x out.

The recipe follows diffusers' train_text_to_image_lora.py: rank-4 LoRA on the UNet's attention projections,
AdamW at 1e-4 with a cosine schedule, epsilon-prediction MSE with min-SNR weighting (Hang et al. 2023), trained
against one fixed prompt (empty by default) so that the style needs no prompt. The step loop, checkpoints and
logs are trainer/loop.py's, shared with the DreamBooth baseline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionImg2ImgPipeline
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from ..core.files import atomic_write, scan_folder
from ..core.images import ImageLoadError, load_image, resize_cover
from ..core.lora_file import DTYPES, peft_to_kohya, read_metadata, save_lora
from ..core.strength_rule import SUGGESTED_DENOISE
from ..core.version import __version__
from .base_model import BaseModel, resolve_source
from .checkpoint import checkpoint_root, complete_checkpoints
from .config import LoraTrainConfig, TrainingSettings
from .dataset import BatchOrder, StyleDataset, batch_latents, encode_latents, encode_prompt, load_style_dataset
from .loop import Recipe, RunContext, StepCallback, TrainResult, add_lora_adapters, run_training
from .loop import StopTraining as StopTraining  # re-exported: what a host's on_step raises to stop a run
from .losses import PerceptualInputs, StyleLossWeights, perceptual_net, style_loss

logger = logging.getLogger(__name__)

# Settings that must not change between a run and its resumption (they change what is being trained).
RESUME_INVARIANTS = ("data", "base_model", "base_config", "trigger", "use_captions", "resolution", "crop", "flip",
                     "rank", "alpha", "target_modules", "batch_size", "grad_accum", "seed", "steps",
                     "learning_rate", "lr_scheduler", "warmup_steps")


def train_lora(cfg: LoraTrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
               perceptual: torch.nn.Module | None = None, on_step: StepCallback | None = None) -> TrainResult:
    """Train a style LoRA as `cfg` says and write it to `cfg.output`. See LoraTrainConfig for every knob.

    `perceptual` may supply the LPIPS + Gram loss network (eval.metrics.PerceptualLoss) used when
    cfg.lpips_weight or cfg.style_weight > 0; by default it is built from the published weights.
    `on_step(done, total)` is called before the first step and after every step (a host's progress bar); raising
    StopTraining from it stops the run with a checkpoint of the last completed step (see trainer/loop.py).
    """
    return run_training(cfg, StyleLoraRecipe, resume=resume, overwrite=overwrite, progress=progress,
                        on_step=on_step, perceptual=perceptual)


class StyleLoraRecipe(Recipe):
    """LoRA adapters on the UNet's attention projections, trained on cached latents of the style images under
    their (fixed) prompts with the style loss (trainer.losses.style_loss); written as a kohya LoRA."""

    kind, title, invariants = "style_lora", "Training style LoRA", RESUME_INVARIANTS

    @classmethod
    def scan(cls, cfg: TrainingSettings, show: bool) -> StyleDataset:
        assert isinstance(cfg, LoraTrainConfig)
        return load_style_dataset(cfg.data, cfg.resolution, cfg.crop, cfg.trigger, cfg.use_captions,
                                  cfg.min_images, cfg.max_image_pixels, progress=show)

    def __init__(self, run: RunContext, perceptual: torch.nn.Module | None = None):
        super().__init__(run)
        cfg, base, device = run.cfg, run.base, run.device
        assert isinstance(cfg, LoraTrainConfig)
        self.cfg, self.log_with = cfg, cfg.log_with
        self.weights = StyleLossWeights(cfg.mse_weight, cfg.lpips_weight, cfg.style_weight,
                                        cfg.perceptual_max_timestep, cfg.noise_offset, cfg.min_snr_gamma)
        # 1. Frozen weights in the mixed-precision dtype; the VAE in fp32 (the SD1.5 VAE overflows in fp16).
        self.unet, self.vae, text_encoder = base.unet, base.vae, base.text_encoder
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.vae.to(device, dtype=torch.float32)
        text_encoder.to(device, dtype=run.weight_dtype)
        self.unet.to(device, dtype=run.weight_dtype)

        # 2. LoRA adapters on the attention projections; trainable weights stay fp32 (diffusers' recipe).
        self.params = add_lora_adapters(self.unet, cfg)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.perceptual = perceptual_net(perceptual).to(device) if self.weights.perceptual else None
        if self.perceptual is not None and cfg.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()

        # 3. Conditioning and latents, computed once: the text encoder and VAE are frozen.
        prompts = sorted(set(run.dataset.captions))
        with torch.no_grad():
            embeds = {p: encode_prompt(base.tokenizer, text_encoder, p, device) for p in prompts}
        self.cond = torch.stack([embeds[c] for c in run.dataset.captions])  # [N, 77, D]
        if cfg.preview_every == 0:
            text_encoder.to("cpu")
        self.latent_cache = encode_latents(self.vae, run.dataset, cfg.flip, device, run.show) \
            if cfg.cache_latents else None
        if self.latent_cache is not None and cfg.preview_every == 0 and self.perceptual is None:
            self.vae.to("cpu")  # not needed on the GPU again: frees ~330 MB for the UNet's activations
        self.scaling = float(self.vae.config.scaling_factor)
        self.batches = BatchOrder(run.dataset, cfg.batch_size, cfg.seed)

    def prepare(self, optimizer: torch.optim.Optimizer, lr_schedule: Any) -> tuple[torch.optim.Optimizer, Any]:
        self.model, optimizer, lr_schedule = self.run.accelerator.prepare(self.unet, optimizer, lr_schedule)
        return optimizer, lr_schedule

    def train_mode(self) -> None:
        self.model.train()

    def loss(self, index: int, g: torch.Generator) -> torch.Tensor:
        ids, dataset, device = self.batches[index], self.run.dataset, self.run.device
        latents, mirrored = batch_latents(ids, dataset, self.latent_cache, self.vae, self.cfg.flip, g, device)
        latents = (latents * self.scaling).to(device, self.run.weight_dtype)
        states = self.cond[ids].to(device, self.run.weight_dtype)
        perceptual = None
        if self.perceptual is not None:
            targets = torch.stack([dataset.pixels[i].flip(-1) if m else dataset.pixels[i]
                                   for i, m in zip(ids, mirrored)])
            perceptual = PerceptualInputs(self.vae, self.perceptual, self.scaling, targets)
        return style_loss(self.model, self.noise_scheduler, latents, states, g, self.weights, perceptual)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return get_peft_model_state_dict(self.run.accelerator.unwrap_model(self.model))

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.run.accelerator.unwrap_model(self.model), state)

    def after_step(self, step: int) -> None:
        if self.cfg.preview_every and step % self.cfg.preview_every == 0 and self.run.accelerator.is_main_process:
            _save_preview(self.cfg, self.run.base, self.run.accelerator.unwrap_model(self.model), step)

    def write(self, steps: int, seconds: float, peak_mb: float) -> None:
        meta = lora_metadata(self.cfg, self.run.base, self.run.dataset, steps, seconds)
        meta["stylora.train_peak_memory_mb"] = f"{peak_mb:.0f}"
        save_lora(Path(self.cfg.output), peft_to_kohya(self.trainable_state(), self.cfg.lora_alpha,
                                                       DTYPES[self.cfg.save_dtype]), meta)


def train_or_reuse(cfg: LoraTrainConfig, *, progress: bool = True, on_step: StepCallback | None = None
                   ) -> TrainResult | None:
    """Make sure `cfg.output` holds the style `cfg` describes, training only what is missing: a finished file trained
    with these settings on these images is kept (returns None: nothing trained); an unfinished run of these settings
    continues from its newest checkpoint; otherwise a fresh run. A finished file or an unfinished run of other
    settings is an error naming the differences (never replaced). `on_step` as in train_lora."""
    cfg = dataclasses.replace(cfg, base_model=resolve_source(cfg.base_model))
    output = Path(cfg.output)
    # 1. A finished file: reused when its recorded settings and images are these.
    if output.exists():
        meta = read_metadata(output)
        differ = changed_settings(json.loads(meta.get("stylora.config", "{}")), cfg.to_metadata(),
                                  tuple(cfg.to_dict()))
        if differ:
            raise FileExistsError(f"{output} was trained with other settings ({differ}); choose another output "
                                  "name, or delete the file to train it again")
        dataset = load_style_dataset(cfg.data, cfg.resolution, cfg.crop, cfg.trigger, cfg.use_captions,
                                     cfg.min_images, cfg.max_image_pixels)
        if meta.get("stylora.dataset_fingerprint") != dataset.fingerprint:
            raise FileExistsError(f"{output} was trained on other images than those now in {cfg.data}; choose "
                                  "another output name, or delete the file to train it again")
        logger.info("%s: finished with these settings and images, reused", output)
        if on_step is not None:
            on_step(cfg.steps, cfg.steps)
        return None
    # 2. An unfinished run: continued when it has these settings (train_lora checks the images).
    done = complete_checkpoints(checkpoint_root(output))
    if done:
        info = json.loads((done[-1][1] / "info.json").read_text(encoding="utf-8"))
        differ = changed_settings(info.get("config", {}), cfg.to_dict(), RESUME_INVARIANTS)
        if differ:
            raise FileExistsError(f"{checkpoint_root(output)} holds an unfinished run with other settings ({differ}); "
                                  "use its settings to continue it, or delete that folder to start again")
    return train_lora(cfg, resume=bool(done), progress=progress, on_step=on_step)


def changed_settings(saved: dict[str, Any], settings: dict[str, Any], names: tuple[str, ...]) -> str:
    """The settings among `names` (except the output path) whose saved value differs from `settings` (a config's
    to_dict, or to_metadata to compare with a file's metadata), as "name: saved -> now" pairs; "" when none does."""
    now = json.loads(json.dumps(settings))  # tuples as lists, as they were saved
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in names if k != "output" and saved.get(k) != now[k])


def lora_metadata(cfg: LoraTrainConfig, base, dataset: StyleDataset, steps: int, seconds: float) -> dict[str, str]:
    """The header of a style-LoRA file: our keys, kohya's `ss_*` and the SAI `modelspec.*` keys that apply."""
    now = datetime.now(timezone.utc)
    settings = cfg.to_metadata()  # local paths by name only: the file may be shared
    res = f"{cfg.resolution}x{cfg.resolution}"
    loss_weights = {"mse": cfg.mse_weight, "lpips": cfg.lpips_weight, "style_gram": cfg.style_weight,
                    "min_snr_gamma": cfg.min_snr_gamma, "noise_offset": cfg.noise_offset}
    tag_frequency: dict[str, int] = {}
    for caption in dataset.captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                tag_frequency[tag] = tag_frequency.get(tag, 0) + 1
    meta: dict[str, Any] = {
        "stylora.version": __version__,
        "stylora.kind": "style_lora",
        "stylora.base_model": settings["base_model"],
        "stylora.base_model_sha256": base.sha256,
        "stylora.trigger": cfg.trigger,
        "stylora.rank": str(cfg.rank),
        "stylora.alpha": str(cfg.lora_alpha),
        "stylora.resolution": str(cfg.resolution),
        "stylora.steps": str(steps),
        "stylora.loss_weights": loss_weights,
        "stylora.dataset_size": str(len(dataset)),
        "stylora.dataset_fingerprint": dataset.fingerprint,
        "stylora.suggested_strength": "1.0",
        "stylora.suggested_denoise": str(SUGGESTED_DENOISE),
        "stylora.train_seconds": f"{seconds:.1f}",
        "stylora.config": settings,
        # kohya sd-scripts keys, read by A1111's and ComfyUI-Manager's LoRA browsers.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.lora_alpha),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": base.name,
        "ss_sd_model_hash": base.legacy_hash,
        "ss_new_sd_model_hash": base.sha256,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_max_train_steps": str(cfg.steps),
        "ss_steps": str(steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.learning_rate),
        "ss_text_encoder_lr": "0",
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.warmup_steps),
        "ss_optimizer": "bitsandbytes.optim.AdamW8bit" if cfg.use_8bit_adam else "torch.optim.AdamW",
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_min_snr_gamma": str(cfg.min_snr_gamma),
        "ss_noise_offset": str(cfg.noise_offset),
        "ss_seed": str(cfg.seed),
        "ss_num_train_images": str(len(dataset)),
        "ss_cache_latents": str(cfg.cache_latents),
        "ss_enable_bucket": str(cfg.crop == "buckets"),
        "ss_flip_aug": str(cfg.flip),
        "ss_output_name": Path(cfg.output).stem,
        "ss_training_started_at": str(int(now.timestamp() - seconds)),
        "ss_training_finished_at": str(int(now.timestamp())),
        "ss_tag_frequency": {Path(cfg.data).name: tag_frequency},
        "ss_training_comment": f"Stylora {__version__} style LoRA; trigger: {cfg.trigger or '(none, promptless)'}",
        # Stability AI model spec 1.0.0.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": Path(cfg.output).stem,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": res,
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": cfg.trigger,
        "modelspec.usage_hint": f"Style LoRA: apply at strength ~1.0 with img2img denoise ~{SUGGESTED_DENOISE}; "
                                + (f"add '{cfg.trigger}' to the prompt" if cfg.trigger else "no prompt needed"),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _save_preview(cfg: LoraTrainConfig, base: BaseModel, unet: torch.nn.Module, step: int) -> None:
    """Stylise the preview content photos with the LoRA as trained so far (img2img), saved as one PNG row."""
    paths, _ = scan_folder(Path(cfg.preview_content))
    images = []
    for p in paths[:4]:
        try:
            images.append(resize_cover(load_image(p), cfg.resolution, cfg.resolution))
        except ImageLoadError as e:
            logger.warning("preview: %s", e)
    if not images:
        logger.warning("preview: no usable images in %s", cfg.preview_content)
        return
    was_training = unet.training
    unet.eval()
    pipe = StableDiffusionImg2ImgPipeline(
        vae=base.vae, text_encoder=base.text_encoder.to(unet.device), tokenizer=base.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(base.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=[cfg.trigger] * len(images), image=images, strength=cfg.preview_strength,
                   num_inference_steps=cfg.preview_steps, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(cfg.seed)).images
    unet.train(was_training)
    row = np.concatenate([np.concatenate([np.asarray(a), np.asarray(b)], axis=0) for a, b in zip(images, out)], axis=1)
    output = Path(cfg.output)
    path = output.parent / f"{output.stem}.previews" / f"step-{step:08d}.png"
    atomic_write(path, lambda tmp: Image.fromarray(row).save(tmp, format="PNG"))
    logger.info("preview written to %s", path)
