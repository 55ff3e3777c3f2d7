"""Settings: a frozen config dataclass becomes command-line flags and reads JSON/TOML config files. Each field's
help text lives in its `metadata["help"]` (the peft LoraConfig convention): one source for `--help`, config files
and the settings saved into trained files' metadata.

Values are checked against the field types here (a config file's `steps = 2.5` or `"abc"` is an error naming the
key); ranges and finiteness are each config's `__post_init__`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import tomllib

NONE_WORDS = ("none", "off")


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in NONE_WORDS else float(text)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (),
                         help_overrides: dict[str, str] | None = None) -> None:
    """One flag per config field (`batch_size` -> `--batch-size`), defaults left to the dataclass; the help text is
    the field's `metadata["help"]` (or `help_overrides[name]`, where one subcommand reads a field differently).
    Fields without a default go into a "required" group: required on the command line or in --config."""
    hints = typing.get_type_hints(cls)
    where = "on the command line or in --config" if any(a.dest == "config" for a in parser._actions) \
        else "on the command line"
    required = parser.add_argument_group(f"required ({where})")
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = (help_overrides or {}).get(f.name, f.metadata.get("help", ""))
        if default is not None:
            help_text += f" (default: {list(default) if isinstance(default, tuple) else default})"
        # argparse %-formats help strings: a literal "%" (e.g. "~30% slower") must be doubled
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        flags = [_flag(f.name)]
        if hint is bool:
            # --x / --no-x by hand: BooleanOptionalAction under ArgumentDefaultsHelpFormatter prints its internals
            # when the help holds a "%"; two plain store actions on one dest show two clean lines.
            kwargs["action"] = "store_true"
            group = parser.add_mutually_exclusive_group()
            group.add_argument(*flags, **kwargs)
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                               default=argparse.SUPPRESS, help=f"turn {flags[0]} off")
            continue
        if origin is typing.Literal:
            kwargs["choices"] = list(args)
        elif origin is tuple:
            kwargs["nargs"] = "+"
            kwargs["type"] = args[0] if args and args[0] in (int, float) else str  # numbers parsed as typed
        elif origin in (typing.Union, types.UnionType) and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            kwargs["type"] = _float_or_none if inner is float else inner
            kwargs["metavar"] = f.name.upper()
        else:
            kwargs["type"] = hint
        (required if f.default is dataclasses.MISSING else parser).add_argument(*flags, **kwargs)


def build_config(cls: type, args: argparse.Namespace) -> object:
    """Dataclass defaults < --config file < command-line flags. Every value is checked against its field's type
    (see `coerce`) before the dataclass checks ranges."""
    config_path = getattr(args, "config", None)
    values = read_config_file(config_path, cls) if config_path else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    where = f"--config {config_path}: " if config_path else ""
    values = coerce_settings(cls, values, where)
    missing = [_flag(f.name) for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        how = "on the command line or in --config" if hasattr(args, "config") else "on the command line"
        raise ValueError(f"missing required setting(s): {', '.join(missing)} ({how})")
    return cls(**values)


def coerce(value: Any, hint: Any, name: str, where: str = "") -> Any:
    """`value` as the type `hint` of field `name`: ints stay ints (2.0 -> 2, 2.5 refused), an int is a float, lists
    become tuples, "none"/"off" is None for optional fields. Anything else is a ValueError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in NONE_WORDS):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(where, name, value, "true or false")
    if hint is int:
        if isinstance(value, bool):
            raise _type_error(where, name, value, "a whole number")
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise _type_error(where, name, value, "a whole number")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(where, name, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(where, name, value, "a string")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{where}{name}: expected one of {list(args)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, name, value, f"a list of {_NAMES.get(args[0], 'values')}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            return tuple(coerce(v, args[0], f"{name}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _type_error(where, name, value, f"{len(args)} values")
        return tuple(coerce(v, a, f"{name}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    return value


def _type_error(where: str, name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{where}{name}: expected {expected}, got {value!r} ({type(value).__name__})")


_NAMES = {str: "strings", int: "whole numbers", float: "numbers", bool: "true/false values"}


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


CONFIG_FORMATS = {".toml": "TOML", ".json": "JSON"}


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """The table of settings in a TOML (`.toml`) or JSON (`.json`, or any other name) file. YAML and INI files
    are refused by name: read as JSON they would fail with a parse error that says nothing of the format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml", ".ini", ".cfg"):
        raise ValueError(f"--config {path}: {suffix[1:].upper()} is not supported; write the settings as TOML "
                         f"(.toml) or JSON (.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read ({e})") from e
    try:
        values = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        fmt = CONFIG_FORMATS.get(suffix, "JSON")
        raise ValueError(f"--config {path}: cannot parse as {fmt} ({e}); config files are TOML (.toml) or "
                         "JSON (.json)") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a table of settings, got {type(values).__name__}")
    return values


def read_config_file(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a JSON or TOML file of config fields (CLI flags override it). Unknown keys are an error."""
    values = read_settings_file(path)
    known = config_fields(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {path}: unknown settings {unknown}; known: {sorted(known)}")
    return dict(values)


def coerce_settings(cls: type, values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`values` (field name -> value, from a file or typed as text) each checked and converted to its field's type
    in `cls` (see `coerce`); an unknown name is an error listing the known ones."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{where}unknown settings {unknown}; known: {sorted(config_fields(cls))}")
    return {k: coerce(v, hints[k], k, where) for k, v in values.items()}
