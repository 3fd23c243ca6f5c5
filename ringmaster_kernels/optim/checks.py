"""Checks of optimizer hyperparameters shared by the optimizers and the update rules:
one wording for every "must be a number in range" error, naming where and what."""
from __future__ import annotations

import math

import torch


def check_number(where: str, name: str, value: object, high: float = math.inf) -> float:
    """``value`` as a float; ValueError unless ``0 <= value < high`` is a real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < high:
        bound = "a finite number >= 0" if high == math.inf else f"in [0, {high:g})"
        raise ValueError(f"{where}: {name} must be {bound}, got {value!r}")
    return float(value)


def check_lr(where: str, lr: object) -> float:
    """``lr`` as a float: a number >= 0 or a 1-element tensor (a scheduler may set either)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
        lr = float(lr)
    return check_number(where, "lr", lr)
