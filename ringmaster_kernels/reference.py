"""Plain-torch twins of every Triton kernel: the test oracle and the CPU path.

Each function has the signature of the public op it stands in for (minus ``backend``).
Keep them simple and obviously right; speed lives in ``kernels/``.
"""
from __future__ import annotations

import torch

from .coefficients import Coefficients, schedule


# ---------------------------------------------------------------- Newton–Schulz
def default_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (tensor cores), fp32 elsewhere (CPU bf16 matmul is slow and lossy)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def inverse_norm(G: torch.Tensor, safety: float, eps: float) -> torch.Tensor:
    """fp32 ``1 / (safety * ||G||_F + eps)`` per matrix of G (..., m, n), shape (..., 1, 1).

    A zero matrix gets factor 0 even with ``eps = 0``, so it maps to zero, not NaN; a
    non-finite matrix still yields NaN downstream (inf * 0 or NaN), as documented.
    """
    wide = torch.promote_types(G.dtype, torch.float32)  # fp64 input keeps its norm in fp64
    norm = torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True, dtype=wide).float()
    return torch.where(norm > 0, 1.0 / (norm * safety + eps), torch.zeros_like(norm))


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
    out: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    scale: float = 1.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """Approximate polar factor U V^T of ``G`` (..., m, n) by Newton–Schulz; see ``ops.orthogonalize``.

    Returns ``scale * UV^T`` in G's dtype, or writes ``beta * out + scale * UV^T`` into
    ``out`` (which is read only when ``beta != 0``).
    """
    sched = schedule(coefficients, steps)
    dtype = compute_dtype or default_compute_dtype(G.device)
    X = (G.float() * inverse_norm(G, sched.safety, eps)).to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation so A = X X^T is the small Gram matrix
        X = X.mT
    for a, b, c in sched.triples:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    if scale != 1.0 or beta != 0.0:  # combine in (at least) fp32, rounding once into G's dtype
        wide = torch.promote_types(X.dtype, torch.float32)
        X = scale * X.to(wide)
        if beta != 0.0:
            X = X + beta * out.to(wide)
    result = X.to(G.dtype)
    if out is None:
        return result.contiguous()
    out.copy_(result)
    return out
