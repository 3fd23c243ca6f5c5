"""Virtual-time, event-driven simulation of heterogeneous workers driving one policy.

Worker ``i`` computes a gradient in a time drawn from a :class:`TimeModel`. The next
event is the earliest job end (ties: lowest worker id); its gradient is offered to the
policy *lazily*, at the parameters of the version the job started from, so discarded
gradients cost nothing. The policy's :class:`~ringmaster_kernels.optim.policies.Decision`
says who restarts, waits or is cancelled. Per-worker state lives in numpy arrays, so a
cancellation wave over thousands of workers is a few vector operations.

A worker's death (``TimeModel.death_time``) is an event too, after any job end at the
same time: its job is lost, and the simulator calls ``policy.remove_worker`` once and
executes the returned decision exactly as an arrival's (a synchronous barrier stops
waiting for it), as the real runtime (``runtime/trainer.py``) does for a lost worker.

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

from ..optim.policies import Decision, Policy
from .objectives import Objective
from .time_models import TimeModel


@dataclass
class Trace:
    """What happened, one row per event: an arrival, or a worker's death (numpy arrays of equal length).

    Attributes:
        time: virtual time of the event.
        worker: the worker whose job ended, or who died.
        delay: policy version at arrival minus the job's start version (0 for a death).
        accepted: the policy used the gradient (``False`` for a death).
        version: model version after the event.
        cancelled: in-flight jobs cancelled at this event.
        metric: the objective's metric after the event, NaN where not measured
            (it is measured after every ``record_every``-th update).
        death: the row is the worker's death: ``policy.remove_worker`` was called and
            its decision executed (a death may advance the model: a barrier completes).
        initial_metric: the metric at the starting point (time 0).
        started: jobs started in total; ``num_accepted + num_discarded + lost`` plus the
            jobs in flight at the end.
        lost: jobs in flight when their worker died.
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
    death: np.ndarray
    initial_metric: float
    started: int
    lost: int
    end_time: float
    metric_name: str
    wall_s: float = 0.0

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())

    @property
    def num_discarded(self) -> int:
        """Gradients started but never used: discarded on arrival plus cancelled in flight."""
        return int((~self.accepted & ~self.death).sum() + self.cancelled.sum())

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
    # deaths in time order (ties: lowest worker id); each is an event, like an arrival
    death_time = time_model.death_time
    dying = np.argsort(death_time, kind="stable")
    dying = dying[np.isfinite(death_time[dying])].tolist()

    finish = np.full(n, np.inf)  # job end times; inf: idle, dead or waiting
    start_version = np.zeros(n, dtype=np.int64)
    idle = np.zeros(n, dtype=bool)
    snapshots: dict[int, list[torch.Tensor]] = {}
    rows: list = []  # (time, worker, decision, cancelled, metric, death) per event
    started = 0
    lost = 0
    now = 0.0
    updates_since_record = 0

    def start(workers: int | np.ndarray) -> None:
        nonlocal started
        version = policy.version
        if version not in snapshots:
            snapshots[version] = [p.detach().clone() for p in policy.params]
        finish[workers] = now + sample(workers)
        start_version[workers] = version
        started += 1 if isinstance(workers, int) else workers.shape[0]

    def prune() -> None:
        # keep only versions some running job started from (bounded by n + 1 entries)
        live = set(np.unique(start_version[np.isfinite(finish)]).tolist()) | {policy.version}
        for v in [v for v in snapshots if v not in live]:
            del snapshots[v]

    def execute(worker: int, decision: Decision, death: bool) -> bool:
        """Carry out ``decision`` at ``now`` and record the event; ``death``: it came from
        ``policy.remove_worker(worker)``, so there is no arriving worker to restart.
        Returns whether the metric reached ``stop_at``."""
        nonlocal updates_since_record
        if not death:
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
        rows.append((now, worker, decision, cancelled, metric, death))
        return reached

    wall_start = time.perf_counter()
    initial_metric = objective.metric(policy.params)
    start(np.arange(n))
    events = 0
    reached = False
    next_progress = 0.0
    while max_events is None or events < max_events:
        worker = int(np.argmin(finish))
        t = float(finish[worker])
        death = bool(dying) and death_time[dying[0]] < t  # a job ending exactly at a death is delivered
        if death:
            worker = dying[0]
            t = float(death_time[worker])
        if t > horizon:
            break
        now = t
        if death:
            dying.pop(0)
            # the worker is gone: its job never ends and no decision may restart it
            lost += int(np.isfinite(finish[worker]))
            finish[worker] = np.inf
            idle[worker] = False
            decision = policy.remove_worker(worker)
            if decision is None:
                decision = Decision(accepted=False, advanced=False, version=policy.version, delay=0)
            reached = execute(worker, decision, death=True)
        else:
            version = int(start_version[worker])
            snapshot = snapshots[version]
            decision = policy.on_gradient(worker, version, lambda: objective.gradient(snapshot, grad_rng))
            events += 1
            finish[worker] = np.inf
            reached = execute(worker, decision, death=False)
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
        return np.fromiter(values, dtype=dtype, count=len(rows))

    return Trace(
        time=column((r[0] for r in rows), np.float64),
        worker=column((r[1] for r in rows), np.int64),
        delay=column((r[2].delay for r in rows), np.int64),
        accepted=column((r[2].accepted for r in rows), bool),
        version=column((r[2].version for r in rows), np.int64),
        cancelled=column((r[3] for r in rows), np.int64),
        metric=column((r[4] for r in rows), np.float64),
        death=column((r[5] for r in rows), bool),
        initial_metric=initial_metric,
        started=started,
        lost=lost,
        end_time=end_time,
        metric_name=objective.metric_name,
        wall_s=time.perf_counter() - wall_start,
    )
