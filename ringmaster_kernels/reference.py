"""Plain-torch twins of every Triton kernel: the test oracle and the CPU path.

Each function has the signature of the public op it stands in for (minus ``backend``).
Keep them simple and obviously right; speed lives in ``kernels/``.
"""
from __future__ import annotations

from typing import Callable

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
    scale: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 0.0,
    ns_update: str = "triton",
) -> torch.Tensor:
    """Approximate polar factor U V^T of ``G`` (..., m, n) by Newton–Schulz; see ``ops.orthogonalize``.

    Returns ``scale * UV^T`` in G's dtype, or writes ``beta * out + scale * UV^T`` into
    ``out`` (which is read only when ``beta != 0``, or always when beta is a tensor: its
    value is never read on the host). ``ns_update`` is the kernels' choice of update
    (every update here is ``torch.baddbmm``); accepted so both take the same options.
    """
    sched = schedule(coefficients, steps)
    dtype = compute_dtype or default_compute_dtype(G.device)
    X = (G.float() * inverse_norm(G, sched.safety, eps)).to(dtype).reshape(G.shape[:-2].numel(), *G.shape[-2:])
    # A tall X iterates in its own orientation on A = X^T X, X' = a X + X B: the same
    # polynomial as on X^T, without the transposed views that make bmm copy on CPU.
    tall = G.size(-2) > G.size(-1)
    for a, b, c in sched.triples:
        # baddbmm rounds each polynomial once, as the kernels' fp32 epilogues and
        # torch.optim.Muon's addmm do; separate ops would round (in bf16) 3-4 times.
        A = torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)
        # c = 0 (cubic schedules): torch's CPU bf16 baddbmm with alpha=0 returns the
        # input unscaled, ignoring beta (torch 2.13), so skip the product instead.
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if c != 0.0 else b * A
        X = torch.baddbmm(X, X, B, beta=a) if tall else torch.baddbmm(X, B, X, beta=a)
    X = X.reshape(G.shape)
    on_device = isinstance(scale, torch.Tensor) or isinstance(beta, torch.Tensor)
    if on_device or scale != 1.0 or beta != 0.0:  # combine in (at least) fp32, rounding once into G's dtype
        wide = torch.promote_types(X.dtype, torch.float32)
        X = scale * X.to(wide)
        if on_device or beta != 0.0:
            X = X + beta * out.to(wide)
    if out is None:  # one pass converts and lays out (X is strided like G when steps = 0)
        return X.to(G.dtype, memory_format=torch.contiguous_format)
    return out.copy_(X)


# ---------------------------------------------------------------- Norms and LMO step
# Direct formulas, written out per norm so that they check the catalogue in norms.py
# and the fused kernels independently. Math runs in fp32 (fp64 for fp64 input).
# Units: "spectral", "colnorm", "rownorm" act per matrix on the last two dims;
# "sign", "l2", "l1" per matrix too, or on the whole vector of a 1-D input;
# "bias_rms" per vector along the last dim.
def _wide(G: torch.Tensor) -> torch.Tensor:
    return G.to(torch.promote_types(G.dtype, torch.float32))


def _entry_dims(G: torch.Tensor) -> tuple[int, ...]:
    return (-2, -1) if G.dim() >= 2 else (-1,)


def safe_reciprocal(n: torch.Tensor) -> torch.Tensor:
    """``1 / n`` with ``1 / 0 = 0``: a zero unit gets a zero step, not 0/0 = NaN.

    NaN and inf still propagate (``inf * 0`` and ``NaN`` downstream), which is the
    documented behaviour for non-finite gradients.
    """
    return torch.where(n == 0, torch.zeros_like(n), 1.0 / n)


def _sign(X: torch.Tensor) -> torch.Tensor:
    """``torch.sign`` except NaN -> NaN (torch gives 0, which would hide a bad gradient)."""
    return torch.where(torch.isnan(X), X, torch.sign(X))


def spectral_factor(rows: int, cols: int, scale: str) -> float:
    """Radius multiplier of the spectral ball for a (rows=d_out, cols=d_in) matrix.

    ``"none"``: 1; ``"scion"``: sqrt(d_out / d_in) (the RMS->RMS operator norm ball);
    ``"muon"``: sqrt(max(1, d_out / d_in)) (Muon's shape scale).
    """
    if scale == "none":
        return 1.0
    if scale == "scion":
        return (rows / cols) ** 0.5
    if scale == "muon":
        return max(1.0, rows / cols) ** 0.5
    raise ValueError(f"scale must be one of ('none', 'scion', 'muon'), got {scale!r}")


def _lmo_spectral(X, G, radius, scale, steps, coefficients, eps, compute_dtype):
    D = orthogonalize(G, steps, coefficients, eps, compute_dtype=compute_dtype).to(X.dtype)
    return D * (-radius * spectral_factor(G.size(-2), G.size(-1), scale))


