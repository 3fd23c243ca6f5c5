"""Asynchronous LMO-momentum methods as *policy* objects: one object, two clocks.

A policy holds the delay rule: acceptance, the iteration counter ``k`` (the model
*version*), cancellations and this update's step factors. Applying an update is the job
of its *update rule* (``optim/update_rules.py``): the built-in LMO-momentum math, or
any ``torch.optim.Optimizer`` over the parameters with a per-version schedule hook. A driver — the
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

For the built-in rule, parameters are given as a list of tensors or as ``torch.optim``-style groups
(``{"params": [...], "norm": ..., "radius": ..., "lr": ...}``) as in Gluon: each group
names its norm ball, and :func:`ringmaster_kernels.norms.lmo` supplies the direction.
``norm=None`` means the raw negative gradient (Euclidean SGD), which with no momentum
makes :class:`Ringmaster` the Ringmaster ASGD of Maranjyan et al.

Methods (names as used by ``ringmaster simulate``): ``ringmaster`` (fixed R, with
stops by default, ``stops=False`` to turn them off), ``ringmaster_nostops``,
``ringmaster_alg1`` (the paper's Algorithm 1: no stops, no Nesterov), ``ringmaster_pa``
(parameter-agnostic schedules; ``_nostops`` and ``_alg1`` likewise), ``async`` (no threshold),
``delay_adaptive`` (eta * n / max(n, delay)), ``rennala`` (B gradients at one point),
``sync`` (all n workers at one point), ``ringmaster_asgd`` (Euclidean, no momentum).
Build any of them with :func:`make_policy`.

Policies are not thread-safe: one thread (the server) calls ``on_gradient``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence, Union

import torch

from .update_rules import LMOMomentum, OptimizerRule, Schedule, UpdateRule

GradientSource = Union[torch.Tensor, Sequence[torch.Tensor], Callable[[], Union[torch.Tensor, Sequence[torch.Tensor]]]]

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


class Policy:
    """Base of every async method: the update rule, version, counters.

    Args:
        params: what the method updates, one of
            - tensors, or ``torch.optim``-style groups (dicts with ``params`` and any of
              ``norm``, ``radius``, ``lr``, ``lmo_options``): the built-in
              :class:`~ringmaster_kernels.optim.update_rules.LMOMomentum` rule over them,
              configured by the keyword arguments below;
            - a ``torch.optim.Optimizer``: an
              :class:`~ringmaster_kernels.optim.update_rules.OptimizerRule` over its
              parameters (with ``schedule``); the LMO keywords must then be left unset;
            - any :class:`~ringmaster_kernels.optim.update_rules.UpdateRule`.
        num_workers: number of workers the driver runs (``n``); needed by ``sync`` and
            ``delay_adaptive``, validated for all.
        schedule: ``schedule(version, optimizer)`` hook of an optimizer rule.
        **rule_options: the built-in rule's settings (``lr``, required, and ``norm``,
            ``radius``, ``momentum``, ``nesterov``, ``backend``, ``fused``: see
            ``LMOMomentum``).
    """

    name = "policy"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | torch.optim.Optimizer | UpdateRule,
        *,
        num_workers: int,
        schedule: Schedule | None = None,
        **rule_options: Any,
    ) -> None:
        self.num_workers = _check_int(num_workers, "num_workers")
        if isinstance(params, torch.optim.Optimizer):
            params = OptimizerRule(params, schedule)
        elif schedule is not None:
            raise ValueError("schedule applies to a torch.optim.Optimizer update rule; params is not one")
        if isinstance(params, UpdateRule):
            if rule_options:
                raise ValueError(f"{sorted(rule_options)}: the update rule owns these; set them on it, not on the policy")
            self.rule = params
        else:
            if "lr" not in rule_options:
                raise ValueError("lr is required for the built-in LMO-momentum rule")
            self.rule = LMOMomentum(params, **rule_options)
        self.params: list[torch.Tensor] = self.rule.params
        self.version = 0
        self.accepted = 0
        self.discarded = 0

    # ------------------------------------------------------------------ schedules
    @property
    def threshold(self) -> float:
        """Current delay threshold ``R_k`` (``math.inf`` when the method has none)."""
        return math.inf

    def _momentum(self) -> float | None:
        """Momentum ``beta_k`` of the update at the current version; ``None``: the rule's own."""
        return None

    def _lr_factor(self, delay: int) -> float:
        """Multiplier of every group's ``lr`` for the update at the current version."""
        return 1.0

    # ------------------------------------------------------------------ math
    @staticmethod
    def _materialize(grad: GradientSource) -> list[torch.Tensor]:
        if callable(grad):
            grad = grad()
        return [grad] if isinstance(grad, torch.Tensor) else list(grad)

    def _step(self, grads: Sequence[torch.Tensor], delay: int) -> None:
        """Have the rule apply ``grads`` with this version's step factors; advance the version."""
        self.rule.apply(grads, self.version, lr_factor=self._lr_factor(delay), momentum=self._momentum())
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

    def observe_time(self, worker: int, seconds: float) -> None:
        """The driver measured ``worker``'s last job at ``seconds`` (told before its gradient
        is offered). Ignored except by methods that estimate worker times online."""

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
        return self.rule.hyperparameters()

    def state_dict(self) -> dict[str, Any]:
        """Counters and the update rule's state (not the parameters, as in torch.optim)."""
        return {"name": self.name, "hyperparameters": self.hyperparameters(), "counters": self.counters(),
                "rule": self.rule.state_dict()}

    def _check_state(self, state: dict[str, Any]) -> None:
        """Refuse a state this policy cannot take, before anything changes."""
        if state.get("name") != self.name:
            raise ValueError(f"state is for policy {state.get('name')!r}, this is {self.name!r}")
        counters = state["counters"]
        for key in ("version", "accepted", "discarded"):
            _check_int(counters[key], f"state['counters'][{key!r}]", minimum=0)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the policy must have been built the same way."""
        self._check_state(state)
        counters = state["counters"]
        self.rule.load_state_dict(state["rule"])  # validates the rule's state before changing it
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

    @staticmethod
    def schedule(k: int) -> tuple[float, int, float]:
        """``(alpha_k, R_k, eta_k / eta)`` at iteration ``k``."""
        alpha = 1.0 if k == 0 else 1.0 / math.sqrt(k)
        return alpha, max(1, math.isqrt(k)), 1.0 / (k + 1) ** 0.75

    @property
    def threshold(self) -> float:
        return self.schedule(self.version)[1]

    def _momentum(self) -> float:
        return 1.0 - self.schedule(self.version)[0]

    def _lr_factor(self, delay: int) -> float:
        return self.schedule(self.version)[2]

    def hyperparameters(self) -> dict[str, Any]:
        rule = {k: v for k, v in self.rule.hyperparameters().items() if k != "momentum"}
        return {**rule, "stops": self.stops}


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

    def _check_state(self, state: dict[str, Any]) -> None:
        super()._check_state(state)
        saved_sum = state["batch_sum"]
        count = _check_int(state["batch_count"], "state['batch_count']", minimum=0)
        if count >= self.batch or (count == 0) != (saved_sum is None):
            raise ValueError(f"state: a partial batch of {count} gradients does not fit batch {self.batch} "
                             f"with {'no' if saved_sum is None else 'a'} saved sum")
        if saved_sum is not None and (
            not isinstance(saved_sum, (list, tuple)) or len(saved_sum) != len(self.params) or not all(
                isinstance(s, torch.Tensor) and s.shape == p.shape and s.is_floating_point()
                for s, p in zip(saved_sum, self.params))
        ):
            raise ValueError("state: batch_sum must hold one floating tensor per parameter, of its shape")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved_sum = state["batch_sum"]
        self._sum = None if saved_sum is None else [s.to(p.device, copy=True) for s, p in zip(saved_sum, self.params)]
        self._count = state["batch_count"]


_COMMON = ("lr", "norm", "radius", "momentum", "nesterov", "backend", "fused", "schedule")
_PA = ("lr", "norm", "radius", "nesterov", "backend", "fused", "schedule")  # momentum follows the schedule


def _without(keys: tuple[str, ...], *drop: str) -> tuple[str, ...]:
    return tuple(k for k in keys if k not in drop)


# name -> (constructor, fixed keyword arguments, keyword arguments a caller may set).
# Ringmaster comes in every variant by name: stops on (the authors' code) or off, Nesterov
# on or off; "_alg1" is the paper's analysed Algorithm 1 (x+ = x + eta lmo(m+): plain EMA
# momentum, no Nesterov, no stops). With a torch.optim optimizer or update rule the
# optimizer owns its momentum, so "_alg1" then fixes the delay rule only (no stops).
METHODS: dict[str, tuple[type, dict[str, Any], tuple[str, ...]]] = {
    "ringmaster": (Ringmaster, {}, _COMMON + ("threshold", "stops")),
    "ringmaster_nostops": (Ringmaster, {"stops": False}, _COMMON + ("threshold",)),
    "ringmaster_alg1": (Ringmaster, {"stops": False, "nesterov": False}, _without(_COMMON, "nesterov") + ("threshold",)),
    "ringmaster_pa": (ParameterAgnosticRingmaster, {}, _PA + ("stops",)),
    "ringmaster_pa_nostops": (ParameterAgnosticRingmaster, {"stops": False}, _PA),
    "ringmaster_pa_alg1": (ParameterAgnosticRingmaster, {"stops": False, "nesterov": False}, _without(_PA, "nesterov")),
    "sync": (Minibatch, {"per_worker": True}, _COMMON),
    "async": (Ringmaster, {"threshold": math.inf, "stops": False}, _COMMON),
    "delay_adaptive": (DelayAdaptive, {}, _COMMON),
    "rennala": (Minibatch, {"per_worker": False}, _COMMON + ("batch",)),
    "ringmaster_asgd": (Ringmaster, {"stops": True, "norm": None, "momentum": 0.0}, ("lr", "threshold", "backend")),
    # Euclidean SGD-type methods for heterogeneous data (optim/hetero_policies.py); "asgd" is
    # plain asynchronous SGD, the biased baseline they correct.
    "asgd": (Ringmaster, {"threshold": math.inf, "stops": False, "norm": None, "momentum": 0.0}, ("lr", "backend")),
}
# (rescaled_asgd, ringleader and malenia join this table from optim/hetero_policies.py.)


# keywords of the built-in LMO-momentum rule: an optimizer or update rule owns these itself
_RULE_KEYS = ("lr", "norm", "radius", "momentum", "nesterov", "backend", "fused")


def make_policy(
    method: str,
    params: Iterable[torch.Tensor] | Iterable[dict] | torch.optim.Optimizer | UpdateRule,
    *,
    num_workers: int,
    **kwargs: Any,
) -> Policy:
    """Build the policy named ``method`` (a key of :data:`METHODS`).

    ``params`` are tensors or groups (the built-in LMO-momentum rule), a
    ``torch.optim.Optimizer`` (with an optional ``schedule=`` hook) or an
    :class:`~ringmaster_kernels.optim.update_rules.UpdateRule`; see :class:`Policy`.
    ``sync`` uses ``batch = num_workers``. A keyword the method does not take (e.g.
    ``threshold`` for ``async``, ``lr`` with an optimizer) raises ``ValueError`` naming
    it, so a typo in a sweep cannot pass silently; ``None`` values are ignored (meaning
    "the default").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    _check_int(num_workers, "num_workers")  # before sync turns it into its batch
    cls, fixed, allowed = METHODS[method]
    if isinstance(params, (torch.optim.Optimizer, UpdateRule)):
        if fixed.get("norm", "") is None:
            raise ValueError(f"method {method!r} is the built-in Euclidean rule; it takes no optimizer or update rule")
        allowed = tuple(k for k in allowed if k not in _RULE_KEYS)
        fixed = {k: v for k, v in fixed.items() if k not in _RULE_KEYS}
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

