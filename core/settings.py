"""Settings: a frozen config dataclass becomes command-line flags and reads JSON/TOML config files. Each field's
help text lives in its `metadata["help"]` (the peft LoraConfig convention): one source for `--help`, config files
and the settings saved into trained files' metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import tomllib


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """One flag per config field (`batch_size` -> `--batch-size`), defaults left to the dataclass; the help text is
    the field's `metadata["help"]`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if default is not None and f.name not in ("data", "output"):
            help_text += f" (default: {list(default) if isinstance(default, tuple) else default})"
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs["choices"] = list(args)
        elif origin is tuple:
            kwargs["nargs"] = "+"
            kwargs["type"] = str
        elif origin in (typing.Union, types.UnionType) and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            kwargs["type"] = _float_or_none if inner is float else inner
            kwargs["metavar"] = f.name.upper()
        else:
            kwargs["type"] = hint
        parser.add_argument(flag, **kwargs)


def build_config(cls: type, args: argparse.Namespace) -> object:
    """Dataclass defaults < --config file < command-line flags."""
    values = read_config_file(args.config, cls) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    missing = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ValueError(f"missing required setting(s): {', '.join(missing)} (on the command line or in --config)")
    return cls(**values)


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def read_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a JSON or TOML file of config fields (CLI flags override it). Unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        values = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--config {path}: cannot parse ({e})") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a table of settings, got {type(values).__name__}")
    known = config_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; known: {sorted(known)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
