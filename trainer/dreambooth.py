"""`train_dreambooth`: the comparison baseline, DreamBooth with prior preservation (Ruiz et al. 2023).

The UNet (optionally the text encoder) is fine-tuned on the instance images under a rare-token prompt while
class images of the base model, under the class prompt, keep the prior: loss = MSE(instance) +
prior_loss_weight * MSE(class). The result is a single-file SD1.x checkpoint in the original layout; with
lora=True it is a kohya LoRA trained the same way, for a like-for-like comparison with style LoRAs.
Data scan, checkpoints, resume, logs and the diffusion loss are the LoRA trainer's; the step loop is
trainer/loop.py's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..core.files import atomic_write
from ..core.lora_file import DTYPES, peft_to_kohya, save_lora
from ..core.version import __version__
from .base_model import load_base_model, resolve_source
from .checkpoint import RunCheckpoints, start_or_resume
from .config import DreamBoothConfig
from .dataset import BatchOrder, batch_latents, encode_latents, encode_prompt, load_style_dataset
from .ldm_layout import pipeline_to_ldm
from .loop import (
    TrainProgress,
    TrainResult,
    add_lora_adapters,
    finish_run,
    optimizer_and_schedule,
    start_accelerator,
    train_steps,
)
from .losses import denoising_loss

RESUME_INVARIANTS = ("data", "base_model", "base_config", "instance_prompt", "class_prompt", "class_data",
                     "num_class_images", "prior_loss_weight", "train_text_encoder", "lora", "rank", "alpha",
                     "target_modules", "resolution", "steps", "batch_size", "grad_accum", "learning_rate",
                     "lr_scheduler", "warmup_steps", "seed")


def train_dreambooth(cfg: DreamBoothConfig, *, resume: bool = False, overwrite: bool = False,
                     progress: bool = True) -> TrainResult:
    """Fine-tune SD1.x on cfg.data with prior preservation and write cfg.output. See DreamBoothConfig."""
    t_start = time.time()
    cfg = dataclasses.replace(cfg, base_model=resolve_source(cfg.base_model))  # recorded as an absolute path
    output = Path(cfg.output)

    # 1. Fresh run or resumption, and a writable --output; nothing is deleted here (an earlier run's
    #    checkpoints go when this run writes its first one, after the data and base model loaded).
    resume_from = start_or_resume(output, resume, overwrite, cfg.steps)

    # 2. Accelerator: devices, mixed precision, gradient accumulation, multi-GPU.
    accelerator, weight_dtype, show = start_accelerator(cfg.mixed_precision, cfg.grad_accum, progress)
    device = accelerator.device

    # 3. Instance images, scanned like a style folder (every skip reported with its reason).
    instances = load_style_dataset(cfg.data, cfg.resolution, "center", use_captions=False,
                                   min_images=cfg.min_images, max_image_pixels=cfg.max_image_pixels, progress=show)

    # 4. The base model, frozen; class images are generated from it before anything is trained.
    base = load_base_model(cfg.base_model, cfg.base_config)
    t_class = time.time()
    class_dir = Path(cfg.class_data) if cfg.class_data else generate_class_images(
        base, cfg.class_prompt, cfg.num_class_images, class_images_folder(cfg), cfg.resolution, cfg.seed,
        cfg.class_sample_steps, cfg.class_guidance, device if accelerator.is_main_process else None, show)
    accelerator.wait_for_everyone()
    class_seconds = time.time() - t_class
    classes = load_style_dataset(class_dir, cfg.resolution, "center", use_captions=False, min_images=1)
    if cfg.class_data and len(classes) > cfg.num_class_images:
        classes.files, classes.pixels = classes.files[:cfg.num_class_images], classes.pixels[:cfg.num_class_images]
        classes.captions = classes.captions[:cfg.num_class_images]

    # 5. What is trained: every UNet weight (and the text encoder), or LoRA adapters on the attention projections.
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    vae.to(device, dtype=torch.float32)
    if cfg.lora:
        unet.to(device, dtype=weight_dtype)
        add_lora_adapters(unet, cfg)
    else:
        unet.to(device)  # trained weights stay fp32; autocast runs the forward pass in the mixed dtype
        unet.requires_grad_(True)
    text_encoder.to(device, dtype=torch.float32 if cfg.train_text_encoder else weight_dtype)
    text_encoder.requires_grad_(cfg.train_text_encoder)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    params = [p for p in unet.parameters() if p.requires_grad]
    params += [p for p in text_encoder.parameters() if p.requires_grad]

    # 6. Prompts and latents, once: tokens for a trained text encoder, embeddings for a frozen one.
    def tokens(prompt: str) -> torch.Tensor:
        return base.tokenizer(prompt, padding="max_length", max_length=base.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids[0]

    prompt_ids = torch.stack([tokens(cfg.instance_prompt), tokens(cfg.class_prompt)])  # [2, 77]
    with torch.no_grad():
        fixed_embeds = torch.stack([encode_prompt(base.tokenizer, text_encoder, p, device)
                                    for p in (cfg.instance_prompt, cfg.class_prompt)])  # [2, 77, D]
    instance_cache = encode_latents(vae, instances, False, device, show)
    class_cache = encode_latents(vae, classes, False, device, show)
    vae.to("cpu")
    scaling = float(vae.config.scaling_factor)

    # 7. Optimizer and learning-rate schedule.
    optimizer, lr_schedule = optimizer_and_schedule(accelerator, params, cfg, cfg.lr)
    if cfg.train_text_encoder:
        unet, text_encoder, optimizer, lr_schedule = accelerator.prepare(unet, text_encoder, optimizer, lr_schedule)
    else:
        unet, optimizer, lr_schedule = accelerator.prepare(unet, optimizer, lr_schedule)

    def trainable_state() -> dict[str, torch.Tensor]:
        u = accelerator.unwrap_model(unet)
        state = get_peft_model_state_dict(u) if cfg.lora else dict(u.state_dict())
        if cfg.train_text_encoder:
            te = accelerator.unwrap_model(text_encoder)
            state.update({f"text_encoder.{k}": v for k, v in te.state_dict().items()})
        return state

    def load_trainable(state: dict[str, torch.Tensor]) -> None:
        te_state = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
        unet_state = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
        if cfg.lora:
            set_peft_model_state_dict(accelerator.unwrap_model(unet), unet_state)
        else:
            accelerator.unwrap_model(unet).load_state_dict(unet_state)
        if te_state:
            accelerator.unwrap_model(text_encoder).load_state_dict(te_state)

    # 8. Resume: trained weights, optimizer and schedule from the newest complete checkpoint.
    fingerprint = instances.fingerprint + ":" + classes.fingerprint
    checkpoints = RunCheckpoints(accelerator, output, trainable_state, optimizer, lr_schedule,
                                 {"config": cfg.to_dict(), "dataset_fingerprint": fingerprint}, cfg.keep_checkpoints)
    start_step = checkpoints.resume(resume_from, cfg, RESUME_INVARIANTS, load_trainable, show)

    # 9. One micro-batch: instance images under the instance prompt and as many class images under the class
    #    prompt; the class half is the prior-preservation loss.
    inst_order = BatchOrder(instances, cfg.batch_size, cfg.seed)
    class_order = BatchOrder(classes, cfg.batch_size, cfg.seed + 1)

    def micro_step(index: int, g: torch.Generator) -> torch.Tensor:
        inst_ids, class_ids = inst_order[index], class_order[index]
        inst, _ = batch_latents(inst_ids, instances, instance_cache, None, False, g, device)
        cls, _ = batch_latents(class_ids, classes, class_cache, None, False, g, device)
        latents = (torch.cat([inst, cls]) * scaling).to(device, weight_dtype)
        which = torch.tensor([0] * len(inst_ids) + [1] * len(class_ids))
        if cfg.train_text_encoder:
            states = text_encoder(prompt_ids[which].to(device))[0]
        else:
            states = fixed_embeds[which].to(device, weight_dtype)
        mse, *_ = denoising_loss(unet, noise_scheduler, latents, states, g)
        n = len(inst_ids)
        return mse[:n].mean() + cfg.prior_loss_weight * mse[n:].mean()

    # 10. The training loop (trainer/loop.py): backward, optimizer step, logs, checkpoints.
    track = TrainProgress(output, cfg.steps, start_step, cfg.log_every, "DreamBooth", show,
                          enabled=accelerator.is_main_process)
    unet.train()
    if cfg.train_text_encoder:
        text_encoder.train()
    step = train_steps(accelerator, unet, params, optimizer, lr_schedule, checkpoints, track, cfg, start_step,
                       micro_step)

    # 11. Write the result (single-file checkpoint or kohya LoRA) with its metadata, and the resource record.
    def write_result(seconds: float, peak_mb: float) -> None:
        meta = dreambooth_metadata(cfg, base, len(instances), len(classes), step, seconds, fingerprint)
        final_unet = accelerator.unwrap_model(unet)
        if cfg.lora:
            save_lora(output, peft_to_kohya(get_peft_model_state_dict(final_unet), cfg.lora_alpha,
                                            DTYPES[cfg.save_dtype]), meta)
        else:
            sd = pipeline_to_ldm(final_unet, vae, accelerator.unwrap_model(text_encoder), DTYPES[cfg.save_dtype])
            atomic_write(output, lambda tmp: save_file(sd, tmp, metadata=meta))

    return finish_run(accelerator, checkpoints, track, cfg, "dreambooth_lora" if cfg.lora else "dreambooth",
                      start_step, step, t_start, instances.skipped, write_result, class_image_seconds=class_seconds)


def class_images_folder(cfg: DreamBoothConfig) -> Path:
    if cfg.class_images_dir:
        return Path(cfg.class_images_dir)
    output = Path(cfg.output)
    return output.parent / f"{output.stem}.class_images"


def generate_class_images(base, prompt: str, count: int, folder: Path, resolution: int, seed: int, steps: int,
                          guidance: float, device: torch.device | None, progress: bool = True) -> Path:
    """`count` images of `prompt` from the base model into `folder` (class_00000.png, ...), deterministic in `seed`:
    image i uses the CPU generator seeded with (seed, i), whatever the device. Images already present are kept,
    so an interrupted run resumes; a folder made with other settings is refused rather than mixed.
    device None: only wait for the images (another process generates them)."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance, "resolution": resolution,
                "base_model_sha256": base.sha256, "sampler": "DDIM"}
    record = folder / "class_images.json"
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        if {k: saved.get(k) for k in settings} != settings:
            raise ValueError(f"{folder} holds class images made with other settings ({saved}); delete it or "
                             "choose another --class-images-dir")
    else:
        record.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    if device is None:
        return folder
    todo = [i for i in range(count) if not (folder / f"class_{i:05d}.png").is_file()]
    if not todo:
        return folder
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=DDIMScheduler.from_config(base.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(todo, desc="Generating class images", unit="img", disable=not progress):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        with torch.no_grad():
            image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                         guidance_scale=guidance, generator=g).images[0]
        atomic_write(folder / f"class_{i:05d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
    return folder


def dreambooth_metadata(cfg: DreamBoothConfig, base, n_instances: int, n_classes: int, steps: int, seconds: float,
                        fingerprint: str) -> dict[str, str]:
    """Header of a DreamBooth checkpoint or DreamBooth-LoRA: what it was trained from and how."""
    kind = "dreambooth_lora" if cfg.lora else "dreambooth"
    meta: dict[str, Any] = {
        "stylora.version": __version__,
        "stylora.kind": kind,
        "stylora.base_model": base.source,
        "stylora.base_model_sha256": base.sha256,
        "stylora.trigger": cfg.instance_prompt,
        "stylora.class_prompt": cfg.class_prompt,
        "stylora.resolution": str(cfg.resolution),
        "stylora.steps": str(steps),
        "stylora.loss_weights": {"instance_mse": 1.0, "prior_mse": cfg.prior_loss_weight},
        "stylora.dataset_size": str(n_instances),
        "stylora.class_images": str(n_classes),
        "stylora.dataset_fingerprint": fingerprint,
        "stylora.train_seconds": f"{seconds:.1f}",
        "stylora.config": cfg.to_dict(),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora" if cfg.lora else "stable-diffusion-v1",
        "modelspec.implementation": "diffusers" if cfg.lora else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": Path(cfg.output).stem,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": cfg.instance_prompt,
    }
    if cfg.lora:
        meta.update({"stylora.rank": str(cfg.rank), "stylora.alpha": str(cfg.lora_alpha),
                     "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
                     "ss_network_alpha": str(cfg.lora_alpha), "ss_base_model_version": "sd_v1",
                     "ss_sd_model_name": base.name, "ss_sd_model_hash": base.legacy_hash,
                     "ss_new_sd_model_hash": base.sha256, "ss_reg_dataset_dirs": json.dumps({"class": n_classes})})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