def _lmo_sign(X, radius):
    return -radius * _sign(X)


def _lmo_l2(X, radius):
    return X * (-radius * safe_reciprocal(torch.linalg.vector_norm(X, dim=_entry_dims(X), keepdim=True)))


def _lmo_l1(X, radius):
    flat = X.flatten(-2) if X.dim() >= 2 else X
    if flat.numel() == 0:  # argmax has nothing to pick from
        return torch.zeros_like(X)
    j = flat.abs().argmax(dim=-1, keepdim=True)
    D = torch.zeros_like(flat).scatter_(-1, j, -radius * _sign(flat.gather(-1, j)))
    return D.view_as(X)


def _lmo_colnorm(X, radius):
    col = torch.linalg.vector_norm(X, dim=-2, keepdim=True)
    return X * (-radius * X.size(-2) ** 0.5 * safe_reciprocal(col))


def _lmo_rownorm(X, radius):
    row = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    return X * (-radius / _root(X.size(-1)) * safe_reciprocal(row))


def _lmo_bias_rms(X, radius):
    vec = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
    return X * (-radius * X.size(-1) ** 0.5 * safe_reciprocal(vec))


_LMO = {
    "sign": _lmo_sign,
    "l2": _lmo_l2,
    "l1": _lmo_l1,
    "colnorm": _lmo_colnorm,
    "rownorm": _lmo_rownorm,
    "bias_rms": _lmo_bias_rms,
}


def lmo(
    G: torch.Tensor,
    norm: str,
    radius: float = 1.0,
    *,
    scale: str = "none",
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
    ns_update: str = "triton",
) -> torch.Tensor:
    """``argmin_{||Z|| <= radius} <G, Z>`` in G's shape and dtype; see ``norms.lmo``.

    The keyword options only matter for ``"spectral"`` (its Newton–Schulz, the
    iteration's ``compute_dtype``, and the scale; ``ns_update`` is the kernels' choice
    and changes nothing here).
    """
    X = _wide(G)
    if norm == "spectral":
        D = _lmo_spectral(X, G, radius, scale, steps, coefficients, eps, compute_dtype)
    else:
        D = _LMO[norm](X, radius)
    return D.to(G.dtype)


def _root(n: int) -> float:
    """sqrt(n) for a unit's size factor; an empty unit (n = 0) has nothing to scale."""
    return max(n, 1) ** 0.5


