"""argparse types shared by the commands: a bad value is refused by argparse itself, with
the flag's name, before any work starts."""
from __future__ import annotations

import argparse
import math
import os


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An int >= 0 (e.g. a seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite(text: str, low: float, strict: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _finite(text, 0.0, strict=True)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _finite(text, 0.0, strict=False)


def unit_interval(text: str) -> float:
    """A number in [0, 1) (e.g. a momentum)."""
    value = _finite(text, 0.0, strict=False)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def float_list(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers >= 0, e.g. ``0,0.5,1``."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers >= 0, got {text!r}")
    return values


def output_file(text: str) -> str:
    """A path whose directory exists (or can be made) and is writable: checked before the
    run, not after it."""
    directory = os.path.dirname(os.path.abspath(text)) or "."
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create the folder {directory!r}: {exc.strerror}") from None
    if os.path.isdir(text) or not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}")
    return text
