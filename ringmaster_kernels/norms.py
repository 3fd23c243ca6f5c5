"""Norm-ball catalogue: the LMO, dual norm and norm of every norm a parameter group can name.

``lmo(G, norm, radius) = argmin_{||Z|| <= radius} <G, Z>``. The catalogue (``NORMS``):

============  ==========================================  ===========================  ======
name          lmo(G) per unit                             dual_norm(G)                 unit
============  ==========================================  ===========================  ======
spectral      -r * s * U V^T  (G = U S V^T, Newton–Schulz)  s * sum of singular values   matrix
sign          -r * sign(G)                                sum |G_ij|                   entries
l2            -r * G / ||G||_F                            ||G||_F                      entries
l1            -r * sign(G_j*) e_j*,  j* = argmax |G_j|    max |G_j|                    entries
colnorm       column j: -r * sqrt(m) * G_:j / ||G_:j||    sqrt(m) * sum_j ||G_:j||     matrix
rownorm       row i: -r * G_i: / (sqrt(n) ||G_i:||)       sum_i ||G_i:|| / sqrt(n)     matrix
bias_rms      -r * sqrt(d) * g / ||g||                    sqrt(d) * ||g||              vector
============  ==========================================  ===========================  ======

(m, n) = (d_out, d_in) = the last two dims. ``s`` is the spectral ``scale`` option:
``"none"`` -> 1, ``"scion"`` -> sqrt(m / n) (Scion's RMS->RMS ball), ``"muon"`` ->
sqrt(max(1, m / n)). The dual norms follow from the LMOs through the identity
``<G, lmo(G)> = -r * dual_norm(G)``; ``primal_norm(lmo(G)) = r`` for nonzero G.

Units (what one ball is; every leading dim is a batch of independent balls):
  * ``matrix`` (spectral, colnorm, rownorm): the last two dims; needs >= 2-D input.
  * ``entries`` (sign, l2, l1): the last two dims, or the whole vector of a 1-D input.
  * ``vector`` (bias_rms): the last dim, so (..., d) is a batch of vectors.

A zero unit gives a zero direction (never 0/0 = NaN). A unit holding NaN gives NaN in
that unit's output; inf gives NaN too for the normalizing norms (inf/inf), a finite
direction for sign and l1. Other units are untouched, nothing raises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .backend import resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPECTRAL_SCALES = ("none", "scion", "muon")
# Spectral options and defaults (Newton–Schulz settings go to ops.orthogonalize).
# compute_dtype None is the device default: bf16 on CUDA, fp32 on CPU (see
# reference.default_compute_dtype); torch.bfloat16 on CPU is torch.optim.Muon's math.
SPECTRAL_OPTIONS = {"scale": "none", "steps": 5, "coefficients": "polar_express", "eps": 1e-7, "compute_dtype": None}


@dataclass(frozen=True)
class Norm:
    """One catalogue entry.

    Attributes:
        name: the key in ``NORMS``.
        unit: ``"matrix"``, ``"entries"`` or ``"vector"`` (see the module doc).
        mode: how the fused kernels compute it: ``"sign"`` (no reduction), ``"unit"``
            (Frobenius norm per unit), ``"rows"`` / ``"cols"`` (norm per row / column
            of each unit), or ``"direction"`` (the direction is computed whole:
            Newton–Schulz for spectral, an argmax for l1).
        factor: ``factor(rows, cols, scale)`` multiplies the radius for a unit of that
            shape (a vector unit has rows = 1, cols = d).
        options: keyword options the norm accepts, with defaults.
    """

    name: str
    unit: str
    mode: str
    factor: Callable[[int, int, str], float]
    options: dict = field(compare=False)  # left out of eq/hash, so a Norm can key a cache

    @property
    def min_dim(self) -> int:
        return 2 if self.unit == "matrix" else 1

    def unit_shape(self, shape: torch.Size) -> tuple[int, int]:
        """(rows, cols) of one unit of a tensor of ``shape``."""
        if self.unit == "vector" or len(shape) == 1:
            return 1, shape[-1]
        return shape[-2], shape[-1]


def _one(rows: int, cols: int, scale: str) -> float:
    return 1.0


NORMS: dict[str, Norm] = {
    n.name: n
    for n in (
        Norm("spectral", "matrix", "direction", reference.spectral_factor, SPECTRAL_OPTIONS),
        Norm("sign", "entries", "sign", _one, {}),
        Norm("l2", "entries", "unit", _one, {}),
        Norm("l1", "entries", "direction", _one, {}),
        Norm("colnorm", "matrix", "cols", lambda rows, cols, scale: math.sqrt(rows), {}),
        Norm("rownorm", "matrix", "rows", lambda rows, cols, scale: 1.0 / math.sqrt(cols), {}),
        Norm("bias_rms", "vector", "rows", lambda rows, cols, scale: math.sqrt(cols), {}),
    )
}
KNOWN = tuple(NORMS)


def get(norm: str) -> Norm:
    """The catalogue entry for ``norm``; ValueError listing the known names otherwise."""
    if not isinstance(norm, str):
        raise TypeError(f"norm must be a str, one of {KNOWN}, got {type(norm).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {KNOWN}, got {norm!r}")
    return NORMS[norm]


def check_tensor(name: str, G: object, spec: Norm) -> None:
    """Raise TypeError/ValueError naming ``name`` unless G is a float tensor the norm accepts."""
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({_FLOAT_DTYPES}), got {G.dtype}")
    if G.dim() < spec.min_dim:
        what = "(m, n) or (..., m, n)" if spec.min_dim == 2 else "(d,), (m, n) or (..., m, n)"
        raise ValueError(f"{name} must have shape {what} for norm {spec.name!r}, got {tuple(G.shape)}")


def check_radius(radius: object) -> float:
    """``radius`` as a float; ValueError unless it is a finite number >= 0."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    return float(radius)


