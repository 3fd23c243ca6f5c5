"""Choice between a Triton kernel and its plain-torch twin.

`ops.py` and `norms.py` are the only callers: every public op takes ``backend=`` and
resolves it here, so the rule lives in one place.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "RINGMASTER_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports here (cached: the import is slow and its answer fixed)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: object) -> None:
    """ValueError unless ``backend`` is None or one of ``BACKENDS``: for callers that take
    a backend long before the first op that resolves it (an optimizer's constructor)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op on ``tensors``.

    ``backend`` (the call's argument) wins over ``$RINGMASTER_BACKEND``; ``"auto"``
    picks Triton when every tensor is on CUDA and Triton imports, else the twin.
    Forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1``.
    """
    choice = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        source = "backend" if backend not in (None, "auto") else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("backend='triton' was asked for but triton is not installed")
        if not on_cuda and not interpreting():
            raise ValueError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                "(set it before importing triton)"
            )
    return choice
