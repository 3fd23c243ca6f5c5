"""The one way this package launches a Triton kernel: on the tensors' device, counted.

Triton launches on the *current* CUDA device and takes raw addresses, so a tensor on
``cuda:1`` while ``cuda:0`` is current would be read through the wrong context.
:func:`launch` enters the device of the tensors it is given first, for every kernel.

:func:`count_launches` counts what a block of code launches: Triton kernels (by
name, through :func:`launch`, so the count works under ``TRITON_INTERPRET=1`` on a CPU
too, where Triton's own launch hooks never fire) and torch operators that run a kernel
(through a dispatch mode; views and allocations run none and are not counted). It is a
host-cost measure for ``ringmaster bench optim``, not a profiler: an autotuner's trial
runs on a new shape count as one launch, and a torch op may run more than one kernel.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_state = threading.local()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch when it is a CUDA device (a no-op otherwise)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``device`` current, recorded by any active counter."""
    counts = getattr(_state, "counts", None)
    if counts is not None:
        name = getattr(kernel, "fn", kernel)  # an autotuner wraps the JIT function
        counts.triton[getattr(name, "__name__", str(name))] += 1
    # the interpreter runs torch ops of its own (copies to and from numpy): not ours to count
    _state.in_triton = True
    try:
        with device_guard(device):
            kernel[grid](*args, **kwargs)
    finally:
        _state.in_triton = False


@dataclass
class LaunchCounts:
    """Triton launches per kernel name and torch operators per name."""

    triton: Counter = field(default_factory=Counter)
    torch: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        return {"triton": sum(self.triton.values()), "torch": sum(self.torch.values()),
                "triton_by_kernel": dict(self.triton), "torch_by_op": dict(self.torch)}


# operators that only allocate or describe memory: no kernel runs
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}


class _TorchCounter(TorchDispatchMode):
    def __init__(self, counts: LaunchCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        # an op returning no tensor (promote_types, a size query) runs no kernel either
        makes_tensor = any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(result))
        if makes_tensor and not getattr(_state, "in_triton", False) and not func.is_view and name not in _NO_KERNEL:
            self.counts.torch[name] += 1
        return result


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCounts]:
    """Count the Triton launches and kernel-running torch ops of the ``with`` block (this thread)."""
    if getattr(_state, "counts", None) is not None:
        raise RuntimeError("count_launches() does not nest")
    counts = LaunchCounts()
    _state.counts = counts
    try:
        with _TorchCounter(counts):
            yield counts
    finally:
        _state.counts = None
