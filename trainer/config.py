"""Training configurations: `TrainingSettings` holds what every recipe takes (data, base model, optimisation,
bookkeeping), `AdapterSettings` adds the LoRA adapters; one frozen dataclass per recipe is built on them, shared by
the CLI, the nodes and the metadata saved in every trained file (the pattern of whisper's `DecodingOptions` and
peft's `LoraConfig`). Each field's help is its `metadata["help"]` (core.settings turns it into flags)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The attention projections of every UNet transformer block (self- and cross-attention): the style-LoRA
# target of diffusers' train_text_to_image_lora.py; style lives in how features attend to each other.
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# The Linear and Conv2d layer names of the SD1.x UNet that LoRA adapters can target (peft matches a target against
# the end of each module's dotted name): checked before the base model loads, rather than after minutes of loading.
UNET_LAYERS = ("conv", "conv1", "conv2", "conv_in", "conv_out", "conv_shortcut", "ff.net.0.proj", "ff.net.2",
               "linear_1", "linear_2", "proj_in", "proj_out", "time_emb_proj", "to_k", "to_out.0", "to_q", "to_v")
# diffusers.optimization.SchedulerType's names (tests/test_train_config.py pins the list against diffusers).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "piecewise_constant"]


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


def path_field(help_text: str, **kwargs: Any) -> Any:
    """A field naming a local file or folder: saved into trained files' metadata by its name only (see
    TrainingSettings.to_metadata), never as a path of the trainer's machine."""
    return field(metadata={"help": help_text, "path": True}, **kwargs)


def knows_unet_layer(target: str) -> bool:
    """Whether peft's suffix match of `target` finds a layer of the SD1.x UNet (UNET_LAYERS)."""
    return any(t == target or t.endswith("." + target) or target.endswith("." + t) for t in UNET_LAYERS)


