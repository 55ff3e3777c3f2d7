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
import time
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
from .base_model import load_base_model, resolve_source
from .checkpoint import RunCheckpoints, checkpoint_root, complete_checkpoints, start_or_resume
from .config import LoraTrainConfig
from .dataset import BatchOrder, StyleDataset, batch_latents, encode_latents, encode_prompt, load_style_dataset
from .loop import (
    StepCallback,
    TrainProgress,
    TrainResult,
    add_lora_adapters,
    finish_run,
    optimizer_and_schedule,
    start_accelerator,
    train_steps,
)
from .loop import StopTraining as StopTraining  # re-exported: what a host's on_step raises to stop a run
from .losses import denoising_loss, perceptual_net, perceptual_terms

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
    t_start = time.time()
    cfg = dataclasses.replace(cfg, base_model=resolve_source(cfg.base_model))  # recorded as an absolute path
    output = Path(cfg.output)

    # 1. Fresh run or resumption, and a writable --output; nothing is deleted here (an earlier run's
    #    checkpoints go when this run writes its first one, after the data and base model loaded).
    resume_from = start_or_resume(output, resume, overwrite, cfg.steps)

    # 2. Accelerator: device placement, mixed precision, gradient accumulation, multi-GPU.
    accelerator, weight_dtype, show = start_accelerator(cfg.mixed_precision, cfg.grad_accum, progress)
    device = accelerator.device

    # 3. Scan the style images: every file either used or reported with a reason.
    dataset = load_style_dataset(cfg.data, cfg.resolution, cfg.crop, cfg.trigger, cfg.use_captions,
                                 cfg.min_images, cfg.max_image_pixels, progress=show)
    logger.info("%d usable images in %d bucket(s), %d skipped", len(dataset), len(dataset.buckets),
                len(dataset.skipped))

    # 4. Load the frozen base model; frozen weights live in the mixed-precision dtype.
    base = load_base_model(cfg.base_model, cfg.base_config)
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    vae.to(device, dtype=torch.float32)  # the SD1.5 VAE overflows in fp16; it runs once per image when caching
    text_encoder.to(device, dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype)

    # 5. LoRA adapters on the attention projections; trainable weights stay fp32 (diffusers' recipe).
    add_lora_adapters(unet, cfg)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    if not lora_params:
        raise ValueError(f"target_modules {list(cfg.target_modules)} matched no UNet layer")
    use_perceptual = cfg.lpips_weight > 0 or cfg.style_weight > 0
    if use_perceptual:
        perceptual = perceptual_net(perceptual).to(device)
        if cfg.gradient_checkpointing:
            vae.enable_gradient_checkpointing()

    # 6. Conditioning and latents, computed once: the text encoder and VAE are frozen.
    prompts = sorted(set(dataset.captions))
    with torch.no_grad():
        prompt_embeds = {p: encode_prompt(base.tokenizer, text_encoder, p, device) for p in prompts}
    cond = torch.stack([prompt_embeds[c] for c in dataset.captions])  # [N, 77, D]
    if cfg.preview_every == 0:
        text_encoder.to("cpu")
    latent_cache = encode_latents(vae, dataset, cfg.flip, device, show) if cfg.cache_latents else None
    if latent_cache is not None and cfg.preview_every == 0 and not use_perceptual:
        vae.to("cpu")  # not needed on the GPU again: frees ~330 MB for the UNet's activations
    scaling = float(vae.config.scaling_factor)

    # 7. Optimizer and learning-rate schedule.
    optimizer, lr_schedule = optimizer_and_schedule(accelerator, lora_params, cfg, cfg.learning_rate)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)

    # 8. Resume: adapter weights, optimizer moments and schedule position from the newest complete checkpoint.
    checkpoints = RunCheckpoints(accelerator, output, lambda: get_peft_model_state_dict(accelerator.unwrap_model(unet)),
                                 optimizer, lr_schedule,
                                 {"config": cfg.to_dict(), "dataset_fingerprint": dataset.fingerprint},
                                 cfg.keep_checkpoints)
    start_step = checkpoints.resume(
        resume_from, cfg, RESUME_INVARIANTS,
        lambda weights: set_peft_model_state_dict(accelerator.unwrap_model(unet), weights), show)

    # 9. One micro-batch: its loss, with every random draw taken from `g`.
    batches = BatchOrder(dataset, cfg.batch_size, cfg.seed)

    def micro_step(index: int, g: torch.Generator) -> torch.Tensor:
        ids = batches[index]
        # 9a. Clean latents z0 ~ q(z|x) of the batch (cached mean/std, or a fresh VAE encode).
        latents, mirrored = batch_latents(ids, dataset, latent_cache, vae, cfg.flip, g, device)
        latents = (latents * scaling).to(device, weight_dtype)

        # 9b. Forward diffusion, prediction, weighted MSE (see denoising_loss).
        encoder_states = cond[ids].to(device, weight_dtype)
        mse, noisy, pred, t = denoising_loss(unet, noise_scheduler, latents, encoder_states, g,
                                             cfg.noise_offset, cfg.min_snr_gamma)
        loss = cfg.mse_weight * mse.mean()

        # 9c. Perceptual terms on the decoded x0 prediction, low-noise samples only.
        low_noise = t < cfg.perceptual_max_timestep if use_perceptual else None
        if use_perceptual and low_noise.any():
            target_px = torch.stack([dataset.pixels[i].flip(-1) if m else dataset.pixels[i]
                                     for i, m in zip(ids, mirrored)])[low_noise.cpu()]
            lp, gram = perceptual_terms(noise_scheduler, vae, perceptual, noisy[low_noise],
                                        pred[low_noise], t[low_noise], target_px.to(device), scaling)
            loss = loss + (cfg.lpips_weight * lp.sum() + cfg.style_weight * gram.sum()) / len(ids)
        return loss

    def after_step(step: int) -> None:
        if cfg.preview_every and step % cfg.preview_every == 0 and accelerator.is_main_process:
            _save_preview(cfg, base, accelerator.unwrap_model(unet), output, step)
        if on_step is not None:
            on_step(step, cfg.steps)

    # 10. The training loop (trainer/loop.py): backward, optimizer step, logs, checkpoints, previews, progress.
    track = TrainProgress(output, cfg.steps, start_step, cfg.log_every, "Training style LoRA", show, cfg.log_with,
                          enabled=accelerator.is_main_process)
    unet.train()
    if on_step is not None:
        on_step(start_step, cfg.steps)
    step = train_steps(accelerator, unet, lora_params, optimizer, lr_schedule, checkpoints, track, cfg, start_step,
                       micro_step, after_step)

    # 11. Write the LoRA in kohya layout with its metadata and the resource record.
    def write_lora(seconds: float, peak_mb: float) -> None:
        adapter = get_peft_model_state_dict(accelerator.unwrap_model(unet))
        meta = lora_metadata(cfg, base, dataset, step, seconds)
        meta["stylora.train_peak_memory_mb"] = f"{peak_mb:.0f}"
        save_lora(output, peft_to_kohya(adapter, cfg.lora_alpha, DTYPES[cfg.save_dtype]), meta)

    return finish_run(accelerator, checkpoints, track, cfg, "style_lora", start_step, step, t_start, dataset.skipped,
                      write_lora)


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
        differ = changed_settings(json.loads(meta.get("stylora.config", "{}")), cfg, tuple(cfg.to_dict()))
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
        differ = changed_settings(info.get("config", {}), cfg, RESUME_INVARIANTS)
        if differ:
            raise FileExistsError(f"{checkpoint_root(output)} holds an unfinished run with other settings ({differ}); "
                                  "use its settings to continue it, or delete that folder to start again")
    return train_lora(cfg, resume=bool(done), progress=progress, on_step=on_step)


def changed_settings(saved: dict[str, Any], cfg: LoraTrainConfig, names: tuple[str, ...]) -> str:
    """The settings among `names` (except the output path) whose saved value differs from `cfg`'s, as
    "name: saved -> now" pairs; "" when none does."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as they were saved
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in names if k != "output" and saved.get(k) != now[k])


def lora_metadata(cfg: LoraTrainConfig, base, dataset: StyleDataset, steps: int, seconds: float) -> dict[str, str]:
    """The header of a style-LoRA file: our keys, kohya's `ss_*` and the SAI `modelspec.*` keys that apply."""
    now = datetime.now(timezone.utc)
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
        "stylora.base_model": base.source,
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
        "stylora.config": cfg.to_dict(),
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


def _save_preview(cfg: LoraTrainConfig, base, unet, output: Path, step: int) -> None:
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
    path = output.parent / f"{output.stem}.previews" / f"step-{step:08d}.png"
    atomic_write(path, lambda tmp: Image.fromarray(row).save(tmp, format="PNG"))
    logger.info("preview written to %s", path)
