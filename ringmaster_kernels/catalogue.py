"""The norm-ball catalogue as data: names, units, options and argument checks, no math.

It sits below ``ops.py`` so that ``ops.lmo_step_`` and ``norms`` both read it without
importing each other upward; ``norms`` re-exports every name (see its doc for the math).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .reference import spectral_factor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SPECTRAL_SCALES = ("none", "scion", "muon")
# Spectral options and defaults (Newton–Schulz settings go to ops.orthogonalize).
# compute_dtype None is the device default: bf16 on CUDA, fp32 on CPU (see
# reference.default_compute_dtype); torch.bfloat16 on CPU is torch.optim.Muon's math.
# ns_update: what runs the non-final Newton–Schulz updates on the kernel path ("triton":
# the fused update kernel; "cublas": torch.baddbmm); the twin has one path.
SPECTRAL_OPTIONS = {"scale": "none", "steps": 5, "coefficients": "polar_express", "eps": 1e-7, "compute_dtype": None,
                    "ns_update": "triton"}
NS_UPDATES = ("triton", "cublas")


@dataclass(frozen=True)
class Norm:
    """One catalogue entry.

    Attributes:
        name: the key in ``NORMS``.
        unit: ``"matrix"``, ``"entries"`` or ``"vector"`` (see ``norms``).
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
        Norm("spectral", "matrix", "direction", spectral_factor, SPECTRAL_OPTIONS),
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


def check_float_tensor(name: str, G: object, min_dim: int = 2, context: str = "") -> None:
    """Raise TypeError/ValueError naming ``name`` unless G is a float tensor with >= min_dim (1 or 2) dims.

    ``context`` ends the shape message (e.g. which norm wants that shape).
    """
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(G).__name__}")
    if G.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor ({FLOAT_DTYPES}), got {G.dtype}")
    if G.dim() < min_dim:
        what = "(m, n) or (..., m, n)" if min_dim == 2 else "(d,), (m, n) or (..., m, n)"
        raise ValueError(f"{name} must have shape {what}{context}, got {tuple(G.shape)}")


def check_tensor(name: str, G: object, spec: Norm) -> None:
    """Raise TypeError/ValueError naming ``name`` unless G is a float tensor the norm accepts."""
    check_float_tensor(name, G, spec.min_dim, f" for norm {spec.name!r}")


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
    if resolved.get("compute_dtype") not in (None, *FLOAT_DTYPES):
        raise TypeError(f"compute_dtype must be None or one of {FLOAT_DTYPES}, got {resolved['compute_dtype']!r}")
    if "ns_update" in resolved:
        check_ns_update(resolved["ns_update"])
    return resolved


def check_ns_update(ns_update: object, name: str = "ns_update") -> str:
    """``ns_update`` itself; ValueError naming ``name`` unless it is one of ``NS_UPDATES``."""
    if not isinstance(ns_update, str) or ns_update not in NS_UPDATES:
        raise ValueError(f"{name} must be one of {NS_UPDATES}, got {ns_update!r}")
    return ns_update
