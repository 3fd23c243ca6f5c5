"""A runtime :class:`~ringmaster_kernels.runtime.trainer.Task` on the virtual clock.

The Ringmaster LMO authors run their NanoChat experiment in ONE process on ONE device:
the n "workers" share one model; worker i's gradient takes a virtual time
``tau_i + |N(0, (0.05 tau_i)^2)|`` with ``tau_i = base * sqrt(i)`` (or ``base * i``),
``base`` the measured mean time of one gradient; gradients are delivered in order of
their return times. :class:`TaskObjective` makes any task an
:class:`~ringmaster_kernels.runtime.objectives.Objective` of the simulator, so that
protocol is :func:`~ringmaster_kernels.runtime.simulator.simulate` with the same policy
objects and the task's own update rule (e.g. NanoChat's recipe) as the real runtime.

Differences from the real clock, by design: a gradient is computed when it is used (at
the parameters of the version its job started from, which the simulator keeps), so a
discarded or cancelled job costs nothing; each worker reads its own data stream, so the
data a gradient sees depends only on the worker and how many gradients it delivered.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from .layout import param_layout
from .objectives import Objective, hessian_vector_product, twice_differentiable
from .time_models import TimeModel
from .worker import open_stream

PROFILES = ("sqrt", "linear", "uniform")


def profile_factors(profile: str, n: int) -> np.ndarray:
    """``f(i)`` for i = 1..n: ``sqrt(i)``, ``i`` or 1 (the speeds of workers relative to the fastest)."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    i = np.arange(1, n + 1, dtype=np.float64)
    return {"sqrt": np.sqrt(i), "linear": i, "uniform": np.ones(n)}[profile]


def authors_time_model(base: float, profile: str, n: int, jitter: float = 0.05) -> TimeModel:
    """``tau_i = base * f(i)`` plus ``|N(0, (jitter * tau_i)^2)|`` per call (the authors' NanoChat protocol)."""
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a finite number of seconds > 0, got {base!r}")
    tau = base * profile_factors(profile, n)
    return TimeModel(base=tau, scale=jitter * tau, noise="halfnormal")


class TaskObjective(Objective):
    """A task as a simulator objective: gradients on one replica, each worker's own data.

    Args:
        task: the runtime task (``build_model``, ``loss``, ``evaluate``, data).
        model: the master model the policy's update rule steps (its parameters are what
            the simulator snapshots, in the rule's order).
        params: the rule's tensors (``policy.params``), parameters of ``model``.
        num_workers: workers of the time model (one data stream each).
        batch_size, accum_steps: per gradient, as a real worker's.
        seed: data-stream seed (for tasks that sample).
        device: where the replica computes.
    """

    def __init__(self, task: Any, model: torch.nn.Module, params: Sequence[torch.Tensor], *, num_workers: int,
                 batch_size: int, accum_steps: int = 1, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.task = task
        self.metric_name = getattr(task, "metric_name", "held-out loss")
        self.device = torch.device(device)
        self.accum_steps, self.batch_size, self.seed = accum_steps, batch_size, seed
        name_of = {id(p): name for name, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in name_of]
        if missing:
            raise ValueError(f"params: tensor {missing[0]} is not a parameter of model")
        self.names = [name_of[id(p)] for p in params]
        self.replica = task.build_model().to(self.device)
        replica = dict(self.replica.named_parameters())
        self._replica_params = [replica[name] for name in self.names]
        self.streams = [open_stream(task, w, num_workers, batch_size, self.device, seed) for w in range(num_workers)]
        self.losses: list[float] = []  # training loss of every gradient computed, in order
        self._last_loss = math.nan  # of the latest gradient_at

    def _load(self, params: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for dst, src in zip(self._replica_params, params):
                dst.copy_(src)

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        grads = self.gradient_at(params, self.sample(rng, worker))
        self.losses.append(self._last_loss)
        return grads

    def sample(self, rng: np.random.Generator, worker: int = 0) -> list[Any]:
        """The ``accum_steps`` micro-batches of one gradient, from ``worker``'s stream."""
        return [self.streams[worker].next_batch() for _ in range(self.accum_steps)]

    def gradient_at(self, params: Sequence[torch.Tensor], batch: list[Any]) -> list[torch.Tensor]:
        self._load(params)
        self.replica.zero_grad(set_to_none=True)
        total = 0.0
        for micro in batch:
            loss = self.task.loss(self.replica, micro) / self.accum_steps
            loss.backward()
            total += float(loss.detach())
        self._last_loss = total
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self._replica_params]

    def hessian_vector(self, params: Sequence[torch.Tensor], d: Sequence[torch.Tensor], batch: list[Any]) -> list[torch.Tensor]:
        """``H d`` on the micro-batches, by double backward through the replica."""
        self._load(params)
        with torch.enable_grad(), twice_differentiable():
            loss = sum(self.task.loss(self.replica, micro) for micro in batch) / self.accum_steps
            return hessian_vector_product(loss, self._replica_params, d)

    def job_gradient(self, params: Sequence[torch.Tensor], previous: Sequence[torch.Tensor], job: str,
                     rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        """As ``Objective.job_gradient``; the training loss logged is the one at ``params``."""
        batch = self.sample(rng, worker)
        grads = self.gradient_at(params, batch)
        self.losses.append(self._last_loss)
        return grads + self._extra(params, previous, job, batch, rng)

    def metric(self, params: Sequence[torch.Tensor]) -> float:
        self._load(params)
        was_training = self.replica.training
        self.replica.eval()
        try:
            with torch.no_grad():
                return float(self.task.evaluate(self.replica))
        finally:
            self.replica.train(was_training)

    def measure_base(self, params: Sequence[torch.Tensor], repeats: int = 5) -> float:
        """Mean wall seconds of one gradient on this device, after one warm-up call; the
        calls read a stream of their own, so the run's data streams are untouched."""
        probe = open_stream(self.task, 0, len(self.streams), self.batch_size, self.device, self.seed + 7919)
        self._load(params)
        seconds = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            self.replica.zero_grad(set_to_none=True)
            for _ in range(self.accum_steps):
                (self.task.loss(self.replica, probe.next_batch()) / self.accum_steps).backward()
            seconds.append(time.perf_counter() - t0)
        self.replica.zero_grad(set_to_none=True)
        return float(np.mean(seconds[1:]))

    def state_dict(self) -> dict:
        return {"streams": [s.state_dict() for s in self.streams], "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        for stream, saved in zip(self.streams, state["streams"], strict=True):
            stream.load_state_dict(saved)
        self.losses = [float(x) for x in state["losses"]]


def master_model(task: Any, seed: int, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """The master model (seeded as the real runtime seeds it) and its update rule: the
    task's ``update_rule`` or, without one, the built-in rule's groups from ``group_of``."""
    torch.manual_seed(seed)
    model = task.build_model().to(device)
    factory = getattr(task, "update_rule", None)
    if factory is not None:
        return model, factory(model)
    _, groups = param_layout(task, model)
    params = dict(model.named_parameters())
    plain = {name: p.detach() for name, p in params.items()}  # the built-in rule updates plain tensors in place
    return model, [{"params": [plain[name] for name in names], **options} for options, names in groups]
