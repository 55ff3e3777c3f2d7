"""TrainStyle: train a style LoRA on the canvas, with Stylora's trainer (`stylora train lora`'s recipe, metadata and
file format), into models/styles.

The node is a thin layer over `trainer.lora.train_or_reuse`: a finished style with the same settings and images is
reused, an interrupted one continues from its newest checkpoint, anything else trains afresh. ComfyUI (folder_paths,
the progress bar, Cancel, model management) is reached only through `nodes.host`, whose functions work without
ComfyUI, so the node imports and is tested without it. The trainer (torch, diffusers, peft, accelerate) is imported
on the first run, not when ComfyUI lists the node.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.files import atomic_write, scan_folder
from .host import (
    cancelled,
    checkpoint_file,
    checkpoint_names,
    input_folder,
    is_interrupt,
    progress_bar,
    raise_cancelled,
    refresh_style_list,
    release_models,
    styles_folder,
)
from .style_lora import LoadStyleLoRA

# The node's widgets start at `stylora train lora`'s defaults (trainer/config.py LoraTrainConfig; a test keeps them
# equal). Every other setting is that command's default too.
DEFAULTS = {"steps": 6000, "rank": 4, "learning_rate": 1e-4, "resolution": 512, "seed": 0}
BATCH_FOLDER = "stylora_training"  # under ComfyUI/input: an IMAGE batch is written here as PNGs to train on
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}")
# The trainer's messages name its command-line flags; on the node they are these inputs.
_FLAG_WORDS = (("--base-model", "ckpt_name"), ("--data", "folder"), ("--output", "name"))


def checkpoint_path(name: str) -> str:
    """The file of checkpoint `name` in ComfyUI's checkpoints folders."""
    path = checkpoint_file(name)
    if not path:
        raise ValueError(f"TrainStyle: ckpt_name {name!r} is not in ComfyUI's checkpoints "
                         f"({checkpoint_names()[:10]}); put an SD1.5 .safetensors in models/checkpoints")
    return path


def show_progress(bar: Any, done: int, total: int) -> bool:
    """Show `done` of `total` steps on `bar`; False when the user cancelled. ComfyUI's bar raises its interrupt
    exception itself when the flag is set: that is read as a cancel too, so the trainer can checkpoint first."""
    if cancelled():
        return False
    try:
        bar.update_absolute(done, total)
    except Exception as e:  # ComfyUI's interrupt exception, raised by the server's hook
        if is_interrupt(e):
            return False
        raise
    return True


# --- The node -------------------------------------------------------------------------------------------------

class StepReport:
    """The trainer's `on_step`: the step count on ComfyUI's progress bar; a Cancel raises `stop` (the trainer's
    StopTraining), so the trainer writes a checkpoint of the last step before the node ends."""

    def __init__(self, stop: type[Exception]):
        self.stop, self.bar, self.last = stop, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total)
        self.last = done
        if not show_progress(self.bar, done, total):
            raise self.stop(f"cancelled at step {done} of {total}")


def style_file_name(name: str) -> str:
    """`name` as the style's file name in models/styles (`.safetensors` added)."""
    stem = name.strip().removesuffix(".safetensors")
    if not _NAME.fullmatch(stem):
        raise ValueError(f"TrainStyle: name {name!r} is not a usable file name; use 1-100 letters, digits, spaces, "
                         "'_', '-' or '.', starting with a letter or digit (e.g. 'monet')")
    return stem + ".safetensors"


def training_folder(folder: str) -> Path:
    """`folder` (relative to ComfyUI/input) as a path inside the input folder."""
    root = input_folder().resolve()
    path = (root / folder.strip()).resolve()
    if not folder.strip() or (path != root and root not in path.parents):
        raise ValueError(f"TrainStyle: folder {folder!r} must name a folder under ComfyUI's input folder ({root}), "
                         "e.g. 'paintings/monet'")
    if not path.is_dir():
        raise ValueError(f"TrainStyle: folder {folder!r}: no such folder in {root}; put 5 or more paintings in "
                         f"{path} (subfolders are searched too)")
    return path


def save_batch(images: Any, name: str) -> Path:
    """An IMAGE batch ([B, H, W, 3] floats in 0..1) as PNGs in input/stylora_training/<style name>/, the folder the
    trainer reads (and records: the same batch gives the same files, so a rerun resumes or reuses)."""
    folder = input_folder() / BATCH_FOLDER / Path(name).stem
    pixels = np.clip(np.asarray(images.detach().cpu().float()) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"TrainStyle: images must be an IMAGE batch [B, H, W, 3], got shape {list(pixels.shape)}")
    wanted = {f"image_{i:04d}.png" for i in range(len(pixels))}
    for old in folder.glob("image_*.png") if folder.is_dir() else []:
        if old.name not in wanted:
            old.unlink()
    for i, arr in enumerate(pixels):
        atomic_write(folder / f"image_{i:04d}.png", lambda tmp, a=arr: Image.fromarray(a).save(tmp, format="PNG"))
    return folder


def node_words(message: str) -> str:
    """A trainer error as the node's: its command-line flags named as the node's inputs."""
    for flag, word in _FLAG_WORDS:
        message = message.replace(flag, word)
    return message if message.startswith("TrainStyle") else f"TrainStyle: {message}"