def resolve_options(spec: Norm, options: dict) -> dict:
    """The norm's options with defaults filled in; TypeError/ValueError naming a bad one."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        allowed = tuple(spec.options) or "none"
        raise TypeError(f"norm {spec.name!r} got unexpected option(s) {unknown}; it accepts: {allowed}")
    resolved = {**spec.options, **options}
    if "scale" in resolved and resolved["scale"] not in SPECTRAL_SCALES:
        raise ValueError(f"scale must be one of {SPECTRAL_SCALES}, got {resolved['scale']!r}")
    if resolved.get("compute_dtype") not in (None, *_FLOAT_DTYPES):
        raise TypeError(f"compute_dtype must be None or one of {_FLOAT_DTYPES}, got {resolved['compute_dtype']!r}")
    return resolved


def lmo(
    G: torch.Tensor,
    norm: str,
    radius: float = 1.0,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = "auto",
    **options,
) -> torch.Tensor:
    """Linear minimization oracle ``argmin_{||Z|| <= radius} <G, Z>`` per unit.

    Args:
        G: (d,), (m, n) or (..., m, n) (see the module doc for units); fp32, fp16, bf16
            or fp64, any strides.
        norm: a name in ``KNOWN``.
        radius: ball radius, finite and >= 0.
        out: optional tensor of G's shape, dtype and device to write into.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; ``$RINGMASTER_BACKEND`` applies
            when this is ``"auto"``. Spectral runs ``ops.orthogonalize`` with it; l1 is
            an argmax and one scatter, done in torch on every backend.
        **options: spectral only: ``scale`` ("none" | "scion" | "muon"), ``steps``,
            ``coefficients``, ``eps`` and ``compute_dtype`` (the Newton–Schulz iteration
            dtype; None: bf16 on CUDA, fp32 on CPU), all passed to ``ops.orthogonalize``.

    Returns:
        A tensor of G's shape and dtype (``out`` if given). The kernels compute in fp32
        (as does the twin, which uses fp64 for fp64 input), except spectral's
        Newton–Schulz, which iterates in ``compute_dtype``.
    """
    from .ops import _check_out, orthogonalize

    spec = get(norm)
    check_tensor("G", G, spec)
    _check_out(out, G)
    radius = check_radius(radius)
    opts = resolve_options(spec, options)
    if norm == "spectral":
        s = spec.factor(G.size(-2), G.size(-1), opts["scale"])
        return orthogonalize(
            G, opts["steps"], opts["coefficients"], opts["eps"], out,
            compute_dtype=opts["compute_dtype"], scale=-radius * s, backend=backend,
        )
    if resolve_backend(backend, G) == "triton" and spec.mode != "direction":
        from .kernels import lmo as lmo_kernels

        result = lmo_kernels.lmo(G, spec, radius, out if out is not None and out.is_contiguous() else None)
    else:
        result = reference.lmo(G, norm, radius, **opts)
    if out is None or result is out:
        return result
    return out.copy_(result)


def dual_norm(G: torch.Tensor, norm: str, **options) -> torch.Tensor:
    """Dual norm of G per unit: ``-<G, lmo(G, norm, r)> / r``.

    Args:
        G: as for ``lmo``.
        norm: a name in ``KNOWN``.
        **options: as for ``lmo``; only spectral ``scale`` changes the value (the
            nuclear norm is computed exactly, by SVD, not by Newton–Schulz).

    Returns:
        fp32 (fp64 for fp64 G) tensor of shape G.shape[:-2] for matrix units (or a 1-D
        ``entries`` input: shape ()), G.shape[:-1] for ``bias_rms``.
    """
    spec = get(norm)
    check_tensor("G", G, spec)
    opts = resolve_options(spec, options)
    return reference.dual_norm(G, norm, scale=opts.get("scale", "none"))


def primal_norm(G: torch.Tensor, norm: str, **options) -> torch.Tensor:
    """The norm itself per unit (the ball is ``primal_norm(Z) <= radius``); shapes as ``dual_norm``."""
    spec = get(norm)
    check_tensor("G", G, spec)
    opts = resolve_options(spec, options)
    return reference.primal_norm(G, norm, scale=opts.get("scale", "none"))
