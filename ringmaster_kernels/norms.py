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

import torch

from . import ops, reference
from .backend import resolve_backend
from .catalogue import (
    KNOWN,
    NORMS,
    NS_UPDATES,
    SPECTRAL_OPTIONS,
    SPECTRAL_SCALES,
    Norm,
    check_ns_update,
    check_radius,
    check_tensor,
    get,
    resolve_options,
)

# The catalogue's names are re-exported: norms is its public face.
__all__ = [
    "KNOWN", "NORMS", "NS_UPDATES", "SPECTRAL_OPTIONS", "SPECTRAL_SCALES", "Norm", "check_ns_update", "check_radius", "check_tensor", "get",
    "resolve_options", "lmo", "dual_norm", "primal_norm",
]


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
            ``coefficients``, ``eps``, ``compute_dtype`` (the Newton–Schulz iteration
            dtype; None: bf16 on CUDA, fp32 on CPU) and ``ns_update`` ("triton" |
            "cublas"), all passed to ``ops.orthogonalize``.

    Returns:
        A tensor of G's shape and dtype (``out`` if given). The kernels compute in fp32
        (as does the twin, which uses fp64 for fp64 input), except spectral's
        Newton–Schulz, which iterates in ``compute_dtype``.
    """
    spec = get(norm)
    check_tensor("G", G, spec)
    ops._check_out(out, G)
    radius = check_radius(radius)
    opts = resolve_options(spec, options)
    if norm == "spectral":
        s = spec.factor(G.size(-2), G.size(-1), opts["scale"])
        return ops.orthogonalize(
            G, opts["steps"], opts["coefficients"], opts["eps"], out,
            compute_dtype=opts["compute_dtype"], scale=-radius * s, ns_update=opts["ns_update"], backend=backend,
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
