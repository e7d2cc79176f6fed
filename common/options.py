"""Argument types for the command lines: a number outside its real range is refused while the
arguments are parsed, with argparse's one-line error and exit code 2, before any slow work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from common.hardware import DeviceError, pick_device


def ranged(kind: type, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type` for an int or float within [low, high] (`*_open`: that end excluded)."""
    bounds = _describe(low, high, low_open, high_open)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


COUNT = ranged(int, 1)  # 1, 2, 3, ...
NON_NEGATIVE_INT = ranged(int, 0)
POSITIVE = ranged(float, 0, low_open=True)
NON_NEGATIVE = ranged(float, 0)
PROBABILITY = ranged(float, 0, 1, low_open=True)  # (0, 1]
DROPOUT = ranged(float, 0, 1, high_open=True)  # [0, 1)
SEED = ranged(int, 0, 2**32 - 1)  # what every random generator involved accepts


def COUNTS(text: str) -> list[int]:  # noqa: N802
    """An argparse `type` for a comma-separated list of counts, e.g. --clients 1,4,16."""
    return [COUNT(part.strip()) for part in text.split(",")]


def DEVICE(text: str) -> str:  # noqa: N802  (named like the other argument types)
    """An argparse `type` for --device: cpu, cuda or cuda:N that this machine has."""
    try:
        pick_device(text)
    except DeviceError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
