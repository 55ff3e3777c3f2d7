"""`train_lora`: a folder of paintings in, a style LoRA for SD1.x out.

The recipe is the plan's (and diffusers' train_text_to_image_lora.py's): rank-4 LoRA on the UNet's
attention projections, AdamW at 1e-4 with a cosine schedule, epsilon-prediction MSE with min-SNR
weighting, trained against one fixed prompt (empty by default) so that the style needs no prompt.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import checkpoint_root, complete_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LoraTrainConfig
from .dataset import BatchOrder, Skipped, StyleDataset, load_style_dataset
from .lora_file import DTYPES, peft_to_kohya, save_lora

logger = logging.getLogger(__name__)

# Settings that must not change between a run and its resumption (they change what is being trained).
RESUME_INVARIANTS = ("data", "base_model", "base_config", "trigger", "use_captions", "resolution", "crop", "flip",
                     "rank", "alpha", "target_modules", "batch_size", "grad_accum", "seed", "steps",
                     "learning_rate", "lr_scheduler", "warmup_steps")


@dataclass
class TrainResult:
    output: Path  # the written LoRA file
    steps: int  # optimizer steps completed in total (including resumed ones)
    resumed_from: int  # step the run resumed from (0: fresh start)
    final_loss: float  # mean loss over the last logging window
    losses: list[float] = field(default_factory=list)  # per-step loss of this run (mean over processes)
    skipped: list[Skipped] = field(default_factory=list)  # data files not used, with reasons
    seconds: float = 0.0  # wall time of this run
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step of this run
    peak_memory_mb: float = 0.0  # CUDA peak allocated, or the process's peak RSS on CPU


def train_lora(cfg: LoraTrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
               perceptual: torch.nn.Module | None = None) -> TrainResult:
    """Train a style LoRA as `cfg` says and write it to `cfg.output`. See LoraTrainConfig for every knob.

    `perceptual` may supply the LPIPS + Gram loss network (eval.metrics.PerceptualLoss) used when
    cfg.lpips_weight or cfg.style_weight > 0; by default it is built from the published weights.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    t_start = time.time()
    output = Path(cfg.output)

    # 1. Decide between a fresh run and a resumption; never silently overwrite earlier work.
    resume_from = start_or_resume(output, resume, overwrite)

    # 2. Accelerator: device placement, mixed precision, gradient accumulation, multi-GPU.
    release_accelerator_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    show = progress and accelerator.is_local_main_process

    # 3. Scan the style images: every file either used or reported with a reason.
    dataset = load_style_dataset(cfg.data, cfg.resolution, cfg.crop, cfg.trigger, cfg.use_captions,
                                 cfg.min_images, cfg.max_image_pixels, progress=show)
    logger.info("%d usable images in %d bucket(s), %d skipped", len(dataset), len(dataset.buckets),
                len(dataset.skipped))

    # 4. Load the frozen base model; frozen weights live in the mixed-precision dtype.
    from .base_model import load_base_model

    base = load_base_model(cfg.base_model, cfg.base_config)
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    vae.to(device, dtype=torch.float32)  # the SD1.5 VAE overflows in fp16; it runs once per image when caching
    text_encoder.to(device, dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype)

    # 5. LoRA adapters on the attention projections; trainable weights stay fp32 (diffusers' recipe).
    torch.manual_seed(cfg.seed)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(cfg.target_modules)))
    if cfg.mixed_precision != "no":
        cast_training_params(unet, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    if not lora_params:
        raise ValueError(f"target_modules {list(cfg.target_modules)} matched no UNet layer")
    use_perceptual = cfg.lpips_weight > 0 or cfg.style_weight > 0
    if use_perceptual:
        perceptual = _perceptual_net(perceptual).to(device)
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
    optimizer = make_optimizer(lora_params, cfg.learning_rate, cfg.adam_weight_decay, cfg.use_8bit_adam)
    lr_schedule = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
                                num_training_steps=cfg.steps * accelerator.num_processes)
    unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)

    # 8. Resume: adapter weights, optimizer moments and schedule position from the newest complete checkpoint.
    checkpoints = RunCheckpoints(accelerator, output, lambda: get_peft_model_state_dict(accelerator.unwrap_model(unet)),
                                 optimizer, lr_schedule,
                                 {"config": cfg.to_dict(), "dataset_fingerprint": dataset.fingerprint},
                                 cfg.keep_checkpoints)
    start_step = 0
    if resume_from is not None:
        start_step, folder = resume_from
        set_peft_model_state_dict(accelerator.unwrap_model(unet), checkpoints.restore(folder, cfg, RESUME_INVARIANTS))
        if show:
            tqdm.write(f"Resuming from step {start_step} of {cfg.steps} ({folder})")

    track = TrainProgress(output, cfg.steps, start_step, cfg.log_every, "Training style LoRA", show, cfg.log_with,
                          enabled=accelerator.is_main_process)

    # 9. The training loop. Noise, timesteps and batches are drawn from generators seeded by the
    #    micro-step index, so a resumed run continues exactly as the uninterrupted one would have.
    unet.train()
    step = start_step
    batches = BatchOrder(dataset, cfg.batch_size, cfg.seed)
    try:
        while step < cfg.steps:
            track.begin_step()
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                index = (step * cfg.grad_accum + micro) * accelerator.num_processes + accelerator.process_index
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
                ids = batches[index]
                with accelerator.accumulate(unet):
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

                    # 9d. Backward and (on the last micro-batch) the optimizer step.
                    optimizer_step(accelerator, loss, lora_params, optimizer, lr_schedule, cfg.max_grad_norm)
                # The mean over processes: the loss of the global batch, whatever the process count.
                step_loss += accelerator.reduce(loss.detach(), "mean").item() / cfg.grad_accum
            step += 1
            track.end_step(step, step_loss, lr_schedule.get_last_lr()[0])
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoints.save(step)
            if cfg.preview_every and step % cfg.preview_every == 0 and accelerator.is_main_process:
                _save_preview(cfg, base, accelerator.unwrap_model(unet), output, step)
    except KeyboardInterrupt:
        if step > start_step:
            checkpoints.save(step)
            logger.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
        raise
    finally:
        track.close()

    # 10. Write the LoRA in kohya layout with its metadata, then a last checkpoint for reference.
    accelerator.wait_for_everyone()
    final_unet = accelerator.unwrap_model(unet)
    adapter = get_peft_model_state_dict(final_unet)
    from ..eval.cost import peak_memory_mb, write_resource_record

    peak_mb = peak_memory_mb(device)
    seconds = time.time() - t_start
    if accelerator.is_main_process:
        meta = lora_metadata(cfg, base, dataset, step, seconds)
        meta["stylora.train_peak_memory_mb"] = f"{peak_mb:.0f}"
        save_lora(output, peft_to_kohya(adapter, cfg.lora_alpha, DTYPES[cfg.save_dtype]), meta)
        write_resource_record(output, run_record("style_lora", cfg, device, track, start_step, seconds, peak_mb,
                                                 processes=accelerator.num_processes))
        logger.info("wrote %s (%d steps)", output, step)
    if cfg.checkpoint_every:
        checkpoints.save(step)  # every process: it ends on a barrier
    return TrainResult(output, step, start_step, track.final_loss, track.losses, dataset.skipped, seconds,
                       track.step_seconds, peak_mb)


