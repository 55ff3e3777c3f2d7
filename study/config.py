"""`StudyConfig`: everything `stylora study` does, from a TOML file with command-line flags on top."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.settings import coerce_settings, read_config_file
from ..eval.registry import STUDY_METRICS
from ..trainer.config import DEFAULT_BASE_MODEL, DreamBoothConfig, LoraTrainConfig, TextualInversionConfig
from ..workflows.client import parse_value

# `base`: plain img2img (the control), `lora`: a style LoRA, `dreambooth`: the full fine-tune baseline,
# `dreambooth-lora`: DreamBooth with LoRA adapters, `image`: a training-free painting-style node when the server
# has one (StyleFromImage), `adain`: the classical feed-forward baseline (Huang and Belongie 2017), run in-process,
# `textual-inversion`: a learned style word for the text encoder (Gal et al. 2023), sampled as embedding:<name>.
METHODS = ("base", "lora", "dreambooth", "dreambooth-lora", "image", "adain", "textual-inversion")
IN_PROCESS = ("adain",)  # methods that stylise here, without ComfyUI
TRAINED = ("lora", "dreambooth", "dreambooth-lora", "textual-inversion")
TRAIN_CONFIGS = {"lora": LoraTrainConfig, "dreambooth": DreamBoothConfig, "dreambooth-lora": DreamBoothConfig,
                 "textual-inversion": TextualInversionConfig}


@dataclass(frozen=True)
class StudyConfig:
    """One comparison study. Saved into the study's manifest and report."""

    styles: tuple[tuple[str, str], ...] = field(metadata={
        "help": "style name -> folder of paintings (TOML table [styles]; flag NAME=DIR, repeatable)"})
    content: str = field(metadata={"help": "folder of content photos (e.g. `stylora prepare coco`)"})
    out: str = field(metadata={"help": "study folder: trained files, outputs, logs, report/ (rerun to resume)"})
    base_model: str = field(default=DEFAULT_BASE_MODEL, metadata={
        "help": "base model for training: hub id, diffusers folder or single-file SD1.5 .safetensors"})
    base_config: str | None = field(default=None, metadata={
        "help": "diffusers config folder for a single-file base model (default: the shipped SD1.5 configs)"})
    server: tuple[str, ...] = field(default=("http://127.0.0.1:8188",), metadata={
        "help": "ComfyUI server URL(s) that stylise; photos are spread over them (repeatable)"})
    checkpoint: str = field(default="v1-5-pruned-emaonly.safetensors", metadata={
        "help": "the base SD1.5 checkpoint's name on the server(s) (its models/checkpoints)"})
    server_models: tuple[str, ...] = field(default=(), metadata={
        "help": "the servers' models folder(s): trained styles are copied into DIR/styles, DreamBooth checkpoints "
                "into DIR/checkpoints, embeddings into DIR/embeddings (default: <out>/models, which the servers must "
                "see through extra_model_paths.yaml)"})
    methods: tuple[str, ...] = field(default=("base", "lora", "dreambooth", "dreambooth-lora"), metadata={
        "help": f"methods to compare, from {list(METHODS)}"})
    strengths: tuple[float, ...] = field(default=(0.2, 0.4, 0.6, 0.8), metadata={
        "help": "style strengths 0..1 (Style Strength's mapping; DreamBooth and base: the same denoise)"})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "sampler seeds; metrics are averaged over them"})
    table_strength: float | None = field(default=None, metadata={
        "help": "strength shown in the comparison table (default: the middle of --strengths)"})
    max_side: int | None = field(default=None, metadata={
        "help": "Content Encode max_side on the server (default: the workflow's, 512)"})
    sampler_steps: int | None = field(default=None, metadata={"help": "KSampler steps (default: the workflow's)"})
    set: tuple[str, ...] = field(default=(), metadata={
        "help": "more workflow overrides, 'Node title.input=value' (as in stylora run --set)"})
    train: tuple[tuple[str, str, Any], ...] = field(default=(), metadata={
        "help": "training settings per method (TOML tables [train.lora], [train.dreambooth], "
                "[train.dreambooth-lora], [train.textual-inversion]; flag METHOD.KEY=VALUE, repeatable), passed to "
                "LoraTrainConfig / DreamBoothConfig / TextualInversionConfig"})
    metrics: tuple[str, ...] = field(
        default=STUDY_METRICS,
        metadata={"help": "metrics to compute (eval's names)"})
    eval_device: str | None = field(default=None, metadata={"help": "device of the metrics (default: CUDA if any)"})
    grid_rows: int = field(default=4, metadata={"help": "content photos per style in the report's grids"})
    timeout: float = field(default=3600.0, metadata={"help": "seconds to wait for one image on a server"})

    def __post_init__(self) -> None:
        if not self.styles:
            raise ValueError("styles: give at least one style, NAME=DIR")
        names = [n for n, _ in self.styles]
        for name, folder in self.styles:
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"styles: name {name!r} must be letters, digits, '-' or '_' (it names files)")
            if not folder:
                raise ValueError(f"styles: style {name!r} has no folder")
        if len(set(names)) != len(names):
            raise ValueError(f"styles: names repeat: {names}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown or list(self.methods)}; choose from {list(METHODS)}")
        if not self.strengths or not all(0 <= s <= 1 for s in self.strengths):
            raise ValueError(f"strengths: each must be in 0..1, got {list(self.strengths)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.table_strength is not None and self.table_strength not in self.strengths:
            raise ValueError(f"table_strength: {self.table_strength} is not one of strengths {list(self.strengths)}")
        if not self.server:
            raise ValueError("server: give at least one ComfyUI server URL")
        for name in ("max_side", "sampler_steps", "grid_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout!r}")
        for method, key, _ in self.train:
            if method not in TRAINED:
                raise ValueError(f"train: {method!r} is not a trained method; choose from {list(TRAINED)}")
            known = {f.name for f in dataclasses.fields(TRAIN_CONFIGS[method])} - {"data", "output", "lora"}
            if key not in known:
                raise ValueError(f"train.{method}: unknown setting {key!r}; known: {sorted(known)}")
        for method in TRAINED:  # every training setting checked now, not hours into the study
            if method in self.methods or any(m == method for m, _, _ in self.train):
                self.train_config(method, self.styles[0][1], "check.safetensors")

    @property
    def shown_strength(self) -> float:
        """The strength of the comparison table."""
        if self.table_strength is not None:
            return self.table_strength
        ordered = sorted(self.strengths)
        return ordered[(len(ordered) - 1) // 2]

    def train_config(self, method: str, data: str, output: str
                     ) -> LoraTrainConfig | DreamBoothConfig | TextualInversionConfig:
        """The trainer's config of `method` for one style; its settings from [train.<method>]."""
        values: dict[str, Any] = {"base_model": self.base_model, "base_config": self.base_config}
        values.update({k: v for m, k, v in self.train if m == method})
        if method == "dreambooth-lora":
            values["lora"] = True
        cls = TRAIN_CONFIGS[method]
        try:
            return cls(data=data, output=output, **coerce_settings(cls, values))
        except (TypeError, ValueError) as e:
            raise ValueError(f"train.{method}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["styles"] = dict(self.styles)
        train: dict[str, dict[str, Any]] = {}
        for method, key, value in self.train:
            train.setdefault(method, {})[key] = value
        d["train"] = train
        return json.loads(json.dumps(d, default=list))


# --- From a TOML file and flags ---------------------------------------------------------------------------------

def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{flag}: {item!r} must be KEY=VALUE")
        out.append((key.strip(), value.strip()))
    return out


def load_study_config(path: str | Path | None, flags: dict[str, Any] | None = None) -> StudyConfig:
    """StudyConfig from a TOML (or JSON) file, then `flags` on top (field name -> value; `styles` as NAME=DIR
    strings and `train` as METHOD.KEY=VALUE strings, as the command line gives them)."""
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(StudyConfig)}
    if path is not None:
        values = read_config_file(path, StudyConfig)
        if not isinstance(values.get("styles", {}), dict):
            raise ValueError(f"--config {path}: styles must be a table of name = folder")
        values["styles"] = list(values.get("styles", {}).items())
        train = values.pop("train", {})
        if not isinstance(train, dict) or not all(isinstance(t, dict) for t in train.values()):
            raise ValueError(f"--config {path}: train must hold tables [train.<method>]")
        values["train"] = [(m, k, v) for m, table in train.items() for k, v in table.items()]
    for key, value in (flags or {}).items():
        if key not in known:
            raise ValueError(f"unknown study setting {key!r}")
        if key == "styles":
            value = _pairs(value, "--style")
        elif key == "train":  # flags add to (and override) the file's training settings
            parsed = []
            for target, text in _pairs(value, "--train"):
                method, dot, name = target.rpartition(".")
                if not dot:
                    raise ValueError(f"--train: {target!r} must be METHOD.KEY=VALUE")
                parsed.append((method, name, parse_value(text)))
            overridden = {(m, k) for m, k, _ in parsed}
            value = [t for t in values.get("train", []) if (t[0], t[1]) not in overridden] + parsed
        values[key] = value
    for key in ("content", "out"):
        if key not in values:
            raise ValueError(f"missing required setting --{key} (on the command line or in --config)")
    if "styles" not in values:
        raise ValueError("missing required setting --style NAME=DIR (or a [styles] table in --config)")
    for name in ("server", "server_models", "methods", "strengths", "seeds", "set", "metrics"):
        if isinstance(values.get(name), str | int | float):
            values[name] = [values[name]]
    return StudyConfig(**coerce_settings(StudyConfig, values, f"--config {path}: " if path else ""))


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per StudyConfig field (`server_models` -> `--server-models`); lists repeat or take several values."""
    parser.add_argument("--config", help="TOML (or JSON) file of study settings; flags override it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    for f in dataclasses.fields(StudyConfig):
        flag = "--style" if f.name == "styles" else "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = list(default) if isinstance(default, tuple) else default  # as a list, the way eval's help shows one
        help_text = f.metadata["help"] + (f" (default: {shown})" if default not in (None, ()) else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.name in ("styles", "train", "set", "server", "server_models", "methods"):
            kwargs.update(action="extend", nargs="+", type=str)
            kwargs["metavar"] = {"styles": "NAME=DIR", "train": "METHOD.KEY=VALUE", "server": "URL",
                                 "server_models": "DIR", "set": "TITLE.INPUT=VALUE", "methods": "METHOD"}[f.name]
        elif f.name in ("strengths", "seeds", "metrics"):
            kwargs.update(nargs="+", type={"strengths": float, "seeds": int, "metrics": str}[f.name])
        elif f.name in ("max_side", "sampler_steps", "grid_rows"):
            kwargs["type"] = int
        elif f.name in ("timeout", "table_strength"):
            kwargs["type"] = float
        parser.add_argument(flag, **kwargs)


@dataclass(frozen=True)
class CalibrateConfig:
    style: str = field(metadata={"help": "the style file (.safetensors) to calibrate; it must be on the server too"})
    content: str = field(metadata={"help": "a folder of content photos (or one photo) to measure SSIM on"})
    server: tuple[str, ...] = field(default=("http://127.0.0.1:8188",),
                                    metadata={"help": "ComfyUI server URL(s); photos are spread over them"})
    style_name: str | None = field(
        default=None, metadata={"help": "the style's name on the server (default: the file's name)"})
    strengths: tuple[float, ...] = field(
        default=(0.0, 0.25, 0.5, 0.75, 1.0),
        metadata={"help": "raw strengths to measure, rising from 0 to 1 (more points: a finer curve, longer run)"})
    seed: int = field(default=0, metadata={"help": "sampler seed, the same at every strength"})
    workflow: str = field(default="style_transfer", metadata={"help": "the workflow to measure with"})
    checkpoint: str | None = field(
        default=None, metadata={"help": "SD1.5 checkpoint on the server (default: the workflow's)"})
    out: str | None = field(
        default=None, metadata={"help": "folder for the stylised images (default: <style>.calibration/ beside it)"})
    set: tuple[str, ...] = field(
        default=(), metadata={"help": "more overrides, \"Node title.input=value\", as for stylora run"})
    timeout: float = field(default=3600.0, metadata={"help": "seconds to wait for one image"})
    overwrite: bool = field(default=False, metadata={"help": "redo images that exist (default: a rerun resumes)"})

    def __post_init__(self) -> None:
        if not self.style.endswith(".safetensors"):
            raise ValueError(f"style: give the style's .safetensors file, got {self.style!r}")
        strengths = tuple(float(s) for s in self.strengths)
        if len(strengths) < 2 or strengths[0] != 0.0 or strengths[-1] != 1.0 or \
                any(b <= a for a, b in zip(strengths, strengths[1:])):
            raise ValueError(f"strengths must rise from 0 to 1 (2 or more), got {list(self.strengths)}")
        object.__setattr__(self, "strengths", strengths)
