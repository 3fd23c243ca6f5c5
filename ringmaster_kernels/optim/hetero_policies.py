"""Asynchronous methods for heterogeneous data (worker i has its own f_i, f = mean f_i).

Plain ASGD and Ringmaster weight every worker by how often it delivers, so they converge
to a stationary point of ``sum_i (1/tau_i) f_i / sum_i (1/tau_i)``, not of ``f``. These
three policies give every worker the same weight (see ``shared/ALGORITHMS.md``,
"Heterogeneous data"); all take a Euclidean step ``x <- x - gamma g`` through the
built-in rule (``norm=None``, no momentum), as in their papers.

* :class:`RescaledASGD` (Mahran, Maranjyan, Richtarik): ASGD with a per-worker step
  ``gamma_i = gamma * tau_i / tau_max`` (this normalisation is *inferred* from the
  abstract). ``worker_times`` gives the times; without it they are the running mean of
  the measured times the driver reports through :meth:`Policy.observe_time` (the
  simulator does; the real runtime does not yet, so there pass ``worker_times``).
* :class:`Ringleader` (Maranjyan, Richtarik): a table of per-worker gradient sums and
  counts; phase 1 collects until every worker has an entry, phase 2 makes exactly n
  updates, one per worker, each with ``g = (1/n) sum_i G_i / b_i``. How an arrival in
  phase 2 enters the table is *inferred*: from a worker not yet updated this round it is
  added to the table and triggers that worker's update; from one already updated it goes
  to the buffer, which becomes the next round's table.
* :class:`Malenia` (Tyurin, Richtarik): every round all workers compute at ``x^k``;
  wait until ``(1/n sum_i 1/B_i)^(-1) >= S/n`` (the paper's condition, taken as ``>=``,
  so that ``S = n`` means one gradient from everyone), then step with
  ``g = (1/n) sum_i (1/B_i) sum_j grad f_i(x^k; xi_ij)``; every worker restarts at the new
  point.

A lost worker (``remove_worker``) leaves the average: the methods then weight the
remaining workers equally.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .policies import METHODS, Decision, GradientSource, Policy


def _add(acc: list[torch.Tensor] | None, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if acc is None:
        return [g.detach().clone() for g in grads]
    for a, g in zip(acc, grads):
        a.add_(g)
    return acc


def _mean_of_means(sums: Sequence[list[torch.Tensor] | None], counts: np.ndarray, alive: np.ndarray) -> list[torch.Tensor]:
    """``(1/|alive|) sum_{i alive} sums_i / counts_i`` (every alive worker has counts_i >= 1)."""
    workers = np.nonzero(alive)[0]
    out = [torch.zeros_like(t) for t in sums[int(workers[0])]]
    for i in workers:
        for o, s in zip(out, sums[int(i)]):
            o.add_(s, alpha=1.0 / float(counts[i]))
    for o in out:
        o.div_(len(workers))
    return out


def _check_per_worker(state: dict[str, Any], key: str, n: int, kind: type) -> None:
    """``state[key]``: n finite values >= 0 of ``kind`` (``bool`` for flags), before anything changes."""
    values = state[key]
    ok = isinstance(values, (list, tuple)) and len(values) == n and all(
        isinstance(v, bool) if kind is bool else
        (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
         and (kind is float or float(v).is_integer()))
        for v in values)
    if not ok:
        raise ValueError(f"state: {key} must hold {n} {'flags' if kind is bool else 'finite numbers >= 0'}, one per worker")


def _check_gradient_table(state: dict[str, Any], key: str, params: Sequence[torch.Tensor], n: int) -> None:
    """``state[key]``: per worker, None or one floating tensor per parameter, of its shape."""
    table = state[key]
    if not isinstance(table, (list, tuple)) or len(table) != n or not all(
        entry is None or (isinstance(entry, (list, tuple)) and len(entry) == len(params) and all(
            isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == p.shape for t, p in zip(entry, params)))
        for entry in table
    ):
        raise ValueError(f"state: {key} must hold, per worker, None or one tensor per parameter of its shape")


class RescaledASGD(Policy):
    """ASGD applying worker i's gradient with step ``gamma * tau_i / tau_max``.

    Args:
        worker_times: known mean compute time per worker (n numbers > 0), or ``None`` to
            estimate them online from :meth:`observe_time` (a worker not yet measured does
            not count in ``tau_max``).
        **kwargs: see :class:`Policy` (``lr`` is ``gamma``).
    """

    name = "rescaled_asgd"

    def __init__(self, params, *, worker_times: Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        n = self.num_workers
        self.known = worker_times is not None
        if self.known:
            times = np.asarray(worker_times, dtype=np.float64)
            if times.shape != (n,) or not np.all(np.isfinite(times) & (times > 0)):
                raise ValueError(f"worker_times must be {n} finite numbers > 0, got shape {times.shape}")
            self.time_sum, self.time_count = times.copy(), np.ones(n)
        else:
            self.time_sum, self.time_count = np.zeros(n), np.zeros(n)
        self._factor = 1.0

    def observe_time(self, worker: int, seconds: float) -> None:
        if not self.known:
            self.time_sum[worker] += seconds
            self.time_count[worker] += 1

    def step_factor(self, worker: int) -> float:
        """``tau_worker / tau_max`` from the known or estimated times (1 before any measurement)."""
        measured = self.time_count > 0
        if not measured[worker]:
            return 1.0
        tau = self.time_sum[measured] / self.time_count[measured]
        return float(self.time_sum[worker] / self.time_count[worker] / tau.max())

    def on_gradient(self, worker: int, version: int, grad: GradientSource) -> Decision:
        delay = self._check_arrival(worker, version)
        self._factor = self.step_factor(worker)
        self._step(self._materialize(grad), delay)
        self.accepted += 1
        return Decision(accepted=True, advanced=True, version=self.version, delay=delay)

    def _lr_factor(self, delay: int) -> float:
        return self._factor

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "known_times": self.known}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "time_sum": self.time_sum.tolist(), "time_count": self.time_count.tolist()}

    def _check_state(self, state: dict[str, Any]) -> None:
        super()._check_state(state)
        _check_per_worker(state, "time_sum", self.num_workers, float)
        _check_per_worker(state, "time_count", self.num_workers, float)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.time_sum, self.time_count = np.array(state["time_sum"]), np.array(state["time_count"])


class _Tables(Policy):
    """Per-worker gradient sums and counts over the alive workers (shared by Ringleader and Malenia)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        n = self.num_workers
        self.sums: list[list[torch.Tensor] | None] = [None] * n
        self.counts = np.zeros(n, dtype=np.int64)
        self.alive = np.ones(n, dtype=bool)

    def remove_worker(self, worker: int) -> Decision | None:
        super().remove_worker(worker)
        self.alive[worker] = False
        return None

    def state_dict(self) -> dict[str, Any]:
        copy = [None if s is None else [t.clone() for t in s] for s in self.sums]
        return {**super().state_dict(), "sums": copy, "counts": self.counts.tolist(), "alive": self.alive.tolist()}

    def _check_state(self, state: dict[str, Any]) -> None:
        super()._check_state(state)
        n = self.num_workers
        _check_gradient_table(state, "sums", self.params, n)
        _check_per_worker(state, "counts", n, int)
        _check_per_worker(state, "alive", n, bool)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sums = [None if s is None else [t.clone() for t in s] for s in state["sums"]]
        self.counts, self.alive = np.array(state["counts"], dtype=np.int64), np.array(state["alive"], dtype=bool)