@dataclass(frozen=True)
class TrainingSettings:
    """What every training recipe takes: its data and base model, the optimisation and the bookkeeping. A recipe
    redeclares only the fields whose default or help is its own (DreamBooth's 1000 steps, say)."""

    # --- data and model ---
    data: str = path_field("folder of training images (searched recursively)")
    output: str = path_field("path of the .safetensors file to write")
    base_model: str = path_field("hub id, diffusers folder, or single-file SD1.x checkpoint",
                                 default=DEFAULT_BASE_MODEL)
    base_config: str | None = path_field(
        "diffusers config folder for a single-file checkpoint; None = shipped SD1.5 configs", default=None)
    min_images: int = field(default=5, metadata={"help": "fewer usable images than this is an error"})
    max_image_pixels: int = field(
        default=100_000_000, metadata={"help": "larger images are refused as decompression bombs (width*height)"})
    resolution: int = field(default=512, metadata={"help": "training side length in pixels (square centre crops)"})

    # --- optimisation ---
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=1, metadata={"help": "images per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float | None = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    lr_scheduler: LrScheduler = field(
        default="constant", metadata={"help": "diffusers.optimization learning-rate schedule"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps of the LR schedule"})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW decoupled weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit when installed (CUDA only)"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "autocast dtype; frozen weights are stored in it"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute UNet activations in backward (less memory, ~30% slower)"})
    seed: int = field(default=0, metadata={"help": "seeds data order, noise and timesteps: same seed, same run"})

    # --- bookkeeping ---
    checkpoint_every: int = field(
        default=500, metadata={"help": "save a resumable checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(
        default=3, metadata={"help": "complete checkpoints kept, older ones deleted (0: keep every one)"})
    log_every: int = field(default=10, metadata={"help": "CSV log interval in steps"})

    @property
    def lr(self) -> float:
        """The learning rate this run uses (a recipe may derive it when learning_rate is None)."""
        assert self.learning_rate is not None
        return self.learning_rate

    def __post_init__(self) -> None:
        check_at_least(self, ("resolution", "steps", "batch_size", "grad_accum", "min_images", "max_image_pixels",
                              "log_every"), 1)
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64 (VAE+UNet downsample 64x), got {self.resolution}")
        check_positive(self, ("learning_rate",))
        check_at_least(self, ("warmup_steps", "adam_weight_decay", "max_grad_norm", "checkpoint_every",
                              "keep_checkpoints", "seed"), 0)
        check_choice(self, "lr_scheduler", LR_SCHEDULERS)
        check_choice(self, "mixed_precision", ("no", "fp16", "bf16"))
        if not str(self.output).endswith(".safetensors"):
            raise ValueError(f"output must be a .safetensors file, got {self.output!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every setting (tuples as lists): what checkpoints record, to refuse a resume with other settings."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_metadata(self) -> dict[str, Any]:
        """`to_dict` with each local path (fields made by `path_field`) reduced to its file or folder name: a
        trained file that is shared must not carry its trainer's folders. A hub id stays as typed; the images and
        the base model are identified by the dataset fingerprint and the base model's sha256 beside it."""
        out = self.to_dict()
        for f in dataclasses.fields(self):
            value = out[f.name]
            if f.metadata.get("path") and isinstance(value, str) and value and is_local_path(value):
                out[f.name] = Path(value).name
        return out


def is_local_path(value: str) -> bool:
    """An absolute path, or a relative one that exists here (a hub id 'owner/name' is neither)."""
    p = Path(value).expanduser()
    return p.is_absolute() or p.exists()


def check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class AdapterSettings(TrainingSettings):
    """Training settings of a recipe that trains LoRA adapters on the UNet."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; None = rank (scale alpha/r = 1)"})
    target_modules: tuple[str, ...] = field(
        default=ATTENTION_PROJECTIONS,
        metadata={"help": f"UNet layers that get adapters (peft suffix match), from {list(UNET_LAYERS)}"})
    save_dtype: Literal["fp16", "bf16", "fp32"] = field(
        default="fp16", metadata={"help": "dtype of the weights in the written file"})

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, ("rank",), 1)
        check_positive(self, ("alpha",))
        check_choice(self, "save_dtype", ("fp16", "bf16", "fp32"))
        unknown = [t for t in self.target_modules if not knows_unet_layer(t)]
        if unknown or not self.target_modules:
            raise ValueError(f"target_modules: {unknown or 'none given'} name no SD1.x UNet layer; choose from "
                             f"{list(UNET_LAYERS)}")


@dataclass(frozen=True)
class LoraTrainConfig(AdapterSettings):
    """Everything that decides what `stylora train lora` produces. Saved into the LoRA's metadata."""

    # --- data and model ---
    data: str = path_field("folder of style images (searched recursively); `name.txt` beside an image is its caption")
    output: str = path_field("path of the .safetensors LoRA to write")
    trigger: str = field(
        default="",
        metadata={"help": "optional trigger phrase; \"\" trains against the empty prompt (promptless style)"})
    use_captions: bool = field(
        default=True, metadata={"help": "read per-image caption .txt files when present (trigger is prepended)"})

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

    # --- optimisation ---
    steps: int = field(default=6000, metadata={
        "help": "optimizer steps (5000-8000 suit 50-100 paintings at rank 4; fewer underfit the strokes)"})
    batch_size: int = field(default=2, metadata={
        "help": "images per micro-batch (2-4 fit 512 px SD1.5 training on a 16 GB GPU)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate for the LoRA weights"})
    lr_scheduler: LrScheduler = field(default="cosine", metadata={"help": "diffusers.optimization LR schedule"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps of the LR schedule"})
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
    log_with: Literal["csv", "tensorboard"] = field(default="csv", metadata={"help": "tensorboard also writes CSV"})
    preview_every: int = field(
        default=0, metadata={"help": "stylise --preview-content images every N steps (0: never)"})
    preview_content: str | None = path_field("folder of content photos for previews", default=None)
    preview_strength: float = field(default=0.6, metadata={"help": "img2img denoise of the previews"})
    preview_steps: int = field(default=20, metadata={"help": "sampler steps of the previews"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, ("preview_steps",), 1)
        check_at_least(self, ("mse_weight", "lpips_weight", "style_weight", "noise_offset", "preview_every",
                              "perceptual_max_timestep"), 0)
        # min-SNR weights are min(SNR, gamma) / SNR: gamma <= 0 gives zero or negative weights (training backwards)
        check_positive(self, ("min_snr_gamma",))
        if self.mse_weight + self.lpips_weight + self.style_weight == 0:
            raise ValueError("mse_weight, lpips_weight and style_weight are all 0: there is nothing to train on")
        check_choice(self, "crop", ("center", "buckets"))
        check_choice(self, "log_with", ("csv", "tensorboard"))
        if not 0 < self.preview_strength <= 1:  # False for NaN too
            raise ValueError(f"preview_strength must be in (0, 1], got {self.preview_strength}")
        if self.preview_every and not self.preview_content:
            raise ValueError("preview_every needs preview_content: a folder of content photos to stylise")


@dataclass(frozen=True)
class DreamBoothConfig(AdapterSettings):
    """Everything that decides what `stylora train dreambooth` produces (Ruiz et al. 2023, with prior
    preservation). Saved into the checkpoint's metadata."""

    # --- data and model ---
    data: str = path_field("folder of instance (style) images")
    output: str = path_field("the .safetensors to write: a full SD1.x checkpoint, or a LoRA with lora=True")
    instance_prompt: str = field(
        default="sks style painting", metadata={"help": "prompt of the instance images, with a rare token"})
    class_prompt: str = field(default="painting", metadata={"help": "prompt of the prior-preservation class images"})
    class_data: str | None = path_field("folder of class images; None generates them with the base model",
                                        default=None)
    class_images_dir: str | None = path_field(
        "where generated class images are kept; None = <output>.class_images", default=None)
    num_class_images: int = field(default=100, metadata={"help": "class images to generate (or use from class_data)"})
    class_sample_steps: int = field(default=30, metadata={"help": "sampler steps per generated class image"})
    class_guidance: float = field(
        default=7.5, metadata={"help": "classifier-free guidance scale of class-image generation"})
    prior_loss_weight: float = field(default=1.0, metadata={"help": "weight of the class (prior-preservation) loss"})
    min_images: int = field(default=3, metadata={"help": "fewer usable instance images than this is an error"})

    # --- what is trained ---
    train_text_encoder: bool = field(
        default=False, metadata={"help": "also fine-tune the CLIP text encoder (full fine-tune only)"})
    lora: bool = field(
        default=False,
        metadata={"help": "DreamBooth-LoRA: LoRA adapters with prior preservation (like-for-like with style LoRAs)"})

    # --- optimisation ---
    steps: int = field(default=1000, metadata={
        "help": "optimizer steps (800-1200: DreamBooth overfits beyond, Ruiz et al. 2023)"})
    batch_size: int = field(
        default=1, metadata={"help": "instance images per micro-batch (as many class images join it)"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float | None = field(
        default=None, metadata={"help": "None: 5e-6 for a full fine-tune, 1e-4 with lora=True"})
    lr_scheduler: LrScheduler = field(
        default="constant", metadata={"help": "diffusers.optimization LR schedule (DreamBooth's default: constant)"})
    use_8bit_adam: bool = field(
        default=True, metadata={"help": "bitsandbytes AdamW8bit when installed (CUDA); else torch AdamW"})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "recompute activations in backward: a full UNet fine-tune needs it on 16 GB"})
    seed: int = field(default=0, metadata={"help": "seeds class images, data order, noise, timesteps"})

    # --- bookkeeping ---
    checkpoint_every: int = field(default=250, metadata={"help": "resumable checkpoint interval in steps (0: none)"})
    keep_checkpoints: int = field(
        default=1, metadata={"help": "complete checkpoints kept (0: every one; a full SD1.5 UNet checkpoint with "
                                     "AdamW state is ~10 GB)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, ("num_class_images", "class_sample_steps"), 1)
        check_at_least(self, ("prior_loss_weight", "class_guidance"), 0)
        if self.lora and self.train_text_encoder:
            raise ValueError("train_text_encoder is for the full fine-tune; with lora=True only the UNet gets adapters")

    @property
    def lr(self) -> float:
        return self.learning_rate or (1e-4 if self.lora else 5e-6)


@dataclass(frozen=True)
class TextualInversionConfig(TrainingSettings):
    """Everything that decides what `stylora train textual-inversion` produces (Gal et al., ICLR 2023): a learned
    token embedding for SD1.x's CLIP text encoder, everything else frozen. Saved into the embedding's metadata."""

    # --- data and model ---
    data: str = path_field("folder of style images (searched recursively)")
    output: str = path_field(
        "path of the .safetensors embedding to write; its file name is the prompt word (embedding:<name>)")
    initializer: str = field(default="painting", metadata={
        "help": "a word of one CLIP token the vectors start from (Gal et al.: a coarse description of the concept)"})
    num_vectors: int = field(default=1, metadata={
        "help": "vectors in the embedding (Gal et al. use one; more capture more, and cost prompt tokens)"})

    # --- optimisation (defaults after Gal et al. and diffusers' textual_inversion.py) ---
    steps: int = field(default=3000, metadata={"help": "optimizer steps (3000 as diffusers' example)"})
    batch_size: int = field(default=4, metadata={"help": "images per micro-batch (Gal et al.: 4 per GPU)"})
    learning_rate: float = field(default=5e-3, metadata={
        "help": "AdamW learning rate of the embedding (Gal et al.'s base rate 0.005)"})
    adam_weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW decoupled weight decay (0: it would only shrink the vectors' norm toward 0)"})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "dtype of the frozen UNet; the text encoder stays fp32"})
    seed: int = field(default=0, metadata={"help": "seeds data order, prompt templates, noise and timesteps"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, ("num_vectors",), 1)
        if self.num_vectors > 16:
            raise ValueError(f"num_vectors must be at most 16 (each takes one of the prompt's 75 tokens), "
                             f"got {self.num_vectors}")
        if not self.initializer.strip() or len(self.initializer.split()) != 1:
            raise ValueError(f"initializer must be one word, got {self.initializer!r}")