class RunCheckpoints:
    """The resumable checkpoints of one run: the trained weights (whatever `weights()` returns), the optimizer's
    and the LR schedule's state. `save` writes on the main process and ends on a barrier for every process."""

    def __init__(self, accelerator, output: Path, weights, optimizer, lr_schedule, info: dict[str, Any], keep: int):
        self.accelerator, self.root, self.weights = accelerator, checkpoint_root(output), weights
        self.optimizer, self.lr_schedule, self.info, self.keep = optimizer, lr_schedule, info, keep

    def save(self, step: int) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.root, step, self.weights(),
                            {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_schedule.state_dict()},
                            self.info, keep=self.keep)
        self.accelerator.wait_for_everyone()

    def restore(self, folder: Path, cfg: Any, invariants: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Check `folder` belongs to this run (settings and images), restore optimizer and schedule, and return
        the trained weights for the caller to load."""
        weights, state, info = load_checkpoint(folder)
        check_resumable(cfg, info, self.info["dataset_fingerprint"], folder, invariants)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_scheduler"])
        logger.info("resumed from %s", folder)
        return weights


def run_record(kind: str, cfg: Any, device: torch.device, track: TrainProgress, start_step: int, seconds: float,
               peak_mb: float, **extra: Any) -> dict[str, Any]:
    """The resource record both trainers write beside their output (see eval.cost.write_resource_record)."""
    return {"kind": kind, "steps": start_step + len(track.step_seconds), "train_seconds": seconds,
            "loop_seconds": sum(track.step_seconds), "resumed_from": start_step, "peak_memory_mb": peak_mb,
            "device": str(device), "mixed_precision": cfg.mixed_precision, "resolution": cfg.resolution,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, **extra}


def start_or_resume(output: Path, resume: bool, overwrite: bool) -> tuple[int, Path] | None:
    """The checkpoint to resume from (None: a fresh run). Refuses to replace an earlier run's output or
    checkpoints unless `overwrite`; with `overwrite`, clears that run's checkpoints."""
    ckpt_root = checkpoint_root(output)
    if resume:
        found = latest_checkpoint(ckpt_root)
        if found is None:
            logger.warning("--resume: no complete checkpoint in %s, starting from step 0", ckpt_root)
        return found
    if output.exists() and not overwrite:
        raise FileExistsError(f"--output {output} already exists; pass --overwrite to replace it")
    if complete_checkpoints(ckpt_root) and not overwrite:
        raise FileExistsError(f"{ckpt_root} holds checkpoints of an earlier run; pass --resume to continue it "
                              "or --overwrite to start again")
    if overwrite and ckpt_root.is_dir():  # a later --resume must not pick up the replaced run's steps
        shutil.rmtree(ckpt_root, ignore_errors=True)  # every process of a multi-GPU run clears it at once
    return None


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_states: torch.Tensor, g: torch.Generator,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The diffusion training objective for a batch of clean latents z0 [B, 4, h, w] (scaled).

    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps with t ~ U{0..T-1} (Ho et al. 2020); the UNet predicts eps (or v).
    Noise and timesteps come from `g`, so a batch's draw depends only on its seed. Optional offset noise
    (Guttenberg 2023) and min-SNR-gamma weighting (Hang et al. 2023).
    Returns (per-sample loss [B], z_t, prediction, t).
    """
    from diffusers.training_utils import compute_snr

    device, dtype = latents.device, latents.dtype
    noise = torch.randn(latents.shape, generator=g)
    if noise_offset:
        noise += noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g)
    noise = noise.to(device, dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, encoder_states, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = compute_snr(noise_scheduler, t)
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr if epsilon else snr + 1)
    return loss, noisy, pred, t


def release_accelerator_state() -> None:
    """Forget the accelerator settings of an earlier `train_lora` in this process (a second style, a ComfyUI
    session), so this run may choose another mixed precision. accelerate keeps them in class-level singletons
    that refuse a changed setting; its own test-suite clears them the same way between runs. The distributed
    process state (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def encode_prompt(tokenizer, text_encoder, prompt: str, device: torch.device) -> torch.Tensor:
    """CLIP last hidden state [77, D] of `prompt` ("" for the unconditional/promptless embedding)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0][0].float().cpu()


def batch_latents(ids: list[int], dataset: StyleDataset, cache, vae, flip: bool, g: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, list[bool]]:
    """Unscaled latents [B, 4, H/8, W/8] sampled from the VAE posterior of images `ids`, mirrored at random
    when `flip`; also returns which images were mirrored."""
    if cache is not None:
        mirrored = (torch.randint(0, 2, (len(ids),), generator=g) if flip else torch.zeros(len(ids))).bool().tolist()
        mean = torch.stack([cache[int(m)][0][i] for i, m in zip(ids, mirrored)])
        std = torch.stack([cache[int(m)][1][i] for i, m in zip(ids, mirrored)])
        return mean + std * torch.randn(mean.shape, generator=g), mirrored
    pixels = torch.stack([dataset.pixels[i] for i in ids])
    mirror = bool(flip and torch.rand((), generator=g) < 0.5)
    if mirror:
        pixels = pixels.flip(-1)
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, torch.float32) / 127.5 - 1).latent_dist
    return dist.mean.cpu() + dist.std.cpu() * torch.randn(dist.mean.shape, generator=g), [mirror] * len(ids)


def _perceptual_net(given: torch.nn.Module | None) -> torch.nn.Module:
    if given is not None:
        return given
    from ..eval.metrics import PerceptualLoss
    from ..eval.weights import WeightsUnavailable

    try:
        return PerceptualLoss()
    except WeightsUnavailable as e:  # the run must not quietly drop a loss term the user asked for
        raise ValueError(f"lpips_weight/style_weight need pretrained feature networks: {e}") from e


def perceptual_terms(noise_scheduler, vae, perceptual: torch.nn.Module, noisy: torch.Tensor, pred: torch.Tensor,
                     t: torch.Tensor, target_pixels: torch.Tensor, scaling: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """LPIPS and Gram losses [B] between the decoded x0 prediction and the training images.

    x0 = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t) for epsilon prediction, sqrt(abar_t) z_t - sqrt(1 - abar_t) v
    for v-prediction (Salimans & Ho 2022). Only meaningful at low noise, where that prediction is sharp; the
    caller selects those samples. Gradients reach `pred` (and so the LoRA weights) through the frozen VAE
    decoder and feature networks. target_pixels: uint8 [B, 3, H, W].
    """
    abar = noise_scheduler.alphas_cumprod.to(pred.device)[t].view(-1, 1, 1, 1).float()
    z_t, out = noisy.float(), pred.float()
    if noise_scheduler.config.prediction_type == "epsilon":
        x0 = (z_t - (1 - abar).sqrt() * out) / abar.sqrt()
    else:
        x0 = abar.sqrt() * z_t - (1 - abar).sqrt() * out
    decoded = vae.decode(x0 / scaling).sample  # [-1, 1], fp32: the SD VAE overflows in fp16
    image = (decoded / 2 + 0.5).clamp(0, 1)
    return perceptual(image, target_pixels.float() / 255)


def encode_latents(vae, dataset: StyleDataset, flip: bool, device: torch.device, show: bool
                    ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """VAE posterior (mean, std) per image, [4, H/8, W/8] each; index 1 holds the mirrored images."""
    from tqdm.auto import tqdm

    out = []
    for mirrored in ([False, True] if flip else [False]):
        means, stds = [], []
        for px in tqdm(dataset.pixels, desc="Encoding latents" + (" (mirrored)" if mirrored else ""),
                       unit="img", disable=not show):
            x = px.flip(-1) if mirrored else px
            with torch.no_grad():
                dist = vae.encode(x[None].to(device, torch.float32) / 127.5 - 1).latent_dist
            means.append(dist.mean[0].cpu())
            stds.append(dist.std[0].cpu())
        out.append((means, stds))
    return out


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, use_8bit: bool
                   ) -> torch.optim.Optimizer:
    """AdamW over `params`; bitsandbytes' 8-bit AdamW when `use_8bit` and it is installed with a CUDA device
    (Dettmers et al. 2022: a quarter of the optimizer memory)."""
    if use_8bit:
        try:
            import bitsandbytes as bnb

            if params and params[0].device.type == "cuda":
                return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
            logger.info("use_8bit_adam: 8-bit AdamW needs CUDA; using torch AdamW")
        except ImportError:
            logger.info("use_8bit_adam: bitsandbytes is not installed; using torch AdamW")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def check_resumable(cfg: Any, info: dict[str, Any], fingerprint: str, folder: Path,
                    invariants: tuple[str, ...] = RESUME_INVARIANTS) -> None:
    """Refuse to resume when settings that change what is trained, or the images, differ from the checkpoint's."""
    saved = info.get("config", {})
    now = cfg.to_dict()
    changed = [k for k in invariants if k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume: settings differ from the run in {folder} ({detail}); "
                         "use the same settings, or start a new run with --overwrite")
    if info.get("dataset_fingerprint") != fingerprint:
        raise ValueError(f"--resume: the images in {cfg.data} changed since {folder} was written; "
                         "restore them or start a new run with --overwrite")


def lora_metadata(cfg: LoraTrainConfig, base, dataset: StyleDataset, steps: int, seconds: float) -> dict[str, str]:
    """The header of a style-LoRA file: our keys, kohya's `ss_*` and the SAI `modelspec.*` keys that apply."""
    from .. import __version__

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
        "stylora.suggested_denoise": "0.6",
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
        "modelspec.usage_hint": "Style LoRA: apply at strength ~1.0 with img2img denoise ~0.6; "
                                + (f"add '{cfg.trigger}' to the prompt" if cfg.trigger else "no prompt needed"),
    }
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


