"""Public tensor ops. The only module that chooses between a Triton kernel and its twin."""
from __future__ import annotations

import math

import torch

from . import reference
from .backend import resolve_backend
from .coefficients import Coefficients

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_matrix(name: str, G: object) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() < 2:
        raise ValueError(f"{name} must have shape (m, n) or (..., m, n), got {tuple(G.shape)}")
    if G.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({_FLOAT_DTYPES}), got {G.dtype}")


def _check_out(out: torch.Tensor | None, like: torch.Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must match G's shape/dtype/device {tuple(like.shape)}/{like.dtype}/{like.device}, "
            f"got {tuple(out.shape)}/{out.dtype}/{out.device}"
        )


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
    out: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    beta: float = 0.0,
    backend: str | None = "auto",
) -> torch.Tensor:
    """Approximate the polar factor ``U V^T`` of ``G = U S V^T`` by Newton–Schulz.

    Args:
        G: (m, n) or a batch (..., m, n) of same-shape matrices; fp32, fp16, bf16 or fp64,
            any strides. Tall matrices are iterated on their transposed view (no copy).
        steps: number of iterations.
        coefficients: ``"quintic"`` (Muon), ``"polar_express"`` or one (a, b, c) per step.
        eps: added to the Frobenius norm before normalizing (done in fp32); a zero
            matrix maps to zero, not NaN.
        out: optional tensor of G's shape, dtype and device to write into (may be G).
        compute_dtype: dtype of the iteration math; bf16 on CUDA, fp32 on CPU by default.
        scale: the result is ``scale * U V^T``, applied in the last kernel's epilogue
            (e.g. ``-lr * rho`` for a spectral LMO step).
        beta: when nonzero, ``out`` (required) becomes ``beta * out + scale * U V^T`` in
            the same epilogue (e.g. ``1 - lr * weight_decay``: a fused parameter update).
            With ``beta = 0`` ``out`` is never read.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; ``$RINGMASTER_BACKEND`` applies
            when this is ``"auto"``.

    Returns:
        A tensor of G's shape and dtype (``out`` if given). Non-finite input propagates
        NaN to the output of that matrix only; nothing raises or hangs on it.
    """
    _check_matrix("G", G)
    _check_out(out, G)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    for name, value in (("scale", scale), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if beta != 0.0 and out is None:
        raise ValueError("beta != 0 accumulates into out, so out must be given")
    if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be one of {_FLOAT_DTYPES}, got {compute_dtype}")
    if resolve_backend(backend, G) == "triton":
        from .kernels import newton_schulz

        return newton_schulz.orthogonalize(G, steps, coefficients, eps, out, compute_dtype, scale, beta)
    return reference.orthogonalize(G, steps, coefficients, eps, out, compute_dtype, scale, beta)