def _amax(X: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """``X.amax(dim)``, but 0 over an empty unit (the norm of the zero-dimensional
    space) where torch refuses an empty reduction."""
    dims = (dim,) if isinstance(dim, int) else dim
    if any(X.size(d) == 0 for d in dims):
        return torch.zeros_like(X.sum(dim=dim))
    return X.amax(dim=dim)


def _singular(X: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """An SVD-based norm per matrix, NaN for a matrix holding NaN and inf for one
    holding inf (LAPACK refuses non-finite input instead of propagating it)."""
    has_nan = torch.isnan(X).any(-1).any(-1)
    finite = torch.isfinite(X).all(-1).all(-1)
    value = norm(torch.where(finite[..., None, None], X, torch.zeros_like(X)))
    return torch.where(has_nan, torch.nan, torch.where(finite, value, torch.inf))


def _nuclear(X):
    return _singular(X, lambda Y: torch.linalg.matrix_norm(Y, ord="nuc"))


_DUAL = {
    "spectral": lambda X, s: s * _nuclear(X),
    "sign": lambda X, s: X.abs().sum(dim=_entry_dims(X)),
    "l2": lambda X, s: torch.linalg.vector_norm(X, dim=_entry_dims(X)),
    "l1": lambda X, s: _amax(X.abs(), _entry_dims(X)),
    "colnorm": lambda X, s: X.size(-2) ** 0.5 * torch.linalg.vector_norm(X, dim=-2).sum(-1),
    "rownorm": lambda X, s: torch.linalg.vector_norm(X, dim=-1).sum(-1) / _root(X.size(-1)),
    "bias_rms": lambda X, s: X.size(-1) ** 0.5 * torch.linalg.vector_norm(X, dim=-1),
}

_PRIMAL = {
    "spectral": lambda X, s: _singular(X, lambda Y: torch.linalg.matrix_norm(Y, ord=2)) / s,
    "sign": lambda X, s: _amax(X.abs(), _entry_dims(X)),
    "l2": lambda X, s: torch.linalg.vector_norm(X, dim=_entry_dims(X)),
    "l1": lambda X, s: X.abs().sum(dim=_entry_dims(X)),
    "colnorm": lambda X, s: _amax(torch.linalg.vector_norm(X, dim=-2), -1) / _root(X.size(-2)),
    "rownorm": lambda X, s: X.size(-1) ** 0.5 * _amax(torch.linalg.vector_norm(X, dim=-1), -1),
    "bias_rms": lambda X, s: torch.linalg.vector_norm(X, dim=-1) / _root(X.size(-1)),
}


def _spectral_s(G: torch.Tensor, norm: str, scale: str) -> float:
    return spectral_factor(G.size(-2), G.size(-1), scale) if norm == "spectral" else 1.0


def dual_norm(G: torch.Tensor, norm: str, *, scale: str = "none") -> torch.Tensor:
    """Dual norm of G per unit, shape = G's batch dims, fp32 (fp64 for fp64 G); see ``norms.dual_norm``."""
    return _DUAL[norm](_wide(G), _spectral_s(G, norm, scale))


def primal_norm(G: torch.Tensor, norm: str, *, scale: str = "none") -> torch.Tensor:
    """The norm itself per unit (the ball is ``primal_norm <= radius``); see ``norms.primal_norm``."""
    return _PRIMAL[norm](_wide(G), _spectral_s(G, norm, scale))


CORRECTIONS = (None, "difference", "vector")


def add_scaled_(y: torch.Tensor, x: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``y += alpha * x`` in place: torch's fused ``alpha=`` for a number, a product for a
    (0-dim) tensor, which ``alpha=`` does not take."""
    return y.add_(x, alpha=alpha) if not isinstance(alpha, torch.Tensor) else y.add_(alpha * x)


def momentum_update_(
    m: torch.Tensor,
    g: torch.Tensor,
    *,
    beta: float | torch.Tensor,
    nesterov: bool = False,
    correction: str | None = None,
    extra: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    q: float = 0.0,
) -> torch.Tensor:
    """One momentum-estimator update in m's dtype, in place on ``m`` (and ``h``); returns u.

    ``h`` (MVR-2's state) given: ``h <- g + (1 - q)(h - e)`` and the EMA runs on h, else on g;
    then ``m <- beta m + (1 - beta) s``, plus ``beta (g - e)`` (correction "difference":
    MVR) or ``beta e`` ("vector": HCM's Hessian-vector product); ``u = beta m + (1 - beta) g``
    (nesterov) or ``m``. ``e = extra`` (m's shape). The twin of the kernels' momentum pass.
    ``beta`` may be a 0-dim tensor (read on the device).
    """
    g = g.to(m.dtype)
    source = g
    if h is not None:
        h.sub_(extra.to(m.dtype)).mul_(1.0 - q).add_(g)
        source = h
    m.lerp_(source, 1.0 - beta)  # exact at weight 1: beta = 0 gives m = source
    if correction == "difference":
        add_scaled_(m, g - extra.to(m.dtype), beta)
    elif correction == "vector":
        add_scaled_(m, extra.to(m.dtype), beta)
    return torch.lerp(g, m, beta) if nesterov else m


def lmo_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momenta: list[torch.Tensor],
    *,
    norm: str,
    lr: float | torch.Tensor,
    beta: float | torch.Tensor,
    nesterov: bool = False,
    weight_decay: float | torch.Tensor = 0.0,
    radius: float = 1.0,
    correction: str | None = None,
    extras: list[torch.Tensor] | None = None,
    recursion: list[torch.Tensor] | None = None,
    q: float = 0.0,
    **options,
) -> None:
    """One LMO-momentum step per tensor, in place; see ``ops.lmo_step_``.

    ``m <- beta m + (1 - beta) g`` (fp32; with the estimator terms of
    :func:`momentum_update_` when ``correction``/``recursion`` are given), ``u = beta m +
    (1 - beta) g`` (Nesterov) or ``u = m``, then ``x <- (1 - lr wd) x + lr lmo(u)``,
    rounded once into x's dtype.

    Spectral directions of same-shape tensors are computed by one ``lmo`` call on their
    stack (one batched Newton–Schulz per shape, as the kernels do): a stack of matrices
    is a batch of independent units, so the result is the per-tensor one.
    """
    us = []
    for i, (g, m) in enumerate(zip(grads, momenta)):
        us.append(momentum_update_(m, g, beta=beta, nesterov=nesterov, correction=correction,
                                   extra=None if extras is None else extras[i],
                                   h=None if recursion is None else recursion[i], q=q))
    if norm == "spectral":
        by_shape: dict[torch.Size, list[int]] = {}
        for i, u in enumerate(us):
            by_shape.setdefault(u.shape, []).append(i)
        directions: dict[int, torch.Tensor] = {}
        for idx in by_shape.values():
            directions.update(zip(idx, lmo(torch.stack([us[i] for i in idx]), norm, radius, **options)))
    else:  # a stack of 1-D tensors would be one unit for sign/l2/l1: these stay per tensor
        directions = dict(enumerate(lmo(u, norm, radius, **options) for u in us))
    for i, x in enumerate(params):
        x.copy_(add_scaled_(_wide(x) * (1.0 - lr * weight_decay), directions[i], lr))
