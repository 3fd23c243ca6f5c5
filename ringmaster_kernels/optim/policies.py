"""Asynchronous LMO-momentum methods as *policy* objects: one object, two clocks.

A policy owns the model parameters (updated in place, like ``torch.optim``), the
momentum state and the iteration counter ``k`` (the model *version*). A driver — the
virtual-time simulator (``runtime/simulator.py``) or the real multi-threaded runtime —
hands it every gradient that arrives from a worker, tagged with the worker id and the
version the worker started from, and executes the returned :class:`Decision`:

* ``restart``: the arriving worker starts a new job now, at the current parameters
  (``False``: it waits idle until a later decision sets ``restart_idle``);
* ``cancel_before``: every in-flight job that started at a version ``< cancel_before``
  is cancelled and restarted at the current parameters (the "stops" of Ringmaster,
  the restart-all of Rennala);
* ``restart_idle``: every idle worker starts a job at the current parameters.

Gradients may be passed lazily as a zero-argument callable; a policy calls it only when
it uses the gradient, so a simulator pays nothing for discarded ones.

Parameters are given as a list of tensors or as ``torch.optim``-style groups
(``{"params": [...], "norm": ..., "radius": ..., "lr": ...}``) as in Gluon: each group
names its norm ball, and :func:`ringmaster_kernels.norms.lmo` supplies the direction.
``norm=None`` means the raw negative gradient (Euclidean SGD), which with no momentum
makes :class:`Ringmaster` the Ringmaster ASGD of Maranjyan et al.

Methods (names as used by ``ringmaster simulate``): ``ringmaster`` (fixed R, with
stops), ``ringmaster_pa`` (parameter-agnostic schedules), ``async`` (no threshold),
``delay_adaptive`` (eta * n / max(n, delay)), ``rennala`` (B gradients at one point),
``sync`` (all n workers at one point), ``ringmaster_asgd`` (Euclidean, no momentum).
Build any of them with :func:`make_policy`.

Policies are not thread-safe: one thread (the server) calls ``on_gradient``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence, Union

import torch

from .. import norms, ops

GradientSource = Union[torch.Tensor, Sequence[torch.Tensor], Callable[[], Union[torch.Tensor, Sequence[torch.Tensor]]]]

_GROUP_KEYS = ("params", "norm", "radius", "lr", "lmo_options")


class Decision(NamedTuple):
    """What a driver must do after a gradient arrived (a tuple: cheap to build per event).

    Attributes:
        accepted: the gradient was used (applied or added to the current batch).
        advanced: the parameters changed; ``version`` is the new version.
        version: the model version after this event (number of updates so far).
        delay: ``version_before_event - worker's start version``.
        restart: the arriving worker starts a new job now at the current parameters;
            ``False`` means it waits idle (synchronous barrier).
        cancel_before: cancel and restart, at the current parameters, every in-flight
            job started at a version strictly below this; ``None``: cancel nothing.
        restart_idle: every idle worker starts a job at the current parameters.
    """

    accepted: bool
    advanced: bool
    version: int
    delay: int
    restart: bool = True
    cancel_before: int | None = None
    restart_idle: bool = False


def _check_lr(lr: float, name: str = "lr") -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(lr).__name__}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {lr}")
    return float(lr)


def _check_threshold(threshold: float, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{name} must be an int >= 1 or math.inf, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 1 or (math.isfinite(threshold) and threshold != int(threshold)):
        raise ValueError(f"{name} must be an int >= 1 or math.inf, got {threshold}")
    return float(threshold) if math.isinf(threshold) else int(threshold)


def _check_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_momentum(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
        raise ValueError(f"momentum must be a number in [0, 1), got {beta!r}")
    return float(beta)


class Policy:
    """Base of every async method: parameters, groups, momentum, version, counters.

    Args:
        params: tensors, or ``torch.optim``-style groups (dicts with ``params`` and any of
            ``norm``, ``radius``, ``lr``, ``lmo_options``); updated in place.
        num_workers: number of workers the driver runs (``n``); needed by ``sync`` and
            ``delay_adaptive``, validated for all.
        lr: default step size (``eta`` / ``gamma``) for groups that do not set ``lr``.
        norm: default norm name from :mod:`ringmaster_kernels.norms`, or ``None`` for the
            raw gradient step ``x <- x - lr * u``.
        radius: default norm-ball radius ``rho``.
        momentum: ``beta``; the momentum buffer is ``m <- beta m + (1 - beta) g``
            (``alpha = 1 - beta`` in the paper's notation). 0 disables momentum.
        nesterov: use ``u = beta m + (1 - beta) g`` (Muon) instead of ``u = m``.
        backend: passed to :func:`norms.lmo` (``"auto"`` | ``"triton"`` | ``"torch"``).
        fused: update each normed group with one :func:`ops.lmo_step_` call (fused
            kernels on CUDA; fp32 momentum state) instead of momentum, ``norms.lmo`` and
            ``add_`` per tensor in the parameters' dtype (the float64-exact path the
            simulator uses; on CPU it is also the cheaper one).
    """

    name = "policy"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        num_workers: int,
        lr: float,
        norm: str | None = "spectral",
        radius: float = 1.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        backend: str | None = "auto",
        fused: bool = False,
    ) -> None:
        self.num_workers = _check_int(num_workers, "num_workers")
        self.lr = _check_lr(lr)
        self.momentum = _check_momentum(momentum)
        self._has_momentum = self.momentum > 0.0
        self.nesterov = bool(nesterov)
        self.backend = backend
        self.fused = bool(fused)
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0, got {radius!r}")
        self.param_groups = self._build_groups(params, norm, float(radius))
        self.params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.version = 0
        self.accepted = 0
        self.discarded = 0

    # ------------------------------------------------------------------ set-up
    def _build_groups(self, params, norm, radius) -> list[dict]:
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
            group = {
                "params": tensors,
                "norm": raw.get("norm", norm),
                "radius": float(raw.get("radius", radius)),
                "lr": _check_lr(raw.get("lr", self.lr), f"param_groups[{i}]['lr']"),
                "lmo_options": dict(raw.get("lmo_options", {})),
            }
            if group["norm"] is not None and group["norm"] not in norms.NORMS:
                raise ValueError(f"param_groups[{i}]['norm'] must be one of {tuple(norms.NORMS)} or None, got {group['norm']!r}")
            groups.append(group)
        return groups

    # ------------------------------------------------------------------ schedules
    @property
    def threshold(self) -> float:
        """Current delay threshold ``R_k`` (``math.inf`` when the method has none)."""
        return math.inf

    def _beta(self) -> float:
        """Momentum ``beta_k`` used by the update at the current version."""
        return self.momentum

    def _lr_factor(self, delay: int) -> float:
        """Multiplier of every group's ``lr`` for the update at the current version."""
        return 1.0

    # ------------------------------------------------------------------ math
    @staticmethod
    def _materialize(grad: GradientSource) -> list[torch.Tensor]:
        if callable(grad):
            grad = grad()
        return [grad] if isinstance(grad, torch.Tensor) else list(grad)

    def _buffer(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Momentum of parameter ``i``, zero-initialised as in the paper and the authors' code."""
        m = self._momentum_buffers[i]
        if m is None:
            m = self._momentum_buffers[i] = torch.zeros_like(self.params[i], dtype=dtype)
        return m

    def _step(self, grads: Sequence[torch.Tensor], delay: int) -> None:
        """One update ``x <- x + lr_k * lmo(u)`` (or ``x - lr_k * u`` when norm is None)."""
        if len(grads) != len(self.params):
            raise ValueError(f"grad must hold one tensor per parameter ({len(self.params)}), got {len(grads)}")
        for i, (g, p) in enumerate(zip(grads, self.params)):
            if g.shape != p.shape:
                raise ValueError(f"grad {i} has shape {tuple(g.shape)}, parameter has {tuple(p.shape)}")
        beta = self._beta() if self._has_momentum else 0.0
        factor = self._lr_factor(delay)
        i = 0
        for group in self.param_groups:
            lr = group["lr"] * factor
            count = len(group["params"])
            if self.fused and group["norm"] is not None:
                momenta = [self._buffer(j, torch.float32) for j in range(i, i + count)]
                ops.lmo_step_(group["params"], list(grads[i:i + count]), momenta, norm=group["norm"], lr=lr,
                              beta=beta, nesterov=self.nesterov, radius=group["radius"], backend=self.backend,
                              **group["lmo_options"])
                i += count
                continue
            for p in group["params"]:
                g = grads[i]
                u = g
                if self._has_momentum:
                    m = self._buffer(i, p.dtype)
                    # torch.lerp is exact at weight 1, so beta_k = 0 (alpha_0 = 1) gives m = u = g
                    m.lerp_(g, 1.0 - beta)
                    u = torch.lerp(g, m, beta) if self.nesterov else m
                if group["norm"] is None:
                    p.add_(u, alpha=-lr)
                else:
                    direction = norms.lmo(u, group["norm"], group["radius"], backend=self.backend, **group["lmo_options"])
                    p.add_(direction, alpha=lr)
                i += 1
        self.version += 1

    # ------------------------------------------------------------------ protocol
    def on_gradient(self, worker: int, version: int, grad: GradientSource) -> Decision:
        """Handle a gradient from ``worker`` computed at parameters of ``version``.

        Args:
            worker: worker id in ``[0, num_workers)``.
            version: the model version the worker's job started from (``<= self.version``).
            grad: the gradient (a tensor per parameter, or one tensor when there is one
                parameter), or a zero-argument callable returning it; called at most once,
                and only if the gradient is used.

        Returns:
            The :class:`Decision` the driver must execute.
        """
        raise NotImplementedError

    def _check_arrival(self, worker: int, version: int) -> int:
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}), got {worker}")
        if not 0 <= version <= self.version:
            raise ValueError(f"version must be in [0, {self.version}], got {version}")
        return self.version - version

    def counters(self) -> dict[str, int]:
        """``{"version", "accepted", "discarded"}`` (cancelled jobs are counted by the driver)."""
        return {"version": self.version, "accepted": self.accepted, "discarded": self.discarded}

    def remove_worker(self, worker: int) -> Decision | None:
        """The driver lost ``worker`` for good (it crashed or hung); call once per worker.

        Returns a :class:`Decision` to execute (no arriving worker to answer: its
        ``restart`` is meaningless), or ``None`` when nothing changes, as for every
        method that does not wait on particular workers.
        """
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}), got {worker}")
        return None

    # ------------------------------------------------------------------ checkpoints
    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov, "fused": self.fused}

    def state_dict(self) -> dict[str, Any]:
        """Counters, momentum buffers and per-group settings (not the parameters, as in torch.optim)."""
        return {
            "name": self.name,
            "hyperparameters": self.hyperparameters(),
            "counters": self.counters(),
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "momentum_buffers": [None if m is None else m.clone() for m in self._momentum_buffers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the policy must have been built the same way."""
        if state.get("name") != self.name:
            raise ValueError(f"state is for policy {state.get('name')!r}, this is {self.name!r}")
        buffers = state["momentum_buffers"]
        if len(buffers) != len(self.params):
            raise ValueError(f"state has {len(buffers)} momentum buffers, policy has {len(self.params)} parameters")
        self._momentum_buffers = [None if m is None else m.clone().to(p.device) for m, p in zip(buffers, self.params)]
        for group, saved in zip(self.param_groups, state["groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        counters = state["counters"]
        self.version, self.accepted, self.discarded = counters["version"], counters["accepted"], counters["discarded"]


class Ringmaster(Policy):
    """Asynchronous LMO with momentum and a delay threshold (the paper's Algorithm 1).

    A gradient with delay ``< R_k`` is applied (``m <- (1-alpha) m + alpha g``,
    ``x <- x + eta * lmo(u)``); otherwise it is discarded and the worker restarts.
    With ``stops=True`` (what the authors' code runs) every accepted update also cancels
    the in-flight jobs whose delay reached ``R_{k+1}``, so every arrival is applied.
    ``threshold=math.inf`` is asynchronous LMO with no threshold.

    Args:
        threshold: ``R``, an int >= 1 or ``math.inf``.
        stops: cancel jobs whose delay reached ``R`` after each update.
        **kwargs: see :class:`Policy`.
    """

    name = "ringmaster"

    def __init__(self, params, *, threshold: float = 6, stops: bool = True, **kwargs) -> None:
        self._threshold = _check_threshold(threshold)
        self.stops = bool(stops)
        super().__init__(params, **kwargs)

    @property
    def threshold(self) -> float:
        return self._threshold

    def on_gradient(self, worker: int, version: int, grad: GradientSource) -> Decision:
        delay = self._check_arrival(worker, version)
        if delay >= self.threshold:
            self.discarded += 1
            return Decision(accepted=False, advanced=False, version=self.version, delay=delay)
        self._step(self._materialize(grad), delay)
        self.accepted += 1
        cancel = None
        if self.stops and math.isfinite(self.threshold):
            # a job started at v has delay version - v; cancel those with delay >= R
            cancel = self.version - int(self.threshold) + 1
        return Decision(accepted=True, advanced=True, version=self.version, delay=delay, cancel_before=cancel)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "threshold": self._threshold, "stops": self.stops}


class ParameterAgnosticRingmaster(Ringmaster):
    """Ringmaster LMO with no tuned constants: ``alpha_k = 1/sqrt(k)`` (``alpha_0 = 1``),
    ``R_k = max(1, floor(sqrt(k)))``, ``eta_k = eta / (k + 1)^(3/4)``; ``lr`` is ``eta``.
    The momentum argument is ignored (it follows ``beta_k = 1 - alpha_k``)."""

    name = "ringmaster_pa"

    def __init__(self, params, *, stops: bool = True, **kwargs) -> None:
        super().__init__(params, threshold=1, stops=stops, **kwargs)
        self._has_momentum = True

    @staticmethod
    def schedule(k: int) -> tuple[float, int, float]:
        """``(alpha_k, R_k, eta_k / eta)`` at iteration ``k``."""
        alpha = 1.0 if k == 0 else 1.0 / math.sqrt(k)
        return alpha, max(1, math.isqrt(k)), 1.0 / (k + 1) ** 0.75

    @property
    def threshold(self) -> float:
        return self.schedule(self.version)[1]

    def _beta(self) -> float:
        return 1.0 - self.schedule(self.version)[0]

    def _lr_factor(self, delay: int) -> float:
        return self.schedule(self.version)[2]

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "nesterov": self.nesterov, "stops": self.stops, "fused": self.fused}


class DelayAdaptive(Policy):
    """Asynchronous LMO applying every gradient with step ``eta * n / max(n, delay)``."""

    name = "delay_adaptive"

    def on_gradient(self, worker: int, version: int, grad: GradientSource) -> Decision:
        delay = self._check_arrival(worker, version)
        self._step(self._materialize(grad), delay)
        self.accepted += 1
        return Decision(accepted=True, advanced=True, version=self.version, delay=delay)

    def _lr_factor(self, delay: int) -> float:
        return self.num_workers / max(self.num_workers, delay)


class Minibatch(Policy):
    """Average ``batch`` gradients all computed at the current point, then one step.

    ``per_worker=False`` is Rennala LMO: a worker that delivers restarts at the same
    point (fast workers contribute several gradients); after the step every in-flight
    job is cancelled and every worker restarts at the new point (as the authors' code
    does). ``per_worker=True`` with ``batch = num_workers`` is synchronous minibatch
    LMO: each worker delivers once and waits for the others at the barrier.
    A gradient from an older version (a driver race) is discarded.
    """

    name = "rennala"

    def __init__(self, params, *, batch: int, per_worker: bool = False, **kwargs) -> None:
        self.batch = _check_int(batch, "batch")
        self.per_worker = bool(per_worker)
        super().__init__(params, **kwargs)
        if self.per_worker:
            if self.batch > self.num_workers:
                raise ValueError(f"batch ({self.batch}) must be <= num_workers ({self.num_workers}) when per_worker=True")
        self._sum: list[torch.Tensor] | None = None
        self._count = 0

    def on_gradient(self, worker: int, version: int, grad: GradientSource) -> Decision:
        delay = self._check_arrival(worker, version)
        if delay > 0:
            self.discarded += 1
            return Decision(accepted=False, advanced=False, version=self.version, delay=delay)
        grads = self._materialize(grad)
        if self._sum is None:
            self._sum = [g.detach().clone() for g in grads]
        else:
            for s, g in zip(self._sum, grads):
                s.add_(g)
        self._count += 1
        self.accepted += 1
        if self._count < self.batch:
            return Decision(accepted=True, advanced=False, version=self.version, delay=delay, restart=not self.per_worker)
        return self._apply_batch(delay, accepted=True)

    def _apply_batch(self, delay: int, accepted: bool) -> Decision:
        scale = 1.0 / self._count
        mean = [s.mul_(scale) for s in self._sum]
        self._sum, self._count = None, 0
        self._step(mean, delay)
        return Decision(
            accepted=accepted, advanced=True, version=self.version, delay=delay,
            cancel_before=self.version, restart_idle=self.per_worker,
        )

    def remove_worker(self, worker: int) -> Decision | None:
        """A synchronous barrier stops waiting for a lost worker: the batch shrinks by one,
        and a batch that is now complete is applied at once (restarting the idle workers)."""
        super().remove_worker(worker)
        if not self.per_worker or self.batch == 1:
            return None
        self.batch -= 1
        if self._count == 0 or self._count < self.batch:
            return None
        return self._apply_batch(0, accepted=False)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "batch": self.batch, "per_worker": self.per_worker}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["batch_sum"] = None if self._sum is None else [s.clone() for s in self._sum]
        state["batch_count"] = self._count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._sum = None if state["batch_sum"] is None else [s.clone() for s in state["batch_sum"]]
        self._count = state["batch_count"]


_COMMON = ("lr", "norm", "radius", "momentum", "nesterov", "backend", "fused")

# name -> (constructor, fixed keyword arguments, keyword arguments a caller may set)
METHODS: dict[str, tuple[type, dict[str, Any], tuple[str, ...]]] = {
    "ringmaster": (Ringmaster, {"stops": True}, _COMMON + ("threshold",)),
    "ringmaster_pa": (ParameterAgnosticRingmaster, {"stops": True}, ("lr", "norm", "radius", "nesterov", "backend", "fused")),
    "sync": (Minibatch, {"per_worker": True}, _COMMON),
    "async": (Ringmaster, {"threshold": math.inf, "stops": False}, _COMMON),
    "delay_adaptive": (DelayAdaptive, {}, _COMMON),
    "rennala": (Minibatch, {"per_worker": False}, _COMMON + ("batch",)),
    "ringmaster_asgd": (Ringmaster, {"stops": True, "norm": None, "momentum": 0.0}, ("lr", "threshold", "backend")),
}


def make_policy(method: str, params: Iterable[torch.Tensor] | Iterable[dict], *, num_workers: int, **kwargs) -> Policy:
    """Build the policy named ``method`` (a key of :data:`METHODS`).

    ``sync`` uses ``batch = num_workers``. A keyword the method does not take (e.g.
    ``threshold`` for ``async``) raises ``ValueError`` naming it, so a typo in a sweep
    cannot pass silently; ``None`` values are ignored (meaning "the default").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    cls, fixed, allowed = METHODS[method]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    extra = set(kwargs) - set(allowed)
    if extra:
        raise ValueError(f"method {method!r} does not take {sorted(extra)}; it takes {allowed}")
    args = {**kwargs, **fixed}
    if method == "sync":
        args["batch"] = num_workers
    policy = cls(params, num_workers=num_workers, **args)
    policy.name = method
    return policy
