"""Step-size rules: a per-layer factor ``t`` of the LMO step ``x <- x + lr * t * lmo(u)``.

Chosen per parameter group by name (``step_rule``) with its options (``step_options``),
shared by :class:`~ringmaster_kernels.optim.gluon.Gluon` and the async update rule
:class:`~ringmaster_kernels.optim.update_rules.LMOMomentum`, so a policy steps exactly as
the synchronous optimizer does on the same gradients. ``k`` counts the layer's earlier
updates (the model version, in the async rule). Per layer, with ``||.||_*`` the dual norm
of the group's norm summed over its units (the dual of the product ball) and ``||.||`` the
primal norm's maximum over units (../shared/ALGORITHMS.md, "Neighbouring methods")::

    constant           t = 1
    l0l1               t = ||g||_* / (L0 + L1 ||g||_*)                        Gluon [text]
    theorem2           t = (k + 1)^(-3/4), beta_k = 1 - (k + 1)^(-1/2)        Gluon's stochastic theorem [text]
    distance_adaptive  t = rbar_k / sqrt(k + 1),
                       rbar_k = max(r_eps, max_{s <= k} ||x_s - x_0||)         Distance-Aware Muon [inferred]
    scale_calibrated   t = max(0, -<g, lmo(u)>) / L                          Distance-Aware Muon [inferred]

``distance_free`` (Distance-Aware Muon's recentred trust region) is not here: the sources
give no formula (ALGORITHMS.md says so), and a guess would not be that method.

:class:`SmoothnessFit` is the Gluon authors' online fit of ``(L0, L1)`` per layer, for a
run to log (and to seed ``l0l1``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .. import norms


@dataclass(frozen=True)
class StepRule:
    """A named rule: its options (name -> default, ``None``: required) and what it reads.

    ``needs_direction``: the factor needs ``lmo(u)`` before the step (scale_calibrated),
    so the step cannot run inside the fused momentum pass. ``stateful``: the rule reads
    the layer's update count ``k`` (kept per layer by the caller; distance_adaptive also
    keeps x_0 and its running maximum).
    """

    name: str
    options: Mapping[str, float | None] = field(default_factory=dict)
    needs_direction: bool = False
    stateful: bool = False
    inferred: bool = False


RULES: dict[str, StepRule] = {
    "constant": StepRule("constant"),
    "l0l1": StepRule("l0l1", {"L0": None, "L1": None}),
    "theorem2": StepRule("theorem2", stateful=True),
    "distance_adaptive": StepRule("distance_adaptive", {"r_eps": 1e-3}, stateful=True, inferred=True),
    "scale_calibrated": StepRule("scale_calibrated", {"L": None}, needs_direction=True, inferred=True),
}
KNOWN = tuple(RULES)


def get(name: object, where: str = "step_rule") -> StepRule:
    """The rule called ``name``; ValueError listing the known names otherwise."""
    if name == "distance_free":
        raise ValueError(f"{where}: 'distance_free' has no formula in the sources, so it is not implemented; known: {KNOWN}")
    if not isinstance(name, str) or name not in RULES:
        raise ValueError(f"{where} must be one of {KNOWN}, got {name!r}")
    return RULES[name]


def check_options(rule: StepRule, options: Mapping[str, Any] | None, where: str = "step_options") -> dict[str, float]:
    """The rule's options with defaults filled in; ValueError naming a missing, unknown or bad one."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(rule.options))
    if unknown:
        raise ValueError(f"{where}: step_rule {rule.name!r} does not take {unknown}; it takes {sorted(rule.options)}")
    out = {}
    for key, default in rule.options.items():
        value = options.get(key, default)
        if value is None:
            raise ValueError(f"{where}: step_rule {rule.name!r} needs {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}[{key!r}] must be a finite number >= 0, got {value!r}")
        out[key] = float(value)
    if rule.name == "l0l1" and out["L0"] == 0 and out["L1"] == 0:
        raise ValueError(f"{where}: L0 and L1 cannot both be 0")
    if rule.name == "scale_calibrated" and out["L"] == 0:
        raise ValueError(f"{where}['L'] must be > 0")
    if rule.name == "distance_adaptive" and out["r_eps"] == 0:
        raise ValueError(f"{where}['r_eps'] must be > 0 (the first step would be 0)")
    return out


def momentum(rule: StepRule, k: int, beta: float) -> float:
    """This update's momentum: theorem2's ``1 - (k + 1)^(-1/2)``, else the group's ``beta``."""
    return 1.0 - (k + 1) ** -0.5 if rule.name == "theorem2" else beta


def layer_dual(g: torch.Tensor, norm: str, options: Mapping[str, Any]) -> torch.Tensor:
    """``||g||_*`` of one layer (a matrix view): the sum of its units' dual norms."""
    return norms.dual_norm(g, norm, **options).sum()


def layer_norm(x: torch.Tensor, norm: str, options: Mapping[str, Any]) -> torch.Tensor:
    """``||x||`` of one layer: the largest of its units' norms (the product ball's norm)."""
    return norms.primal_norm(x, norm, **options).max()


