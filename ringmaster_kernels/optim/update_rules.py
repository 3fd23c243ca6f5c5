"""Update rules: how an accepted (or averaged) gradient changes the parameters.

An async method (a *policy*, :mod:`ringmaster_kernels.optim.policies`) decides which
gradients count and when the model version advances; an update rule applies them. The
policy hands the rule this update's step factors, so the delay rule stays apart from the
update math:

* ``lr_factor`` multiplies every group's learning rate for this update only
  (delay-adaptive's ``n / max(n, delta)``, the parameter-agnostic ``eta_k / eta``);
* ``momentum`` replaces the momentum ``beta`` for this update only (the
  parameter-agnostic ``beta_k = 1 - alpha_k``); ``None`` keeps the rule's own.

Two rules:

* :class:`LMOMomentum`: the built-in LMO-momentum math per norm group (float64-exact;
  what the simulator's paper experiments use);
* :class:`OptimizerRule`: any ``torch.optim.Optimizer`` over the parameters (Gluon,
  GluonAdamW, NanoChat's recipe through ``RingmasterMuonAdamW``), with an optional
  per-version ``schedule(version, optimizer)`` hook that rewrites group values (lr,
  momentum, weight decay) the way a synchronous trainer does every step.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import torch

from .. import norms, ops
from . import estimators, step_rules
from .checks import check_lr, check_number

_GROUP_KEYS = ("params", "norm", "radius", "lr", "lmo_options", "momentum_estimator", "mvr_q", "step_rule",
               "step_options")
Schedule = Callable[[int, torch.optim.Optimizer], None]


@runtime_checkable
class UpdateRule(Protocol):
    """What a policy needs from an update rule.

    ``params`` lists the tensors updated in place, in the order ``apply`` takes gradients.
    """

    params: list[torch.Tensor]

    def apply(self, grads: Sequence[torch.Tensor], version: int, lr_factor: float = 1.0,
              momentum: float | None = None) -> None: ...
    def hyperparameters(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_grads(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    if len(grads) != len(params):
        raise ValueError(f"grad must hold one tensor per parameter ({len(params)}), got {len(grads)}")
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.shape != p.shape:
            raise ValueError(f"grad {i} has shape {tuple(g.shape)}, parameter has {tuple(p.shape)}")


def _check_lmo_options(group: dict, where: str) -> None:
    """The options must suit the group's norm (and Newton–Schulz's settings be valid),
    checked when the rule is built rather than at the first gradient."""
    options = group["lmo_options"]
    if group["norm"] is None:
        if options:
            raise ValueError(f"{where}: norm None (the raw step) takes no options, got {sorted(options)}")
        return
    try:
        spec = norms.get(group["norm"])
        resolved = norms.resolve_options(spec, options)
        if "steps" in spec.options:
            ops.check_newton_schulz(resolved["steps"], resolved["coefficients"], resolved["eps"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None


class LMOMomentum:
    """The built-in rule: ``m <- beta m + (1 - beta) g``, ``x <- x + lr * t * lmo(u)`` per group.

    A group may name its momentum estimator and step-size rule (keys
    ``momentum_estimator``, ``mvr_q``, ``step_rule``, ``step_options``, as in
    :class:`~ringmaster_kernels.optim.gluon.Gluon`; ``t = 1`` for "constant"), so an async
    policy steps as Gluon does. ``k`` of the step rules is the update's ``version``.
    MVR and HCM groups need an extra input per parameter: a gradient is then the list of
    ``2 n`` tensors ``[g_1..g_n, e_1..e_n]`` (``e`` = the gradient at the job's version
    minus one on the same minibatch, or the Hessian-vector product; see :attr:`job`), and
    the rule keeps one copy of the parameters before each update (:attr:`previous`), which
    a driver hands to jobs as their previous iterate. One rule serves one kind of extra.

    Args:
        params: tensors, or groups (dicts with ``params`` and any of ``norm``, ``radius``,
            ``lr``, ``lmo_options`` and the keys above); updated in place.
        lr: default step size for groups that do not set ``lr``.
        norm: default norm name from :mod:`ringmaster_kernels.norms`, or ``None`` for the
            raw step ``x <- x - lr * u`` (Euclidean SGD).
        radius: default norm-ball radius ``rho``.
        momentum: ``beta`` (``alpha = 1 - beta`` in the paper); 0 disables momentum.
        nesterov: ``u = beta m + (1 - beta) g`` (Muon) instead of ``u = m``.
        backend: passed to the ops (``"auto"`` | ``"triton"`` | ``"torch"``).
        fused: one :func:`ops.lmo_step_` per normed group (fused kernels on CUDA; fp32
            momentum) instead of momentum, ``norms.lmo`` and ``add_`` per tensor in the
            parameters' dtype (float64-exact; on CPU also the cheaper path).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float,
        norm: str | None = "spectral",
        radius: float = 1.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        backend: str | None = "auto",
        fused: bool = False,
        momentum_estimator: str | None = None,
        mvr_q: float = 0.1,
        step_rule: str = "constant",
        step_options: dict[str, float] | None = None,
    ) -> None:
        self.lr = check_lr("LMOMomentum", lr)
        self.momentum = check_number("LMOMomentum", "momentum", momentum, high=1.0)
        self.nesterov = bool(nesterov)
        self.backend = backend
        self.fused = bool(fused)
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
        defaults = dict(momentum_estimator=momentum_estimator, mvr_q=mvr_q, step_rule=step_rule,
                        step_options=step_options)
        self.param_groups = self._build_groups(params, norm, float(radius), defaults)
        self.params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)
        jobs = {estimators.job_of(g["estimator"]) for g in self.param_groups} - {None}
        if len(jobs) > 1:
            raise ValueError(f"the groups of one rule must need one kind of extra input, got {sorted(jobs)}")
        self.job: str | None = jobs.pop() if jobs else None
        # per parameter: MVR-2's h and the step rule's state (distance_adaptive's x_0)
        self._mvr_h: list[torch.Tensor | None] = [None] * len(self.params)
        self._rule_state: list[dict[str, Any]] = [{} for _ in self.params]
        self.previous: list[torch.Tensor] | None = (
            [p.detach().clone() for p in self.params] if self.job is not None else None)

    def _build_groups(self, params, norm, radius, defaults) -> list[dict]:
        items = list(params)
        if not items:
            raise ValueError("params must not be empty")
        raw_groups = items if isinstance(items[0], dict) else [{"params": items}]
        groups = []
        for i, raw in enumerate(raw_groups):
            if not isinstance(raw, dict):
                raise TypeError("params must be all tensors or all dicts (param groups)")
            unknown = set(raw) - set(_GROUP_KEYS)
            if unknown:
                raise ValueError(f"param group {i} has unknown keys {sorted(unknown)}; known: {_GROUP_KEYS}")
            tensors = raw["params"]
            tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            for t in tensors:
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise TypeError(f"param group {i}: params must be floating torch tensors")
            group_radius = raw.get("radius", radius)
            if isinstance(group_radius, bool) or not (
                isinstance(group_radius, (int, float)) and math.isfinite(group_radius) and group_radius > 0
            ):
                raise ValueError(f"param_groups[{i}]['radius'] must be a finite number > 0, got {group_radius!r}")
            options = raw.get("lmo_options", {})
            if not isinstance(options, dict):
                raise TypeError(f"param_groups[{i}]['lmo_options'] must be a dict, got {type(options).__name__}")
            group = {
                "params": tensors,
                "norm": raw.get("norm", norm),
                "radius": float(group_radius),
                "lr": check_lr(f"param_groups[{i}]", raw.get("lr", self.lr)),
                "lmo_options": dict(options),
            }
            if group["norm"] is not None and group["norm"] not in norms.NORMS:
                raise ValueError(f"param_groups[{i}]['norm'] must be one of {tuple(norms.NORMS)} or None, got {group['norm']!r}")
            _check_lmo_options(group, f"param_groups[{i}]['lmo_options']")
            where = f"param_groups[{i}]"
            name = raw.get("momentum_estimator", defaults["momentum_estimator"])
            group["estimator"] = estimators.resolve(name, self.nesterov)
            group["mvr_q"] = estimators.check_q(raw.get("mvr_q", defaults["mvr_q"]), f"{where}['mvr_q']")
            group["rule"] = step_rules.get(raw.get("step_rule", defaults["step_rule"]), f"{where}['step_rule']")
            group["step_options"] = step_rules.check_options(
                group["rule"], raw.get("step_options", defaults["step_options"]), f"{where}['step_options']")
            if group["norm"] is None and (group["rule"].name != "constant" or not group["estimator"].fusable):
                raise ValueError(f"{where}: norm None (the raw step) takes only step_rule 'constant' and "
                                 "momentum_estimator 'ema' or 'nesterov'")
            groups.append(group)
        return groups

    def _buffer(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Momentum of parameter ``i``, zero-initialised as in the paper and the authors' code."""
        m = self._momentum_buffers[i]
        if m is None:
            m = self._momentum_buffers[i] = torch.zeros_like(self.params[i], dtype=dtype)
        return m

    def apply(self, grads: Sequence[torch.Tensor], version: int, lr_factor: float = 1.0,
              momentum: float | None = None) -> None:
        """One update ``x <- x + lr * lr_factor * t * lmo(u)`` (``x - ... * u`` when norm is None).

        ``momentum`` (this update's ``beta``) replaces the rule's own (theorem2 replaces
        both); with neither set (``momentum=0`` and ``None``) no buffer is kept and ``u = g``.
        ``grads`` holds ``2 n`` tensors when :attr:`job` is set (see the class doc)."""
        grads, extras = estimators.split_payload(grads, len(self.params), self.job)
        check_grads(grads, self.params)
        if extras is not None:
            check_grads(extras, self.params)
            self.previous = [p.detach().clone() for p in self.params]  # x^k, before this update moves it
        has_momentum = momentum is not None or self.momentum > 0.0
        beta = (self.momentum if momentum is None else momentum) if has_momentum else 0.0
        i = 0
        for group in self.param_groups:
            lr = group["lr"] * lr_factor
            count = len(group["params"])
            est, rule = group["estimator"], group["rule"]
            if self.fused and group["norm"] is not None and rule.name == "constant":
                span = range(i, i + count)
                momenta = [self._buffer(j, torch.float32) for j in span]
                ops.lmo_step_(group["params"], list(grads[i:i + count]), momenta, norm=group["norm"], lr=lr,
                              beta=beta, nesterov=est.nesterov, radius=group["radius"], backend=self.backend,
                              **group["lmo_options"], **self._fused_args(group, span, extras))
                i += count
                continue
            for p in group["params"]:
                self._apply_one(group, i, p, grads[i], None if extras is None else extras[i], version, lr,
                                step_rules.momentum(rule, version, beta), has_momentum or rule.name == "theorem2")
                i += 1

    def _fused_args(self, group: dict, span: Sequence[int], extras) -> dict:
        """``ops.lmo_step_``'s estimator keywords for parameters ``span`` (fp32 h, started at e)."""
        est = group["estimator"]
        if est.fusable:
            return {}
        es = [extras[j] for j in span]
        if est.recursion:
            for j, e in zip(span, es):
                if self._mvr_h[j] is None:
                    self._mvr_h[j] = e.to(torch.float32, copy=True)
        hs = [self._mvr_h[j] for j in span] if est.recursion else None
        return estimators.fused_args(est, es, hs, group["mvr_q"])

    def _apply_one(self, group: dict, i: int, p: torch.Tensor, g: torch.Tensor, extra: torch.Tensor | None,
                   version: int, lr: float, beta: float, has_momentum: bool) -> None:
        """One parameter's update: estimator, step factor, LMO step (in p's dtype, or the
        fused fp32 path of Gluon when ``fused``)."""
        est, rule = group["estimator"], group["rule"]
        factor = dict(rule=rule, options=group["step_options"], k=version, x=p, g=g, norm=group["norm"],
                      norm_options=group["lmo_options"], state=self._rule_state[i])
        if self.fused:
            m = self._buffer(i, torch.float32)
            common = dict(norm=group["norm"], weight_decay=0.0, radius=group["radius"], backend=self.backend,
                          **group["lmo_options"])
            fused = self._fused_args(group, [i], None if extra is None else {i: extra})
            if not rule.needs_direction:
                ops.lmo_step_([p], [g], [m], lr=lr * step_rules.factor(**factor), beta=beta, nesterov=est.nesterov,
                              **common, **fused)
                return
            u, _ = estimators.update_(est, m, g, beta=beta, q=group["mvr_q"], extra=extra,
                                      h=fused["recursion"][0] if fused.get("recursion") else None)
            step_rules.direction_step_(p, u, lr, factor, common)
            return
        u = g
        if has_momentum or not est.fusable:
            m = self._buffer(i, p.dtype)
            # torch.lerp is exact at weight 1, so beta_k = 0 (alpha_0 = 1) gives m = u = g
            u, self._mvr_h[i] = estimators.update_(est, m, g, beta=beta, q=group["mvr_q"], extra=extra, h=self._mvr_h[i])
        if group["norm"] is None:
            p.add_(u, alpha=-lr)
            return
        direction = norms.lmo(u, group["norm"], group["radius"], backend=self.backend, **group["lmo_options"])
        t = step_rules.factor(**factor, direction=direction) if rule.needs_direction else step_rules.factor(**factor)
        p.add_(direction, alpha=lr * t)

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "fused": self.fused}

    def state_dict(self) -> dict[str, Any]:
        """Momentum buffers and per-group settings (not the parameters, as in torch.optim);
        the estimators' and step rules' state only where a group keeps some."""
        state = {
            "groups": [{k: v for k, v in g.items() if k not in _DERIVED} for g in self.param_groups],
            "momentum_buffers": [None if m is None else m.clone() for m in self._momentum_buffers],
        }
        if self.previous is not None or any(h is not None for h in self._mvr_h) or any(self._rule_state):
            state["estimator_state"] = {
                "previous": None if self.previous is None else [x.clone() for x in self.previous],
                "mvr_h": [None if h is None else h.clone() for h in self._mvr_h],
                "rule_state": [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                               for s in self._rule_state],
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore buffers and group settings; everything is validated (as at construction)
        before anything changes."""
        buffers, saved_groups = state["momentum_buffers"], state["groups"]
        if not isinstance(buffers, (list, tuple)) or len(buffers) != len(self.params):
            raise ValueError(f"state: expected {len(self.params)} momentum buffers (one per parameter)")
        for i, (m, p) in enumerate(zip(buffers, self.params)):
            if m is not None and (not isinstance(m, torch.Tensor) or m.shape != p.shape or not m.is_floating_point()):
                raise ValueError(f"state: momentum buffer {i} does not match parameter {i} of shape {tuple(p.shape)}")
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state: expected {len(self.param_groups)} param groups")
        for saved, group in zip(saved_groups, self.param_groups):
            settings = set(group) - set(_DERIVED)  # what state_dict saves of a group
            if not isinstance(saved, dict) or set(saved) != settings:
                raise ValueError(f"state: each saved param group must be a dict of exactly {sorted(settings)}")
        groups = self._build_groups(
            # the estimator and the step rule are the rule's own (not saved): keep this rule's
            [{**saved, "params": group["params"], "momentum_estimator": group["estimator"].name,
              "step_rule": group["rule"].name} for saved, group in zip(saved_groups, self.param_groups)],
            norm=None, radius=1.0,  # the defaults are unused: a saved group holds every key
            defaults=dict.fromkeys(("momentum_estimator", "mvr_q", "step_rule", "step_options")))
        self._momentum_buffers = [None if m is None else m.clone().to(p.device) for m, p in zip(buffers, self.params)]
        self.param_groups = groups
        extra = state.get("estimator_state")  # absent in states saved before estimators existed
        if extra is not None:
            if extra["previous"] is not None:
                self.previous = [x.clone().to(p.device) for x, p in zip(extra["previous"], self.params)]
            self._mvr_h = [None if h is None else h.clone().to(p.device) for h, p in zip(extra["mvr_h"], self.params)]
            self._rule_state = [dict(s) for s in extra["rule_state"]]


# group entries rebuilt from the saved names at construction, not saved themselves
_DERIVED = ("params", "estimator", "rule")


class OptimizerRule:
    """Any ``torch.optim.Optimizer`` as an update rule over its own parameters.

    ``apply`` points each parameter's ``.grad`` at the given gradient (no copy), calls the
    schedule for this version, scales every group's ``lr`` by ``lr_factor`` and, when
    ``momentum`` is given, sets it in every group that has a ``momentum`` key (AdamW-style
    groups keep their ``betas``), steps, then puts those two values back and clears
    ``.grad``; so the factors hold for this update only and a schedule sees the values it
    wrote.

    Args:
        optimizer: its param groups' tensors are the parameters (in group order).
        schedule: ``schedule(version, optimizer)`` before each update, ``version`` being
            the number of updates so far (a synchronous trainer's step index).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be callable(version, optimizer) or None, got {type(schedule).__name__}")
        self.optimizer = optimizer
        self.schedule = schedule
        self.params: list[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def apply(self, grads: Sequence[torch.Tensor], version: int, lr_factor: float = 1.0,
              momentum: float | None = None) -> None:
        check_grads(grads, self.params)
        saved = []
        try:  # whatever fails (the schedule included), no gradient stays lent as .grad
            for p, g in zip(self.params, grads):
                p.grad = g if g.dtype == p.dtype and g.device == p.device else g.to(p)
            if self.schedule is not None:
                self.schedule(version, self.optimizer)
            for group in self.optimizer.param_groups:
                saved.append((group["lr"], group.get("momentum")))
                if lr_factor != 1.0:
                    group["lr"] = group["lr"] * lr_factor
                if momentum is not None and "momentum" in group:
                    group["momentum"] = momentum
            self.optimizer.step()
        finally:
            for group, (lr, beta) in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr
                if "momentum" in group:
                    group["momentum"] = beta
            for p in self.params:
                p.grad = None

    def hyperparameters(self) -> dict[str, Any]:
        return {"optimizer": type(self.optimizer).__name__,
                "schedule": None if self.schedule is None else getattr(self.schedule, "__name__", repr(self.schedule))}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
