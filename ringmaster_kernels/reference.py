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


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
    out: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate polar factor U V^T of ``G`` (..., m, n) by Newton–Schulz; see ``ops.orthogonalize``."""
    sched = schedule(coefficients, steps)
    dtype = compute_dtype or default_compute_dtype(G.device)
    X = G.float()
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)
    X = (X / (norm * sched.safety + eps)).to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation so A = X X^T is the small Gram matrix
        X = X.mT
    for a, b, c in sched.triples:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    result = X.to(G.dtype)
    if out is None:
        return result.contiguous()
    out.copy_(result)
    return out
