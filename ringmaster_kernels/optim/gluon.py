"""Gluon: the layer-wise LMO-momentum optimizer in ``torch.optim`` form.

Each parameter group names a norm from :mod:`ringmaster_kernels.norms` and a radius;
one step per parameter ``x`` with gradient ``g`` is (../shared/ALGORITHMS.md)::

    m <- beta * m + (1 - beta) * g                       # EMA momentum
    u <- beta * m + (1 - beta) * g   (nesterov)  or  m
    x <- (1 - lr * weight_decay) * x + lr * t * lmo(u)   # lmo(u) = argmin_{||z|| <= radius} <u, z>

with ``t = 1`` (plain lr) or, when the group gives layer-wise ``(L0, L1)``, Gluon's
step-size rule ``t = ||g||_* / (L0 + L1 ||g||_*)``. Muon is ``norm="spectral"`` with
``norm_options={"scale": "muon"}`` (radius ``max(1, rows/cols) ** 0.5``); Scion's hidden
layers are ``{"scale": "scion"}`` and its constrained step is ``weight_decay=1``.

Inside a group, parameters are bucketed by (matrix shape, dtype, device); every bucket
goes through one batched LMO call (one batched Newton–Schulz for spectral norms) and
multi-tensor (``torch._foreach_*``) momentum and update, not a Python loop per parameter.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import norms

NONFINITE_POLICIES = ("skip", "raise", "ignore")

# Group keys that feed a norm option when the catalogue entry declares it.
_NS_KEYS = {"ns_steps": "steps", "ns_coefficients": "coefficients"}


def _label(group: dict[str, Any], gi: int, pi: int, p: torch.Tensor) -> str:
    """How errors name a parameter: its name when the optimizer was given names."""
    names = group.get("param_names")
    where = repr(names[pi]) if names else f"param_groups[{gi}]['params'][{pi}]"
    return f"{where} (shape {tuple(p.shape)})"


def matrix_shape(shape: torch.Size | Sequence[int]) -> tuple[int, int]:
    """The (rows, cols) view a norm sees: vectors are 1 x d, conv kernels (out, in*k*k)."""
    shape = tuple(shape)
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


class NonFiniteGuard:
    """Mixin: detect a non-finite gradient before a step and skip (counting) or raise.

    ``skipped_steps`` travels in ``state_dict()`` so a resumed run keeps its count.
    Checking costs one host synchronization per step; ``nonfinite="ignore"`` avoids it
    and lets NaN/inf reach the parameters.
    """

    skipped_steps: int
    nonfinite: str

    def _init_guard(self, nonfinite: str) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0

    def _grads_ok(self, grads: list[torch.Tensor]) -> bool:
        """True when the step may go ahead; False when it must be skipped (and counted)."""
        if self.nonfinite == "ignore" or not grads:
            return True
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        # max|g| is NaN or inf exactly when some entry is, and cannot overflow the way a
        # 2-norm of large finite fp16 values would.
        finite = all(
            bool(torch.isfinite(torch.stack(torch._foreach_norm(gs, math.inf))).all())
            for gs in by_device.values()
        )
        if finite:
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}.step: a gradient holds NaN or inf "
                "(pass nonfinite='skip' to skip such steps instead)"
            )
        self.skipped_steps += 1
        return False

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        out = super().state_dict()  # type: ignore[misc]
        out["skipped_steps"] = self.skipped_steps
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self.skipped_steps = int(skipped)


def _collect_grads(param_groups: Iterable[dict[str, Any]], owner: str) -> list[torch.Tensor]:
    """Every present gradient, in group order; rejects sparse gradients by name."""
    grads = []
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(
                    f"{owner} does not support sparse gradients; {_label(group, gi, pi, p)} has one "
                    "(use a dense embedding, or a sparse-aware optimizer for that parameter)"
                )
            grads.append(p.grad)
    return grads


def norm_options(group: dict[str, Any]) -> dict[str, Any]:
    """The options ``norms.lmo`` gets for a group: ``norm_options`` plus the Newton–Schulz
    settings, the latter only for norms whose catalogue entry takes them."""
    accepted = norms.get(group["norm"]).options
    opts = {opt: group[key] for key, opt in _NS_KEYS.items() if opt in accepted}
    opts.update(group["norm_options"] or {})
    return opts


def lmo_bucket_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momenta: list[torch.Tensor],
    *,
    norm: str,
    lr: float,
    beta: float,
    nesterov: bool,
    weight_decay: float,
    radius: float,
    L0: float | None = None,
    L1: float | None = None,
    backend: str | None = "auto",
    **options: Any,
) -> None:
    """One momentum -> LMO -> update step on same-shape, same-dtype tensors, in place.

    ``params``/``grads``/``momenta`` are lists of k tensors whose :func:`matrix_shape`
    is the same (m, n); the LMO runs once on the stacked (k, m, n) direction.
    ``options`` go to ``norms.lmo``/``norms.dual_norm``.
    """
    shape = matrix_shape(params[0].shape)
    torch._foreach_lerp_(momenta, grads, 1.0 - beta)
    directions = torch._foreach_lerp(grads, momenta, beta) if nesterov else momenta
    U = torch.stack([d.reshape(shape) for d in directions])
    D = norms.lmo(U, norm, radius, backend=backend, **options)
    if L0 is not None:
        dual = norms.dual_norm(torch.stack([g.reshape(shape) for g in grads]), norm, **options)
        D = D * (dual / (L0 + L1 * dual)).to(D.dtype).view(-1, 1, 1)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, [d.view(p.shape) for d, p in zip(D.unbind(0), params)], alpha=lr)


class Gluon(NonFiniteGuard, torch.optim.Optimizer):
    """Layer-wise LMO optimizer: momentum -> LMO over each group's norm ball -> update.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts; a group may override
            any of the options below.
        lr: step size (>= 0). With ``L0``/``L1`` it multiplies Gluon's ``t`` (use 1.0 for
            the paper's rule; schedulers then scale it).
        momentum: EMA factor beta in [0, 1); 0 means the LMO of the raw gradient.
        nesterov: step with ``beta m + (1 - beta) g`` instead of ``m``.
        norm: a name from ``norms`` (e.g. "spectral", "sign", "l2", "colnorm",
            "rownorm", "l1", "bias_rms").
        radius: radius rho (> 0) of the norm ball.
        weight_decay: decoupled decay: ``x <- (1 - lr * weight_decay) x`` before the
            update (1.0 gives Scion's constrained step).
        ns_steps, ns_coefficients: Newton–Schulz settings, for norms that take them.
        norm_options: other options of the norm, e.g. ``{"scale": "muon"}`` for
            spectral (see ``norms``).
        L0, L1: give both (>= 0, not both 0) to use ``t = ||g||_* / (L0 + L1 ||g||_*)``.
        nonfinite: "skip" (default: skip the whole step, count it in
            ``skipped_steps``), "raise" (``FloatingPointError``) or "ignore" (no check).
        backend: "auto" | "triton" | "torch", passed to the norms.

    Parameters are updated in their own dtype; the momentum buffer has the parameter's
    dtype (as ``torch.optim.Muon``), so ``state_dict`` round-trips bitwise. Tensors of
    3 or more dimensions are seen as (shape[0], rest) matrices.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        norm: str = "spectral",
        radius: float = 1.0,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: Any = "polar_express",
        L0: float | None = None,
        L1: float | None = None,
        norm_options: dict[str, Any] | None = None,
        *,
        nonfinite: str = "skip",
        backend: str | None = "auto",
    ) -> None:
        self._init_guard(nonfinite)
        self.backend = backend
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, norm=norm, radius=radius,
            weight_decay=weight_decay, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
            L0=L0, L1=L1, norm_options=norm_options,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim semantics), checking its options and tensors first."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        try:
            _check_group(self.param_groups[gi], gi)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step over every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._grads_ok(_collect_grads(self.param_groups, type(self).__name__)):
            for gi, group in enumerate(self.param_groups):
                self._group_step(group, gi)
        return loss

    def _group_step(self, group: dict[str, Any], gi: int) -> None:
        _check_hyper(group, f"param_groups[{gi}]")
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                buckets[(matrix_shape(p.shape), p.dtype, p.device)].append(p)
        for params in buckets.values():
            momenta = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                momenta.append(state["momentum_buffer"])
            lmo_bucket_step_(
                params, [p.grad for p in params], momenta,
                norm=group["norm"], lr=float(group["lr"]), beta=group["momentum"],
                nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                radius=group["radius"], L0=group["L0"], L1=group["L1"],
                backend=self.backend, **norm_options(group),
            )