class TrainProgress:
    """A run's progress bar, per-step losses and timings, and `<output stem>.train_log.csv` (step, loss, lr,
    steps/s, elapsed; mean loss over each logging window), with TensorBoard when asked for."""

    FIELDS = ("step", "loss", "lr", "steps_per_s", "elapsed_s")

    def __init__(self, output: Path, total: int, start_step: int, log_every: int, desc: str, show: bool,
                 log_with: str = "csv", enabled: bool = True):
        from tqdm.auto import tqdm

        self.total, self.start_step, self.log_every, self.enabled = total, start_step, log_every, enabled
        self.losses: list[float] = []  # per-step loss of this process's run
        self.step_seconds: list[float] = []  # wall time of each optimizer step of this run
        self._window: list[float] = []
        self._t0, self._t_step = time.time(), time.perf_counter()
        self.bar = tqdm(total=total, initial=start_step, desc=desc, unit="step", disable=not show)
        self.path = output.parent / f"{output.stem}.train_log.csv"
        self.tb = None
        if not enabled:
            return
        kept = []
        if start_step and self.path.is_file():  # a resumed run: keep the rows up to the resumed step
            with open(self.path, newline="", encoding="utf-8") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()
        if log_with == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output.parent / f"{output.stem}.tensorboard"))
            except ImportError:
                logger.warning("log_with=tensorboard: the tensorboard package is not installed; logging CSV only")

    def begin_step(self) -> None:
        self._t_step = time.perf_counter()

    def end_step(self, step: int, loss: float, lr: float) -> None:
        """Record optimizer step `step` (1-based): bar, timing, and a CSV row every `log_every` steps."""
        self.step_seconds.append(time.perf_counter() - self._t_step)
        self.losses.append(loss)
        self._window.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.enabled and (step % self.log_every == 0 or step == self.total):
            mean = sum(self._window) / len(self._window)
            rate = len(self.step_seconds) / max(sum(self.step_seconds), 1e-9)
            self.writer.writerow({"step": step, "loss": f"{mean:.6f}", "lr": f"{lr:.3e}",
                                  "steps_per_s": f"{rate:.4f}", "elapsed_s": f"{time.time() - self._t0:.1f}"})
            self.file.flush()
            if self.tb is not None:
                self.tb.add_scalar("train/loss", mean, step)
                self.tb.add_scalar("train/lr", lr, step)
            self._window = []

    @property
    def final_loss(self) -> float:
        """Mean loss of the last logging window's steps (NaN when no step ran)."""
        tail = self.losses[-self.log_every:]
        return sum(tail) / len(tail) if tail else float("nan")

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.file.closed:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def optimizer_step(accelerator, loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer, lr_schedule,
                   max_grad_norm: float) -> None:
    """Backward; on the last micro-batch of an accumulation (accelerate decides) clip, step, advance the LR."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad(set_to_none=True)


def _save_preview(cfg: LoraTrainConfig, base, unet, output: Path, step: int) -> None:
    """Stylise the preview content photos with the LoRA as trained so far (img2img), saved as one PNG row."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    from .dataset import scan_folder
    from .files import atomic_write
    from .images import ImageLoadError, load_image, resize_cover

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
