"""Training configurations: one frozen dataclass per trainer, shared by the CLI, the nodes and the
metadata saved in every LoRA file (the pattern of whisper's `DecodingOptions` and peft's `LoraConfig`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The attention projections of every UNet transformer block (self- and cross-attention): the style-LoRA
# target of diffusers' train_text_to_image_lora.py; style lives in how features attend to each other.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def check_at_least(cfg: Any, names: tuple[str, ...], low: float) -> None:
    """Each field in `names` is a finite number >= `low`; `not (x >= low)` also refuses NaN, which every
    comparison lets through."""
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not math.isfinite(value) or not value >= low:
            raise ValueError(f"{name} must be >= {low:g} and finite, got {value!r}")


def check_positive(cfg: Any, names: tuple[str, ...]) -> None:
    """Each field in `names` (when not None) is a finite number > 0."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and (not math.isfinite(value) or not value > 0):
            raise ValueError(f"{name} must be > 0 and finite, got {value!r}")


class _TrainerSettings:
    """What the trainers' configs share: how they are saved into metadata, and the LoRA scale alpha."""

    rank: int
    alpha: float | None

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class LoraTrainConfig(_TrainerSettings):
    """Everything that decides what `stylora train lora` produces. Saved into the LoRA's metadata."""

    # --- data and model ---
    data: str = field(
        metadata={"help": "folder of style images (searched recursively); `name.txt` beside an image is its caption"})
    output: str = field(metadata={"help": "path of the .safetensors LoRA to write"})
    base_model: str = field(
        default=DEFAULT_BASE_MODEL, metadata={"help": "hub id, diffusers folder, or single-file SD1.x checkpoint"})
    base_config: str | None = field(
        default=None,
        metadata={"help": "diffusers config folder for a single-file checkpoint; None = shipped SD1.5 configs"})
    trigger: str = field(
        default="",
        metadata={"help": "optional trigger phrase; \"\" trains against the empty prompt (promptless style)"})
    use_captions: bool = field(
        default=True, metadata={"help": "read per-image caption .txt files when present (trigger is prepended)"})
    min_images: int = field(default=5, metadata={"help": "fewer usable images than this is an error"})
    max_image_pixels: int = field(
        default=100_000_000, metadata={"help": "larger images are refused as decompression bombs (width*height)"})

    # --- image preparation ---
    resolution: int = field(
        default=512, metadata={"help": "training side length in pixels (square crops) or bucket area = resolution**2"})
    crop: Literal["center", "buckets"] = field(
        default="center", metadata={"help": "square center crop, or aspect-ratio buckets (multiples of 64)"})
    flip: bool = field(
        default=False,
        metadata={"help": "also train on horizontally mirrored copies (off: strokes and signatures have a direction)"})
    cache_latents: bool = field(
        default=True, metadata={"help": "encode every image with the VAE once, before training"})

    # --- LoRA ---
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (scale alpha/r = 1)"})
    target_modules: tuple[str, ...] = field(
        default=ATTENTION_PROJECTIONS, metadata={"help": "UNet Linear layers that get adapters"})
    save_dtype: Literal["fp16", "bf16", "fp32"] = field(
        default="fp16", metadata={"help": "dtype of the weights in the written file"})

    # --- optimisation ---
    steps: int = field(default=6000, metadata={
        "help": "optimizer steps (5000-8000 suit 50-100 paintings at rank 4; fewer underfit the strokes)"})
    batch_size: int = field(default=2, metadata={
        "help": "images per micro-batch (2-4 fit 512 px SD1.5 training on a 16 GB GPU)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate for the LoRA weights"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "any diffusers.optimization scheduler name"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps of the LR schedule"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit when installed (CUDA only)"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "autocast dtype; frozen weights are stored in it"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute UNet activations in backward (less memory, ~30% slower)"})
    seed: int = field(
        default=0, metadata={"help": "seeds LoRA init, data order, noise and timesteps: same seed, same run"})

    # --- loss: alpha * MSE(noise) + beta * LPIPS + gamma * Gram style loss ---
    mse_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the denoising MSE"})
    lpips_weight: float = field(
        default=0.0, metadata={"help": "beta: LPIPS(predicted clean image, training image), low-noise steps only"})
    style_weight: float = field(
        default=0.0,
        metadata={"help": "gamma: Gram-matrix style loss (Gatys et al. 2016) on the predicted clean image"})
    perceptual_max_timestep: int = field(
        default=200, metadata={"help": "perceptual terms only for t below this, where the x0 prediction is meaningful"})
    min_snr_gamma: float | None = field(
        default=5.0, metadata={"help": "min-SNR loss weighting (Hang et al. 2023); None disables"})
    noise_offset: float = field(
        default=0.0, metadata={"help": "offset noise (Guttenberg 2023); 0.05-0.1 helps very dark/bright styles"})

    # --- bookkeeping ---
    checkpoint_every: int = field(
        default=500, metadata={"help": "save a resumable checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "complete checkpoints kept; older ones are deleted"})
    log_every: int = field(default=10, metadata={"help": "CSV (and TensorBoard) log interval in steps"})
    log_with: Literal["csv", "tensorboard"] = field(default="csv", metadata={"help": "tensorboard also writes CSV"})
    preview_every: int = field(
        default=0, metadata={"help": "stylise --preview-content images every N steps (0: never)"})
    preview_content: str | None = field(default=None, metadata={"help": "folder of content photos for previews"})
    preview_strength: float = field(default=0.6, metadata={"help": "img2img denoise of the previews"})
    preview_steps: int = field(default=20, metadata={"help": "sampler steps of the previews"})

    def __post_init__(self) -> None:
        check_at_least(self, ("resolution", "rank", "steps", "batch_size", "grad_accum", "min_images",
                              "preview_steps", "max_image_pixels"), 1)
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64 (VAE+UNet downsample 64x), got {self.resolution}")
        check_positive(self, ("learning_rate", "alpha"))
        check_at_least(self, ("mse_weight", "lpips_weight", "style_weight", "noise_offset", "warmup_steps",
                              "checkpoint_every", "keep_checkpoints", "log_every", "preview_every", "max_grad_norm",
                              "adam_weight_decay", "perceptual_max_timestep", "seed"), 0)
        # min-SNR weights are min(SNR, gamma) / SNR: gamma <= 0 gives zero or negative weights (training backwards)
        check_positive(self, ("min_snr_gamma",))
        if self.mse_weight + self.lpips_weight + self.style_weight == 0:
            raise ValueError("mse_weight, lpips_weight and style_weight are all 0: there is nothing to train on")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.crop not in ("center", "buckets"):
            raise ValueError(f"crop must be 'center' or 'buckets', got {self.crop!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.save_dtype not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"save_dtype must be 'fp16', 'bf16' or 'fp32', got {self.save_dtype!r}")
        if not 0 < self.preview_strength <= 1:  # False for NaN too
            raise ValueError(f"preview_strength must be in (0, 1], got {self.preview_strength}")
        if self.preview_every and not self.preview_content:
            raise ValueError("preview_every needs preview_content: a folder of content photos to stylise")
        if not str(self.output).endswith(".safetensors"):
            raise ValueError(f"output must be a .safetensors file, got {self.output!r}")






@dataclass(frozen=True)
class DreamBoothConfig(_TrainerSettings):
    """Everything that decides what `stylora train dreambooth` produces (Ruiz et al. 2023, with prior
    preservation). Saved into the checkpoint's metadata."""

    # --- data and model ---
    data: str = field(metadata={"help": "folder of instance (style) images"})
    output: str = field(
        metadata={"help": "the .safetensors to write: a full SD1.x checkpoint, or a LoRA with lora=True"})
    base_model: str = field(
        default=DEFAULT_BASE_MODEL, metadata={"help": "hub id, diffusers folder, or single-file SD1.x checkpoint"})
    base_config: str | None = field(
        default=None, metadata={"help": "diffusers config folder for a single-file checkpoint; None = shipped SD1.5"})
    instance_prompt: str = field(
        default="sks style painting", metadata={"help": "prompt of the instance images, with a rare token"})
    class_prompt: str = field(default="painting", metadata={"help": "prompt of the prior-preservation class images"})
    class_data: str | None = field(
        default=None, metadata={"help": "folder of class images; None generates them with the base model"})
    class_images_dir: str | None = field(
        default=None, metadata={"help": "where generated class images are kept; None = <output>.class_images"})
    num_class_images: int = field(default=100, metadata={"help": "class images to generate (or use from class_data)"})
    class_sample_steps: int = field(default=30, metadata={"help": "sampler steps per generated class image"})
    class_guidance: float = field(
        default=7.5, metadata={"help": "classifier-free guidance scale of class-image generation"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the class (prior-preservation) loss"})
    min_images: int = field(default=3, metadata={"help": "fewer usable instance images than this is an error"})
    max_image_pixels: int = field(
        default=100_000_000, metadata={"help": "larger images are refused as decompression bombs"})

    # --- what is trained ---
    train_text_encoder: bool = field(
        default=False, metadata={"help": "also fine-tune the CLIP text encoder (full fine-tune only)"})
    lora: bool = field(
        default=False,
        metadata={"help": "DreamBooth-LoRA: LoRA adapters with prior preservation (like-for-like with style LoRAs)"})
    rank: int = field(default=4, metadata={"help": "LoRA rank (lora=True)"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank"})
    target_modules: tuple[str, ...] = field(
        default=ATTENTION_PROJECTIONS, metadata={"help": "LoRA target layers (lora=True)"})

    # --- optimisation ---
    resolution: int = field(default=512, metadata={"help": "training side length (square centre crops)"})
    steps: int = field(default=1000, metadata={
        "help": "optimizer steps (800-1200: DreamBooth overfits beyond, Ruiz et al. 2023)"})
    batch_size: int = field(
        default=1, metadata={"help": "instance images per micro-batch (as many class images join it)"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "None: 5e-6 for a full fine-tune, 1e-4 with lora=True"})
    lr_scheduler: str = field(
        default="constant", metadata={"help": "diffusers.optimization scheduler name (DreamBooth's default: constant)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    use_8bit_adam: bool = field(
        default=True, metadata={"help": "bitsandbytes AdamW8bit when installed (CUDA); else torch AdamW"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "autocast dtype (fp16 on a T4)"})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "recompute activations in backward: a full UNet fine-tune needs it on 16 GB"})
    save_dtype: Literal["fp16", "bf16", "fp32"] = field(
        default="fp16", metadata={"help": "dtype of the written weights"})
    seed: int = field(default=0, metadata={"help": "seeds class images, data order, noise, timesteps"})

    # --- bookkeeping ---
    checkpoint_every: int = field(default=250, metadata={"help": "resumable checkpoint interval in steps (0: none)"})
    keep_checkpoints: int = field(
        default=1,
        metadata={"help": "complete checkpoints kept (a full SD1.5 UNet checkpoint with AdamW state is ~10 GB)"})
    log_every: int = field(default=10, metadata={"help": "CSV log interval in steps"})

    def __post_init__(self) -> None:
        check_at_least(self, ("resolution", "steps", "batch_size", "grad_accum", "rank", "num_class_images",
                              "class_sample_steps", "min_images", "max_image_pixels", "log_every"), 1)
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64, got {self.resolution}")
        check_positive(self, ("learning_rate", "alpha"))
        check_at_least(self, ("prior_loss_weight", "class_guidance", "warmup_steps", "adam_weight_decay",
                              "max_grad_norm", "checkpoint_every", "keep_checkpoints", "seed"), 0)
        if self.lora and self.train_text_encoder:
            raise ValueError("train_text_encoder is for the full fine-tune; with lora=True only the UNet gets adapters")
        if not str(self.output).endswith(".safetensors"):
            raise ValueError(f"output must be a .safetensors file, got {self.output!r}")

    @property
    def lr(self) -> float:
        return self.learning_rate or (1e-4 if self.lora else 5e-6)


@dataclass(frozen=True)
class TextualInversionConfig(_TrainerSettings):
    """Everything that decides what `stylora train textual-inversion` produces (Gal et al., ICLR 2023): a learned
    token embedding for SD1.x's CLIP text encoder, everything else frozen. Saved into the embedding's metadata."""

    # --- data and model ---
    data: str = field(metadata={"help": "folder of style images (searched recursively)"})
    output: str = field(metadata={
        "help": "path of the .safetensors embedding to write; its file name is the prompt word (embedding:<name>)"})
    base_model: str = field(
        default=DEFAULT_BASE_MODEL, metadata={"help": "hub id, diffusers folder, or single-file SD1.x checkpoint"})
    base_config: str | None = field(
        default=None, metadata={"help": "diffusers config folder for a single-file checkpoint; None = shipped SD1.5"})
    initializer: str = field(default="painting", metadata={
        "help": "a word of one CLIP token the vectors start from (Gal et al.: a coarse description of the concept)"})
    num_vectors: int = field(default=1, metadata={
        "help": "vectors in the embedding (Gal et al. use one; more capture more, and cost prompt tokens)"})
    min_images: int = field(default=5, metadata={"help": "fewer usable images than this is an error"})
    max_image_pixels: int = field(
        default=100_000_000, metadata={"help": "larger images are refused as decompression bombs (width*height)"})

    # --- optimisation (defaults after Gal et al. and diffusers' textual_inversion.py) ---
    resolution: int = field(default=512, metadata={"help": "training side length (square centre crops)"})
    steps: int = field(default=3000, metadata={"help": "optimizer steps (3000 as diffusers' example)"})
    batch_size: int = field(default=4, metadata={"help": "images per micro-batch (Gal et al.: 4 per GPU)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-3, metadata={
        "help": "AdamW learning rate of the embedding (Gal et al.'s base rate 0.005)"})
    lr_scheduler: str = field(default="constant", metadata={"help": "any diffusers.optimization scheduler name"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the LR schedule"})
    adam_weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW decoupled weight decay (0: it would only shrink the vectors' norm toward 0)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit when installed (CUDA only)"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "dtype of the frozen UNet; the text encoder stays fp32"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute UNet activations in backward (less memory, slower)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, prompt templates, noise and timesteps"})

    # --- bookkeeping ---
    checkpoint_every: int = field(default=500, metadata={"help": "resumable checkpoint interval in steps (0: none)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "complete checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "CSV log interval in steps"})

    def __post_init__(self) -> None:
        check_at_least(self, ("resolution", "steps", "batch_size", "grad_accum", "num_vectors", "min_images",
                              "max_image_pixels", "log_every"), 1)
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64, got {self.resolution}")
        check_positive(self, ("learning_rate",))
        check_at_least(self, ("warmup_steps", "adam_weight_decay", "max_grad_norm", "checkpoint_every",
                              "keep_checkpoints", "seed"), 0)
        if self.num_vectors > 16:
            raise ValueError(f"num_vectors must be at most 16 (each takes one of the prompt's 75 tokens), "
                             f"got {self.num_vectors}")
        if not self.initializer.strip() or len(self.initializer.split()) != 1:
            raise ValueError(f"initializer must be one word, got {self.initializer!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if not str(self.output).endswith(".safetensors"):
            raise ValueError(f"output must be a .safetensors file, got {self.output!r}")