def _check_hyper(group: dict[str, Any], where: str) -> None:
    """Options a scheduler or user may rewrite between steps; cheap, so checked each step."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}: lr must be a number or a 1-element tensor, got shape {tuple(lr.shape)}")
        lr = float(lr)
    if not (isinstance(lr, (int, float)) and 0.0 <= lr < math.inf):
        raise ValueError(f"{where}: lr must be a finite number >= 0, got {group['lr']!r}")
    beta = group["momentum"]
    if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
        raise ValueError(f"{where}: momentum must be in [0, 1), got {beta!r}")
    wd = group["weight_decay"]
    if not (isinstance(wd, (int, float)) and 0.0 <= wd < math.inf):
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {wd!r}")
    try:
        norms.check_radius(group["radius"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not isinstance(group["nesterov"], bool):
        raise TypeError(f"{where}: nesterov must be a bool, got {type(group['nesterov']).__name__}")
    L0, L1 = group["L0"], group["L1"]
    if (L0 is None) != (L1 is None):
        raise ValueError(f"{where}: give both L0 and L1 for Gluon's step-size rule, or neither")
    if L0 is not None:
        for name, v in (("L0", L0), ("L1", L1)):
            if not (isinstance(v, (int, float)) and 0.0 <= v < math.inf):
                raise ValueError(f"{where}: {name} must be a finite number >= 0, got {v!r}")
        if L0 == 0 and L1 == 0:
            raise ValueError(f"{where}: L0 and L1 cannot both be 0")


def _check_group(group: dict[str, Any], gi: int) -> None:
    where = f"param_groups[{gi}]"
    _check_hyper(group, where)
    try:
        spec = norms.get(group["norm"])
        if group["norm_options"] is not None and not isinstance(group["norm_options"], dict):
            raise TypeError(f"norm_options must be a dict or None, got {type(group['norm_options']).__name__}")
        norms.resolve_options(spec, norm_options(group))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    for pi, p in enumerate(group["params"]):
        if not p.is_floating_point():
            raise TypeError(f"Gluon needs real floating-point parameters; {_label(group, gi, pi, p)} is {p.dtype}")
