"""train.py --config FILE: a run's settings from a YAML file (a recipe under recipes/, or a run's own
train_config.json, which is YAML too). Each key is one of train.py's flags spelled with underscores
(token_lr_scale for --token-lr-scale), and each value is checked as that flag's would be (type, range,
choices): an unknown key, a wrong type or a value out of range is one line naming the file and the key."""

from __future__ import annotations

import argparse
import difflib
import re
import typing
from pathlib import Path

import yaml

from common.files import FileError, first_line
from training.config import TrainConfig
from training.distributed import requested_world_size

# A run's train_config.json also records its process count, a fact of the run rather than a flag: another
# count would train on other rows per step, so a file that names one is run with that many processes.
RECORDED_WORLD_SIZE = "world_size"
KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 and 1.0e3 as text (its floats need a dot and a signed exponent): this loader
    reads them as the numbers everyone means."""


EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))


def settings_from_file(path: str, flags: dict[str, argparse.Action]) -> dict:
    """The settings that the file at `path` holds, each checked as its flag in `flags` (train.py's, by
    setting name) checks a command-line value. Raises FileError naming the file and the key."""
    settings = _read(Path(path))
    hints = typing.get_type_hints(TrainConfig)
    checked = {}
    for key, value in settings.items():
        if key == RECORDED_WORLD_SIZE:
            _check_world_size(path, value)
        elif key in hints:
            checked[key] = _checked(path, key, value, hints[key], flags[key])
        else:
            close = difflib.get_close_matches(str(key), [*hints, RECORDED_WORLD_SIZE], n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else "the settings are train.py's flags spelled with underscores, as in token_lr_scale")
            raise FileError(f"{path}: {key!r} is not a setting ({hint})")
    return checked


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FileError(f"cannot read {path}: {error}") from None
    try:
        settings = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(error, "problem", None) or first_line(error)
        raise FileError(f"{path}{where}: not valid YAML: {reason}") from None
    if settings is None:  # an empty file: no setting changed
        return {}
    if not isinstance(settings, dict):
        raise FileError(f"{path} is not a list of settings (one `name: value` per line)")
    return settings


def _checked(path: str, key: str, value: object, hint: object, flag: argparse.Action) -> object:
    """`value` if it suits the setting (an int given for a float setting becomes a float)."""
    kinds = typing.get_args(hint) or (hint,)
    optional = type(None) in kinds
    kind = next(kind for kind in kinds if kind is not type(None))
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FileError(f"{path}: {key}: expected {KIND_NAMES[kind]}{' or null' if optional else ''}, got {value!r}")
    if flag.choices is not None and value not in flag.choices:
        raise FileError(f"{path}: {key}: must be one of {', '.join(flag.choices)}, got {value!r}")
    if flag.type is not None:
        try:
            flag.type(str(value))
        except argparse.ArgumentTypeError as error:
            raise FileError(f"{path}: {key}: {error}") from None
    return value


def _check_world_size(path: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FileError(f"{path}: {RECORDED_WORLD_SIZE}: expected a whole number >= 1, got {value!r}")
    processes = requested_world_size()
    if value != processes:
        raise FileError(f"{path}: {RECORDED_WORLD_SIZE}: the run was recorded with {value} processes and this one has "
                        f"{processes}; start it under torchrun --nproc-per-node {value}, or delete that line")
