"""Virtual-time, event-driven simulation of heterogeneous workers driving one policy.

Worker ``i`` computes a gradient in a time drawn from a :class:`TimeModel`. The next
event is the earliest job end (ties: lowest worker id); its gradient is offered to the
policy *lazily*, at the parameters of the version the job started from, so discarded
gradients cost nothing. The policy's :class:`~ringmaster_kernels.optim.policies.Decision`
says who restarts, waits or is cancelled. Per-worker state lives in numpy arrays, so a
cancellation wave over thousands of workers is a few vector operations.

Two random streams come from ``numpy.random.SeedSequence(seed)``: compute times and
gradient noise. Given the seed, a run is reproducible bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..optim.policies import Policy
from .objectives import Objective
from .time_models import TimeModel


@dataclass
class Trace:
    """What happened, one row per arrival (numpy arrays of equal length).

    Attributes:
        time: virtual time of the arrival.
        worker: the worker whose job ended.
        delay: policy version at arrival minus the job's start version.
        accepted: the policy used the gradient.
        version: model version after the event.
        cancelled: in-flight jobs cancelled at this event.
        metric: the objective's metric after the event, NaN where not measured
            (it is measured after every ``record_every``-th update).
        initial_metric: the metric at the starting point (time 0).
        started: jobs started in total; ``accepted + discarded + cancelled + in flight``.
        end_time: virtual time the run stopped (the horizon, or the last event when no
            job can end any more).
        metric_name: what ``metric`` is.
        wall_s: host seconds the simulation took.
    """

    time: np.ndarray
    worker: np.ndarray
    delay: np.ndarray
    accepted: np.ndarray
    version: np.ndarray
    cancelled: np.ndarray
    metric: np.ndarray
    initial_metric: float
    started: int
    end_time: float
    metric_name: str
    wall_s: float = 0.0

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())

    @property
    def num_discarded(self) -> int:
        """Gradients started but never used: discarded on arrival plus cancelled in flight."""
        return int((~self.accepted).sum() + self.cancelled.sum())

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(times, metric)`` starting at ``(0, initial_metric)``, measured points only."""
        keep = ~np.isnan(self.metric)
        return np.concatenate([[0.0], self.time[keep]]), np.concatenate([[self.initial_metric], self.metric[keep]])

    def final_metric(self) -> float:
        return float(self.curve()[1][-1])

    def time_to_target(self, target: float) -> float | None:
        """First virtual time the metric is ``<= target`` (``None`` if never)."""
        times, values = self.curve()
        hit = np.nonzero(values <= target)[0]
        return float(times[hit[0]]) if hit.size else None

    def delay_histogram(self, bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """``numpy.histogram`` of the delays of accepted gradients."""
        return np.histogram(self.delay[self.accepted], bins=bins)


def simulate(
    policy: Policy,
    objective: Objective,
    time_model: TimeModel,
    *,
    horizon: float,
    seed: int = 0,
    record_every: int = 1,
    max_events: int | None = None,
    stop_at: float | None = None,
    progress: Callable[[float], None] | None = None,
) -> Trace:
    """Run ``policy`` on ``objective`` with workers timed by ``time_model`` until ``horizon``.

    Args:
        policy: built on ``objective.initial_params()`` with ``num_workers`` equal to
            ``time_model.num_workers``.
        objective: supplies gradients and the logged metric.
        time_model: per-worker compute times.
        horizon: virtual time at which to stop (> 0).
        seed: the run's only source of randomness.
        record_every: measure the metric after every this many updates (>= 1).
        max_events: stop after this many arrivals (``None``: no limit).
        stop_at: stop as soon as a measured metric is ``<= stop_at`` (``None``: never).
        progress: called with the current virtual time now and then (e.g. a tqdm update).

    Returns:
        A :class:`Trace`.
    """
    n = time_model.num_workers
    if policy.num_workers != n:
        raise ValueError(f"policy.num_workers ({policy.num_workers}) must equal the time model's workers ({n})")
    if not (isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0):
        raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
    if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be an int >= 1, got {record_every!r}")
    time_rng, grad_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    sample = time_model.sampler(time_rng)

    finish = np.full(n, np.inf)  # job end times; inf: idle, dead or waiting
    start_version = np.zeros(n, dtype=np.int64)
    idle = np.zeros(n, dtype=bool)
    snapshots: dict[int, list[torch.Tensor]] = {}
    decisions: list = []  # (time, worker, decision, cancelled, metric) per arrival
    started = 0
    now = 0.0

    def start(workers: int | np.ndarray) -> None:
        nonlocal started
        version = policy.version
        if version not in snapshots:
            snapshots[version] = [p.detach().clone() for p in policy.params]
        finish[workers] = now + sample(workers, now)
        start_version[workers] = version
        started += 1 if isinstance(workers, int) else workers.shape[0]

    def prune() -> None:
        # keep only versions some running job started from (bounded by n + 1 entries)
        live = set(np.unique(start_version[np.isfinite(finish)]).tolist()) | {policy.version}
        for v in [v for v in snapshots if v not in live]:
            del snapshots[v]

    wall_start = time.perf_counter()
    initial_metric = objective.metric(policy.params)
    start(np.arange(n))
    updates_since_record = 0
    events = 0
    reached = False
    next_progress = 0.0
    while max_events is None or events < max_events:
        worker = int(np.argmin(finish))
        t = float(finish[worker])
        if t > horizon:
            break
        now = t
        version = int(start_version[worker])
        snapshot = snapshots[version]
        decision = policy.on_gradient(worker, version, lambda: objective.gradient(snapshot, grad_rng))
        events += 1
        finish[worker] = np.inf
        if decision.restart:
            start(worker)
        else:
            idle[worker] = True
        cancelled = 0
        if decision.cancel_before is not None:
            victims = np.nonzero((start_version < decision.cancel_before) & np.isfinite(finish))[0]
            cancelled = victims.shape[0]
            if cancelled:
                start(victims)
        if decision.restart_idle:
            waiting = np.nonzero(idle)[0]
            idle[:] = False
            start(waiting)
        metric = math.nan
        reached = False
        if decision.advanced:
            updates_since_record += 1
            if updates_since_record >= record_every:
                metric = objective.metric(policy.params)
                updates_since_record = 0
                reached = stop_at is not None and metric <= stop_at
        decisions.append((now, worker, decision, cancelled, metric))
        if reached:
            break
        if len(snapshots) > 2 * n + 16:
            prune()
        if progress is not None and now >= next_progress:
            progress(now)
            next_progress = now + horizon / 200
    ran_out = (max_events is not None and events >= max_events) or reached or not np.isfinite(finish).any()
    end_time = now if ran_out else horizon
    if progress is not None:
        progress(min(end_time, horizon))
    def column(values, dtype) -> np.ndarray:
        return np.fromiter(values, dtype=dtype, count=len(decisions))

    return Trace(
        time=column((r[0] for r in decisions), np.float64),
        worker=column((r[1] for r in decisions), np.int64),
        delay=column((r[2].delay for r in decisions), np.int64),
        accepted=column((r[2].accepted for r in decisions), bool),
        version=column((r[2].version for r in decisions), np.int64),
        cancelled=column((r[3] for r in decisions), np.int64),
        metric=column((r[4] for r in decisions), np.float64),
        initial_metric=initial_metric,
        started=started,
        end_time=end_time,
        metric_name=objective.metric_name,
        wall_s=time.perf_counter() - wall_start,
    )
