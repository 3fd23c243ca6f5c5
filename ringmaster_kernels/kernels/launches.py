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

An autotuned kernel goes through ``triton.autotune``'s wrapper only the first time a key
is seen (it times the configs then, or reads its disk cache); :class:`ChosenConfigs` keeps
the config it picked and later launches call the JIT function with that config's
meta-parameters, ``num_warps`` and ``num_stages`` directly. The wrapper re-derives its key
from dicts of every argument on each call; the direct launch hashes one tuple.

:func:`forbid_host_sync` is the check behind a capturable step's contract: inside it, any
torch operator that makes the host wait for the device (a value read back, a data-
dependent output size, a device-to-host copy) raises :class:`HostSyncError`. It works on
CPU tensors too, where nothing actually waits, so the contract is testable without a GPU.
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
from triton.runtime.autotuner import Autotuner

_state = threading.local()


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch when it is a CUDA device (a no-op otherwise)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class ChosenConfigs:
    """The config ``triton.autotune`` chose, per autotuner and key, launched directly.

    The key holds what the autotuner's own key holds (its key arguments and the dtype of
    every tensor argument) plus every keyword argument (the constexpr flags), so it is
    never coarser than the autotuner's: a config is reused only where the autotuner would
    have picked the same one. A config with a ``pre_hook`` is never bypassed.
    """

    def __init__(self) -> None:
        self._chosen: dict[Autotuner, dict[tuple, dict]] = {}
        self._positions: dict[Autotuner, tuple[int, ...]] = {}
        self._lock = threading.Lock()  # the autotuner's own run() keeps per-call state on itself
        self.direct = 0  # launches that skipped the autotuner's wrapper (a test and bench figure)

    def _key(self, tuner: Autotuner, args: tuple, kwargs: dict) -> tuple:
        positions = self._positions.get(tuner)
        if positions is None:
            positions = tuple(tuner.arg_names.index(k) for k in tuner.keys)
            self._positions[tuner] = positions
        return (tuple(args[i] for i in positions if i < len(args)),
                tuple(a.dtype for a in args if isinstance(a, torch.Tensor)), tuple(kwargs.items()))

    def run(self, tuner: Autotuner, grid, args: tuple, kwargs: dict) -> None:
        key = self._key(tuner, args, kwargs)
        meta = self._chosen.get(tuner, {}).get(key)
        if meta is not None:
            self.direct += 1
            tuner.fn[grid](*args, **kwargs, **meta)
            return
        with self._lock:
            tuner[grid](*args, **kwargs)
            config = tuner.best_config
            if config.pre_hook is None:
                self._chosen.setdefault(tuner, {})[key] = config.all_kwargs()

    def clear(self) -> None:
        with self._lock:
            self._chosen.clear()


chosen_configs = ChosenConfigs()


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``device`` current, recorded by any active counter.

    An autotuned ``kernel`` is launched with its chosen config once the autotuner has
    seen the key (:class:`ChosenConfigs`)."""
    counts = getattr(_state, "counts", None)
    if counts is not None:
        name = getattr(kernel, "fn", kernel)  # an autotuner wraps the JIT function
        counts.triton[getattr(name, "__name__", str(name))] += 1
    # the interpreter runs torch ops of its own (copies to and from numpy): not ours to count
    _state.in_triton = True
    try:
        with device_guard(device):
            if isinstance(kernel, Autotuner):
                chosen_configs.run(kernel, grid, args, kwargs)
            else:
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


class HostSyncError(RuntimeError):
    """An operator that waits for the device ran inside :func:`forbid_host_sync`."""


# operators that read a device value back (``.item()``, ``float()``, ``bool()`` and
# comparisons of whole tensors) or whose output size depends on the data
_SYNCING = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "unique",
            "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc", "masked_scatter"}


def _sync_reason(func, args: tuple, kwargs: dict, result: object) -> str | None:
    name = func.overloadpacket.__name__
    if name in _SYNCING:
        return "reads a device value on the host or has a data-dependent size"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        return "has a data-dependent size (no output_size)"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return "indexes with a boolean mask (a nonzero)"
    if name in ("_to_copy", "copy_", "to"):
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
        if any(t.is_cuda for t in inputs) and any(t.device.type == "cpu" for t in outputs):
            return "copies device memory to the host"
    return None


class _SyncGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not getattr(_state, "in_triton", False):  # the interpreter's own copies are not the step's
            reason = _sync_reason(func, args, kwargs, result)
            if reason is not None:
                raise HostSyncError(f"{func} {reason}: the host would wait for the device")
        return result


@contextlib.contextmanager
def forbid_host_sync() -> Iterator[None]:
    """Raise :class:`HostSyncError` at the first torch operator of the ``with`` block that
    would make the host wait for the device (see the module doc)."""
    with _SyncGuard():
        yield