class Ringleader(_Tables):
    """Ringleader ASGD: rounds of "fill the table" then n updates, one per worker (see the module doc)."""

    name = "ringleader"

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        n = self.num_workers
        self.buffer: list[list[torch.Tensor] | None] = [None] * n
        self.buffer_counts = np.zeros(n, dtype=np.int64)
        self.updated = np.zeros(n, dtype=bool)

    @property
    def filling(self) -> bool:
        """Phase 1: some alive worker has no table entry yet."""
        return bool(np.any(self.alive & (self.counts == 0)))

    def on_gradient(self, worker: int, version: int, grad: GradientSource) -> Decision:
        delay = self._check_arrival(worker, version)
        grads = self._materialize(grad)
        self.accepted += 1
        if not self.filling and self.updated[worker]:
            self.buffer[worker] = _add(self.buffer[worker], grads)
            self.buffer_counts[worker] += 1
            return Decision(accepted=True, advanced=False, version=self.version, delay=delay)
        was_filling = self.filling
        self.sums[worker] = _add(self.sums[worker], grads)
        self.counts[worker] += 1
        if was_filling:  # phase 1 makes no update, even on the arrival that completes it
            return Decision(accepted=True, advanced=False, version=self.version, delay=delay)
        self._step(_mean_of_means(self.sums, self.counts, self.alive), delay)
        self.updated[worker] = True
        if np.all(self.updated[self.alive]):  # the round's n updates are done: the buffer is the next table
            self.sums, self.counts = self.buffer, self.buffer_counts
            self.buffer, self.buffer_counts = [None] * self.num_workers, np.zeros(self.num_workers, dtype=np.int64)
            self.updated[:] = False
        return Decision(accepted=True, advanced=True, version=self.version, delay=delay)

    def state_dict(self) -> dict[str, Any]:
        buffer = [None if s is None else [t.clone() for t in s] for s in self.buffer]
        return {**super().state_dict(), "buffer": buffer, "buffer_counts": self.buffer_counts.tolist(),
                "updated": self.updated.tolist()}

    def _check_state(self, state: dict[str, Any]) -> None:
        super()._check_state(state)
        n = self.num_workers
        _check_gradient_table(state, "buffer", self.params, n)
        _check_per_worker(state, "buffer_counts", n, int)
        _check_per_worker(state, "updated", n, bool)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer = [None if s is None else [t.clone() for t in s] for s in state["buffer"]]
        self.buffer_counts = np.array(state["buffer_counts"], dtype=np.int64)
        self.updated = np.array(state["updated"], dtype=bool)