class TrainStyle:
    """Trains a style LoRA from a folder of paintings on the user's SD1.5 checkpoint, into models/styles."""

    CATEGORY = "Stylora"
    FUNCTION = "train"
    OUTPUT_NODE = True  # it writes a file: runs even with nothing connected
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "style")
    OUTPUT_TOOLTIPS = (
        "The model connected to `model` with the new style applied at strength 1 (as Load Style LoRA does); "
        "nothing when `model` is not connected.",
        "The CLIP connected to `clip`, passed through with the style (style LoRAs train no text-encoder weights).",
        "The style's file name in models/styles, as Load Style LoRA lists it.",
    )
    DESCRIPTION = ("Trains a style LoRA (Stylora's trainer: rank-4 LoRA on the UNet's attention, promptless) from a "
                   "folder of 5+ paintings under ComfyUI/input, or an IMAGE batch, on an SD1.5 checkpoint, and writes "
                   "models/styles/<name>.safetensors. The bar shows the steps; Cancel stops at the next step and "
                   "keeps a checkpoint, and queueing again continues from it. A finished style with the same "
                   "settings and images is reused, not trained again. Training runs where ComfyUI runs its models "
                   "(a GPU: minutes to hours; a CPU: slow).")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "ckpt_name": (checkpoint_names(), {"tooltip": "The SD1.5 checkpoint to train on: the one you "
                                                              "sample with (models/checkpoints)."}),
                "folder": ("STRING", {"default": "paintings", "tooltip": "A folder under ComfyUI/input holding 5+ "
                                      "paintings (subfolders searched too); broken and tiny files are skipped."}),
                "name": ("STRING", {"default": "my_style", "tooltip": "The style's name: written as "
                                    "models/styles/<name>.safetensors. Queueing the same name and settings again "
                                    "reuses it, or continues it after a Cancel."}),
                "steps": ("INT", {"default": DEFAULTS["steps"], "min": 1, "max": 100_000, "tooltip":
                                  "Optimizer steps (5000-8000 suit 50-100 paintings at rank 4; fewer underfit)."}),
                "rank": ("INT", {"default": DEFAULTS["rank"], "min": 1, "max": 128, "tooltip":
                                 "LoRA rank (4: a 1.6 MB style file; higher ranks learn more and overfit sooner)."}),
                "learning_rate": ("FLOAT", {"default": DEFAULTS["learning_rate"], "min": 1e-7, "max": 1e-2,
                                            "step": 1e-5, "round": 1e-7,
                                            "tooltip": "AdamW learning rate (cosine schedule, 100 warm-up steps)."}),
                "resolution": ("INT", {"default": DEFAULTS["resolution"], "min": 64, "max": 1024, "step": 64,
                                       "tooltip": "Training side in pixels (square centre crops): 512 for SD1.5; "
                                                  "256 trains about 4x faster and coarser."}),
                "seed": ("INT", {"default": DEFAULTS["seed"], "min": 0, "max": 2**31 - 1, "tooltip":
                                 "Seeds the LoRA's start, data order and noise: same seed, same style."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Train on this batch instead of `folder` (saved as PNGs in "
                                                f"input/{BATCH_FOLDER}/<name>/)."}),
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL (Load Checkpoint), returned with the style "
                                               "applied."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP, returned alongside."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, ckpt_name: str, folder: str, name: str, **_: Any) -> str:
        """Runs again when the style file or the folder's files change (ComfyUI otherwise reuses its last output),
        e.g. after the style file was deleted."""
        state = []
        try:
            out = styles_folder() / style_file_name(name)
            state.append(out.stat().st_mtime if out.exists() else None)
            files, _ = scan_folder(training_folder(folder))
            state += [(f.name, f.stat().st_size, f.stat().st_mtime) for f in files]
        except (ValueError, RuntimeError, OSError) as e:
            state.append(str(e))  # the run itself reports it
        return repr(state)

    def train(self, ckpt_name: str, folder: str, name: str, steps: int, rank: int, learning_rate: float,
              resolution: int, seed: int, images: Any = None, model: Any = None, clip: Any = None):
        # heavy: torch, diffusers, peft and accelerate load when a style is trained, not when ComfyUI lists nodes
        from ..trainer.lora import LoraTrainConfig, StopTraining, train_or_reuse

        # 1. Where: the style file in models/styles, the checkpoint, the images (a folder, or the batch as PNGs).
        file_name = style_file_name(name)
        output = styles_folder() / file_name
        base = checkpoint_path(ckpt_name)
        data = training_folder(folder) if images is None else save_batch(images, file_name)

        # 2. The settings: the node's five and `stylora train lora`'s defaults for the rest.
        try:
            cfg = LoraTrainConfig(data=str(data), output=str(output), base_model=base, steps=steps, rank=rank,
                                  learning_rate=learning_rate, resolution=resolution, seed=seed)
        except ValueError as e:
            raise ValueError(node_words(str(e))) from None

        # 3. Memory: ComfyUI's loaded models leave the device before the trainer loads its own copy.
        release_models()

        # 4. Train, continue an interrupted run, or reuse a finished one; the bar shows the steps, Cancel stops.
        report = StepReport(StopTraining)
        try:
            with torch.inference_mode(False), torch.enable_grad():  # ComfyUI runs nodes in inference mode
                train_or_reuse(cfg, on_step=report)
        except StopTraining:
            raise_cancelled(f"TrainStyle: cancelled at step {report.last} of {steps}; the checkpoint in "
                            f"{output.parent / (output.stem + '.checkpoints')} is kept: queue again to continue")
        except (FileExistsError, FileNotFoundError) as e:  # a style or unfinished run of other settings exists
            raise type(e)(node_words(str(e))) from None
        except ValueError as e:  # unusable images, a checkpoint that is not SD1.5, changed images
            raise ValueError(node_words(str(e))) from None
        finally:
            release_models()  # the trainer's models are garbage now: nothing stays held

        # 5. Load Style LoRA lists it from now on; the model comes back with it applied.
        refresh_style_list()
        if model is not None:
            model, clip, _, _ = LoadStyleLoRA().load(model, clip, file_name, 1.0)
        return (model, clip, file_name)

