"""`train_dreambooth`: the comparison baseline, DreamBooth with prior preservation (Ruiz et al. 2023).

The UNet (optionally the text encoder) is fine-tuned on the instance images under a rare-token prompt while
class images of the base model, under the class prompt, keep the prior: loss = MSE(instance) +
prior_loss_weight * MSE(class). The result is a single-file SD1.x checkpoint in the original layout; with
lora=True it is a kohya LoRA trained the same way, for a like-for-like comparison with style LoRAs.
The run (data scan, base model, checkpoints, resume, logs, the step loop) is trainer/loop.py's; the loss is
trainer/losses.py's.
"""

from __future__ import annotations

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
from .config import DreamBoothConfig
from .dataset import BatchOrder, batch_latents, encode_latents, encode_prompt, load_style_dataset
from .ldm_layout import pipeline_to_ldm
from .loop import Recipe, RunContext, TrainResult, add_lora_adapters, run_training
from .losses import prior_preservation_loss
from .seeds import stream

RESUME_INVARIANTS = ("data", "base_model", "base_config", "instance_prompt", "class_prompt", "class_data",
                     "num_class_images", "prior_loss_weight", "train_text_encoder", "lora", "rank", "alpha",
                     "target_modules", "resolution", "steps", "batch_size", "grad_accum", "learning_rate",
                     "lr_scheduler", "warmup_steps", "seed")


def train_dreambooth(cfg: DreamBoothConfig, *, resume: bool = False, overwrite: bool = False,
                     progress: bool = True) -> TrainResult:
    """Fine-tune SD1.x on cfg.data with prior preservation and write cfg.output. See DreamBoothConfig."""
    return run_training(cfg, DreamBoothRecipe, resume=resume, overwrite=overwrite, progress=progress)