def factor(
    rule: StepRule,
    options: Mapping[str, float],
    *,
    k: int,
    x: torch.Tensor,
    g: torch.Tensor,
    norm: str,
    norm_options: Mapping[str, Any],
    state: dict[str, Any],
    direction: torch.Tensor | None = None,
) -> float:
    """The layer's ``t`` for this update (one host read); see the module docstring.

    Args:
        x: the layer's parameters before the step, as a matrix the norm accepts.
        g: its gradient (x's shape). direction: ``lmo(u)`` (x's shape), for
            ``needs_direction`` rules.
        state: the layer's rule state (a dict kept by the caller, updated here).
    """
    name = rule.name
    if name == "constant":
        return 1.0
    if name == "theorem2":
        return (k + 1) ** -0.75
    if name == "l0l1":
        dual = float(layer_dual(g, norm, norm_options))
        denominator = options["L0"] + options["L1"] * dual
        return dual / denominator if denominator > 0 else 0.0  # L0 = 0, g = 0: no step
    if name == "scale_calibrated":
        certificate = -float(torch.sum(g.to(direction.dtype) * direction))
        return max(0.0, certificate) / options["L"]
    # distance_adaptive: x_0 is the layer at its first update
    if "initial_param" not in state:
        state["initial_param"] = x.detach().clone()
        state["max_distance"] = 0.0
    distance = float(layer_norm(x - state["initial_param"], norm, norm_options))
    state["max_distance"] = max(state["max_distance"], distance)
    return max(options["r_eps"], state["max_distance"]) / math.sqrt(k + 1)


class SmoothnessFit:
    """Online fit of Gluon's layer-wise ``(L0, L1)`` (the Gluon authors' estimator).

    Each :meth:`observe` of a layer's ``(x_{k+1}, g_{k+1})`` after ``(x_k, g_k)`` adds the
    sample ``L[k] = ||g_{k+1} - g_k||_* / ||x_{k+1} - x_k||`` at ``s = ||g_k||_*`` (the
    condition bounds the change from x_k with the gradient there); :meth:`fit` is the
    least-squares line ``L = L0 + L1 s`` over the samples so far, clipped to
    ``L0, L1 >= 0`` (with a clipped slope the intercept is refitted: the mean of L).
    Stochastic gradients on different batches add noise to L, as in the authors' fit.
    State: two copies per layer (the last x and g) and five running sums.

    Args:
        norms_of: ``{layer name: (norm, norm options)}``.
    """

    def __init__(self, norms_of: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
        self.norms_of = dict(norms_of)
        self._last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._sums: dict[str, list[float]] = {name: [0.0] * 5 for name in self.norms_of}  # n, s, L, s^2, sL

    @classmethod
    def for_optimizer(cls, optimizer: torch.optim.Optimizer) -> "SmoothnessFit":
        """One layer per parameter of a Gluon-style optimizer (groups with ``norm``),
        named ``"<group>.<index>"``; :meth:`observe_optimizer` reads them."""
        from .gluon import norm_options  # gluon imports this module

        layers = {}
        for gi, group in enumerate(optimizer.param_groups):
            for pi, _ in enumerate(group["params"]):
                layers[f"{gi}.{pi}"] = (group["norm"], norm_options(group))
        return cls(layers)

    @torch.no_grad()
    def observe(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """Record layer ``name``'s parameters and gradient (matrix views) at one iterate."""
        if name not in self.norms_of:
            raise ValueError(f"layer must be one of {sorted(self.norms_of)}, got {name!r}")
        norm, opts = self.norms_of[name]
        x, g = x.detach().double(), g.detach().double()
        last = self._last.get(name)
        self._last[name] = (x.clone(), g.clone())
        if last is None:
            return
        dx = float(layer_norm(x - last[0], norm, opts))
        if dx == 0:
            return  # no move, no sample
        L = float(layer_dual(g - last[1], norm, opts)) / dx
        s = float(layer_dual(last[1], norm, opts))
        for i, v in enumerate((1.0, s, L, s * s, s * L)):
            self._sums[name][i] += v

    def observe_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """:meth:`observe` every parameter with a gradient (call after backward, before step)."""
        from .gluon import matrix_shape

        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    shape = matrix_shape(p.shape)
                    self.observe(f"{gi}.{pi}", p.reshape(shape), p.grad.reshape(shape))

    def fit(self) -> dict[str, tuple[float, float, int]]:
        """``{layer: (L0, L1, samples)}``; layers with no sample yet are left out."""
        out = {}
        for name, (n, s, L, ss, sL) in self._sums.items():
            if n == 0:
                continue
            var = ss / n - (s / n) ** 2
            slope = (sL / n - (s / n) * (L / n)) / var if var > 1e-12 * max(1.0, ss / n) else 0.0
            slope = max(0.0, slope)
            intercept = L / n - slope * s / n
            if intercept < 0:  # L0 >= 0: refit the slope through the origin
                intercept, slope = 0.0, (sL / ss if ss > 0 else 0.0)
            out[name] = (intercept, slope, int(n))
        return out


def direction_step_(x: torch.Tensor, u: torch.Tensor, lr: float, factor_args: dict[str, Any],
                    common: dict[str, Any]) -> None:
    """``x <- (1 - lr wd) x + lr t lmo(u)`` for one tensor (a matrix view) and a rule that
    reads ``lmo(u)`` (``needs_direction``): the direction is computed once, gives
    ``t = factor(**factor_args, direction=...)``, and the step is applied from it in fp32,
    rounded once into x. ``common``: the norm, radius, weight_decay, backend and norm options."""
    opts = {k: v for k, v in common.items() if k not in ("norm", "radius", "weight_decay")}
    direction = norms.lmo(u, common["norm"], common["radius"], **opts)
    t = factor(**factor_args, direction=direction)
    x.copy_(torch.add(x.float() * (1.0 - lr * common["weight_decay"]), direction.float(), alpha=lr * t))
