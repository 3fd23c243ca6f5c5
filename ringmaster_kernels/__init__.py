"""ringmaster-kernels: fused kernels and an async runtime for LMO-momentum training.

Public names load lazily so that light entry points (``ringmaster bench queue``) do
not import Triton or the optimizers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "orthogonalize": "ops",
    "lmo_step_": "ops",
    "norms": None,
    "GradientQueue": "queue",
    "Gluon": "optim",
    "GluonAdamW": "optim",
    "muon_groups": "optim",
    "scion_groups": "optim",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ringmaster_kernels' has no attribute {name!r}")
    module = _EXPORTS[name]
    if module is None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