class DreamBoothRecipe(Recipe):
    """Every UNet weight (and optionally the text encoder), or LoRA adapters, trained on instance images under the
    instance prompt beside class images under the class prompt (trainer.losses.prior_preservation_loss)."""

    title, invariants = "DreamBooth", RESUME_INVARIANTS

    def __init__(self, run: RunContext):
        super().__init__(run)
        cfg, base, device, dtype = run.cfg, run.base, run.device, run.weight_dtype
        assert isinstance(cfg, DreamBoothConfig)
        self.cfg, self.kind = cfg, "dreambooth_lora" if cfg.lora else "dreambooth"
        # 1. Class images, generated from the frozen base model before anything is trained (or cfg.class_data).
        t_class = time.time()
        class_dir = Path(cfg.class_data) if cfg.class_data else generate_class_images(
            base, cfg.class_prompt, cfg.num_class_images, class_images_folder(cfg), cfg.resolution, cfg.seed,
            cfg.class_sample_steps, cfg.class_guidance, device if run.accelerator.is_main_process else None, run.show)
        run.accelerator.wait_for_everyone()
        self.class_seconds = time.time() - t_class
        self.classes = load_style_dataset(class_dir, cfg.resolution, "center", use_captions=False, min_images=1)
        if cfg.class_data and len(self.classes) > cfg.num_class_images:
            n = cfg.num_class_images
            self.classes.files, self.classes.pixels = self.classes.files[:n], self.classes.pixels[:n]
            self.classes.captions = self.classes.captions[:n]

        # 2. What is trained: every UNet weight (and the text encoder), or LoRA adapters on the attention projections.
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        self.vae.to(device, dtype=torch.float32)
        if cfg.lora:
            self.unet.to(device, dtype=dtype)
            add_lora_adapters(self.unet, cfg)
        else:
            self.unet.to(device)  # trained weights stay fp32; autocast runs the forward pass in the mixed dtype
            self.unet.requires_grad_(True)
        self.text_encoder.to(device, dtype=torch.float32 if cfg.train_text_encoder else dtype)
        self.text_encoder.requires_grad_(cfg.train_text_encoder)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.params = [p for m in (self.unet, self.text_encoder) for p in m.parameters() if p.requires_grad]

        # 3. Prompts and latents, once: tokens for a trained text encoder, embeddings for a frozen one.
        self.prompt_ids = torch.stack([prompt_tokens(base.tokenizer, p)
                                       for p in (cfg.instance_prompt, cfg.class_prompt)])  # [2, 77]
        with torch.no_grad():
            self.fixed_embeds = torch.stack([encode_prompt(base.tokenizer, self.text_encoder, p, device)
                                             for p in (cfg.instance_prompt, cfg.class_prompt)])  # [2, 77, D]
        self.instance_cache = encode_latents(self.vae, run.dataset, False, device, run.show)
        self.class_cache = encode_latents(self.vae, self.classes, False, device, run.show)
        self.vae.to("cpu")
        self.scaling = float(self.vae.config.scaling_factor)
        self.instance_order = BatchOrder(run.dataset, cfg.batch_size, cfg.seed)
        self.class_order = BatchOrder(self.classes, cfg.batch_size, cfg.seed + 1)

    @property
    def fingerprint(self) -> str:
        return self.run.dataset.fingerprint + ":" + self.classes.fingerprint

    def prepare(self, optimizer: torch.optim.Optimizer, lr_schedule: Any) -> tuple[torch.optim.Optimizer, Any]:
        prepare = self.run.accelerator.prepare
        if self.cfg.train_text_encoder:
            self.model, self.text_encoder, optimizer, lr_schedule = prepare(self.unet, self.text_encoder, optimizer,
                                                                             lr_schedule)
        else:
            self.model, optimizer, lr_schedule = prepare(self.unet, optimizer, lr_schedule)
        return optimizer, lr_schedule

    def train_mode(self) -> None:
        self.model.train()
        if self.cfg.train_text_encoder:
            self.text_encoder.train()

    def loss(self, index: int, g: torch.Generator) -> torch.Tensor:
        """Instance images under the instance prompt and as many class images under the class prompt."""
        device, dtype = self.run.device, self.run.weight_dtype
        inst_ids, class_ids = self.instance_order[index], self.class_order[index]
        inst, _ = batch_latents(inst_ids, self.run.dataset, self.instance_cache, None, False, g, device)
        cls, _ = batch_latents(class_ids, self.classes, self.class_cache, None, False, g, device)
        latents = (torch.cat([inst, cls]) * self.scaling).to(device, dtype)
        which = torch.tensor([0] * len(inst_ids) + [1] * len(class_ids))
        if self.cfg.train_text_encoder:
            states = self.text_encoder(self.prompt_ids[which].to(device))[0]
        else:
            states = self.fixed_embeds[which].to(device, dtype)
        return prior_preservation_loss(self.model, self.noise_scheduler, latents, states, g, len(inst_ids),
                                       self.cfg.prior_loss_weight)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        unwrap = self.run.accelerator.unwrap_model
        unet = unwrap(self.model)
        state = get_peft_model_state_dict(unet) if self.cfg.lora else dict(unet.state_dict())
        if self.cfg.train_text_encoder:
            state.update({f"text_encoder.{k}": v for k, v in unwrap(self.text_encoder).state_dict().items()})
        return state

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        unwrap = self.run.accelerator.unwrap_model
        te_state = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
        unet_state = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
        if self.cfg.lora:
            set_peft_model_state_dict(unwrap(self.model), unet_state)
        else:
            unwrap(self.model).load_state_dict(unet_state)
        if te_state:
            unwrap(self.text_encoder).load_state_dict(te_state)

    def write(self, steps: int, seconds: float, peak_mb: float) -> None:
        """A single-file checkpoint in the original layout, or a kohya LoRA, with its metadata."""
        cfg, output, unwrap = self.cfg, Path(self.cfg.output), self.run.accelerator.unwrap_model
        meta = dreambooth_metadata(cfg, self.run.base, len(self.run.dataset), len(self.classes), steps, seconds,
                                   self.fingerprint)
        if cfg.lora:
            save_lora(output, peft_to_kohya(get_peft_model_state_dict(unwrap(self.model)), cfg.lora_alpha,
                                            DTYPES[cfg.save_dtype]), meta)
        else:
            sd = pipeline_to_ldm(unwrap(self.model), self.vae, unwrap(self.text_encoder), DTYPES[cfg.save_dtype])
            atomic_write(output, lambda tmp: save_file(sd, tmp, metadata=meta))

    def record(self) -> dict[str, Any]:
        return {"class_image_seconds": self.class_seconds}


def prompt_tokens(tokenizer: Any, prompt: str) -> torch.Tensor:
    """CLIP token ids [77] of `prompt`, padded to the tokenizer's length."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids[0]


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
        g = stream(seed, i)
        with torch.no_grad():
            image = pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                         guidance_scale=guidance, generator=g).images[0]
        atomic_write(folder / f"class_{i:05d}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
    return folder


def dreambooth_metadata(cfg: DreamBoothConfig, base, n_instances: int, n_classes: int, steps: int, seconds: float,
                        fingerprint: str) -> dict[str, str]:
    """Header of a DreamBooth checkpoint or DreamBooth-LoRA: what it was trained from and how."""
    kind = "dreambooth_lora" if cfg.lora else "dreambooth"
    settings = cfg.to_metadata()  # local paths by name only: the file may be shared
    meta: dict[str, Any] = {
        "stylora.version": __version__,
        "stylora.kind": kind,
        "stylora.base_model": settings["base_model"],
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
        "stylora.config": settings,
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