class Malenia(_Tables):
    """Malenia SGD: gradients at one point from everyone until the harmonic-mean condition holds.

    Args:
        batch: ``S`` of the condition ``(1/n sum_i 1/B_i)^(-1) >= S/n`` (default ``n``:
            at least one gradient from every worker). After a worker is lost, the
            harmonic mean runs over the m workers left and ``S`` shrinks to ``S m / n``.
    """

    name = "malenia"

    def __init__(self, params, *, batch: int | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ValueError(f"batch must be None or an int >= 1, got {batch!r}")
        self.batch = self.num_workers if batch is None else batch

    def ready(self) -> bool:
        """The condition over the alive workers (a worker with ``B_i = 0`` makes it false)."""
        counts = self.counts[self.alive]
        if counts.size == 0 or np.any(counts == 0):
            return False
        # S/n with S shrunk in proportion to the workers left (S = n: one gradient from each alive worker)
        return counts.size / float(np.sum(1.0 / counts)) >= self.batch / self.num_workers

    def on_gradient(self, worker: int, version: int, grad: GradientSource) -> Decision:
        delay = self._check_arrival(worker, version)
        if delay > 0:  # computed at an older point: not part of this round
            self.discarded += 1
            return Decision(accepted=False, advanced=False, version=self.version, delay=delay)
        self.sums[worker] = _add(self.sums[worker], self._materialize(grad))
        self.counts[worker] += 1
        self.accepted += 1
        if not self.ready():
            return Decision(accepted=True, advanced=False, version=self.version, delay=delay)
        return self._apply(delay, accepted=True)

    def _apply(self, delay: int, accepted: bool) -> Decision:
        self._step(_mean_of_means(self.sums, self.counts, self.alive), delay)
        self.sums, self.counts = [None] * self.num_workers, np.zeros(self.num_workers, dtype=np.int64)
        return Decision(accepted=accepted, advanced=True, version=self.version, delay=delay, cancel_before=self.version)

    def remove_worker(self, worker: int) -> Decision | None:
        """The round stops waiting for a lost worker; a round now complete is applied at once."""
        super().remove_worker(worker)
        if self.alive.any() and self.ready():
            return self._apply(0, accepted=False)
        return None

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "batch": self.batch}


_EUCLIDEAN = {"norm": None, "momentum": 0.0}
# make_policy and the CLIs know these by name (optim/__init__.py imports this module, so
# they are registered whenever the policies are)
METHODS.update({
    "rescaled_asgd": (RescaledASGD, _EUCLIDEAN, ("lr", "backend", "worker_times")),
    "ringleader": (Ringleader, _EUCLIDEAN, ("lr", "backend")),
    "malenia": (Malenia, _EUCLIDEAN, ("lr", "backend", "batch")),
})
