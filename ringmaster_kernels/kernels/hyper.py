"""Hyperparameters a kernel takes by value or from device memory.

A Python float is baked into a launch (and into a CUDA graph that captures it); a
capturable step passes lr, momentum and weight decay as 0-dim fp32 tensors instead, so
a replayed graph reads whatever the tensors hold now and nothing is read on the host.
A kernel gets the argument as it came (Triton types a tensor argument as a pointer) plus
a constexpr saying which it is; :func:`value` turns either into an fp32 scalar.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def value(v, ON_DEVICE: tl.constexpr):
    """``v`` itself, or (ON_DEVICE) the fp32 its pointer points at."""
    if ON_DEVICE:
        return tl.load(v).to(tl.float32)
    else:
        return v


def on_device(*values: float | torch.Tensor) -> bool:
    """Whether the hyperparameters come as tensors: all of them, or none (a kernel reads
    one constexpr per launch). Validated by the public ops (``ops.check_hyper``)."""
    flags = {isinstance(v, torch.Tensor) for v in values}
    if len(flags) > 1:
        raise TypeError("hyperparameters must be all Python numbers or all 0-dim tensors, not a mix")
    return flags.pop() if flags else False
