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

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..optim.policies import Decision, Policy
from .metrics import curve_metrics, time_to
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
            jobs in flight at the end (see :attr:`accounting_ok`).
        lost: jobs in flight when their worker died.
        in_flight: jobs running when the trace was taken (they end after it).
        end_time: virtual time the run stopped (the horizon, or the last event when no
            job can end any more).
        metric_name: what ``metric`` is.
        wall_s: host seconds the simulation took.
        stopped: ``stop_if`` ended the run at ``end_time``, before the horizon.
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
    in_flight: int = 0
    wall_s: float = 0.0
    stopped: bool = False

    @property
    def num_accepted(self) -> int:
        return int(self.accepted.sum())

    @property
    def accounting_ok(self) -> bool:
        """Every started job is accounted for: it arrived (accepted or discarded), was
        cancelled in flight, was lost with its worker, or is still running."""
        arrivals = int((~self.death).sum())
        return self.started == arrivals + int(self.cancelled.sum()) + self.lost + self.in_flight

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

    def time_to(self, target: float) -> tuple[float | None, float | None]:
        """``(first_hit, sustained)`` virtual times for ``target`` (see :func:`metrics.time_to`)."""
        return time_to(*self.curve(), target)

    def metrics(self, target: float, horizon: float | None = None) -> dict[str, Any]:
        """``time_to_target`` (sustained), ``first_hit``, ``final``, ``tail_median`` over the last
        quarter of ``horizon`` (default: ``end_time``); see :mod:`~ringmaster_kernels.runtime.metrics`."""
        return curve_metrics(*self.curve(), target, self.end_time if horizon is None else horizon)

    def delay_histogram(self, bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """``numpy.histogram`` of the delays of accepted gradients."""
        return np.histogram(self.delay[self.accepted], bins=bins)


def simulate(policy: Policy, objective: Objective, time_model: TimeModel, **options: Any) -> Trace:
    """Run ``policy`` on ``objective`` with workers timed by ``time_model`` to the end:
    ``Simulation(policy, objective, time_model, **options).run()`` (see :class:`Simulation`)."""
    return Simulation(policy, objective, time_model, **options).run()


class Simulation:
    """One simulated run that can pause, be checkpointed and resume bit for bit.

    Args:
        policy: built on ``objective.initial_params()`` (or over the same tensors through
            an update rule) with ``num_workers`` equal to ``time_model.num_workers``.
        objective: supplies gradients (``gradient(params, rng, worker)``) and the metric.
        time_model: per-worker compute times.
        horizon: virtual time at which to stop (> 0).
        seed: an int >= 0, the run's only source of randomness.
        record_every: measure the metric after every this many updates (>= 1).
        max_events: stop after this many arrivals (>= 1; ``None``: no limit).
        stop_if: ``stop_if(time, metric) -> bool``, asked after every measurement; the run
            ends when it says so (``None``: never), e.g. :func:`metrics.cannot_beat`.
        progress: called with the current virtual time now and then (e.g. a tqdm update).

    :meth:`run` goes on until the horizon (or
    ``pause_after`` arrivals in total) and returns the :class:`Trace` so far;
    :meth:`state_dict` holds everything needed to continue (the policy and its update
    rule, the parameters, job times and versions, parameter snapshots, random streams,
    the objective's data positions when it has ``state_dict``, the rows so far), as plain
    tensors and numbers that ``torch.load(weights_only=True)`` reads.
    """

    def __init__(
        self,
        policy: Policy,
        objective: Objective,
        time_model: TimeModel,
        *,
        horizon: float,
        seed: int = 0,
        record_every: int = 1,
        max_events: int | None = None,
        stop_if: Callable[[float, float], bool] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        n = time_model.num_workers
        if policy.num_workers != n:
            raise ValueError(f"policy.num_workers ({policy.num_workers}) must equal the time model's workers ({n})")
        if isinstance(horizon, bool) or not (
            isinstance(horizon, (int, float)) and math.isfinite(horizon) and horizon > 0
        ):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
        if isinstance(record_every, bool) or not isinstance(record_every, int) or record_every < 1:
            raise ValueError(f"record_every must be an int >= 1, got {record_every!r}")
        # None would draw fresh OS entropy: a run that silently differs every time.
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if max_events is not None and (isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1):
            raise ValueError(f"max_events must be None or an int >= 1, got {max_events!r}")
        self.policy, self.objective, self.time_model = policy, objective, time_model
        self.horizon, self.record_every, self.max_events = float(horizon), record_every, max_events
        self.stop_if, self.progress = stop_if, progress
        self.n = n
        self.time_rng, self.grad_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
        self.sample = time_model.sampler(self.time_rng)
        # deaths in time order (ties: lowest worker id); each is an event, like an arrival
        self.death_time = time_model.death_time
        dying = np.argsort(self.death_time, kind="stable")
        self.dying = dying[np.isfinite(self.death_time[dying])].tolist()
        self.finish = np.full(n, np.inf)  # job end times; inf: idle, dead or waiting
        self.begin = np.zeros(n)  # job start times, for policies that measure compute times
        self.start_version = np.zeros(n, dtype=np.int64)
        self.idle = np.zeros(n, dtype=bool)
        self.snapshots: dict[int, list[torch.Tensor]] = {}
        self._job: str | None = getattr(policy.rule, "job", None)  # see LMOMomentum.job
        # one row per event: (time, worker, delay, accepted, version, cancelled, metric, death)
        self.rows: list[tuple] = []
        self.started = 0
        self.lost = 0
        self.now = 0.0
        self.events = 0
        self.updates_since_record = 0
        self.initial_metric: float | None = None
        self.ended = False
        self.stopped = False
        self.wall_s = 0.0

    # ------------------------------------------------------------------ events
    def _start(self, workers: int | np.ndarray) -> None:
        version = self.policy.version
        if version not in self.snapshots:
            # an MVR/HCM rule's jobs also read the version before (the rule keeps that copy)
            previous = self.policy.rule.previous if self._job is not None else []
            self.snapshots[version] = [p.detach().clone() for p in [*self.policy.params, *previous]]
        self.finish[workers] = self.now + self.sample(workers)
        self.begin[workers] = self.now
        self.start_version[workers] = version
        self.started += 1 if isinstance(workers, int) else workers.shape[0]

    def _gradient(self, snapshot: list[torch.Tensor], worker: int) -> Callable[[], list[torch.Tensor]]:
        """The job's lazy result: the gradient, or an MVR/HCM job's ``2 n`` tensors."""
        if self._job is None:
            return lambda: self.objective.gradient(snapshot, self.grad_rng, worker)
        n = len(self.policy.params)
        return lambda: self.objective.job_gradient(snapshot[:n], snapshot[n:], self._job, self.grad_rng, worker)

    def _prune(self) -> None:
        # keep only versions some running job started from (bounded by n + 1 entries)
        live = set(np.unique(self.start_version[np.isfinite(self.finish)]).tolist()) | {self.policy.version}
        for v in [v for v in self.snapshots if v not in live]:
            del self.snapshots[v]

    def _execute(self, worker: int, decision: Decision, death: bool) -> bool:
        """Carry out ``decision`` at ``now`` and record the event; ``death``: it came from
        ``policy.remove_worker(worker)``, so there is no arriving worker to restart.
        Returns whether ``stop_if`` ended the run."""
        if not death:
            if decision.restart:
                self._start(worker)
            else:
                self.idle[worker] = True
        cancelled = 0
        if decision.cancel_before is not None:
            victims = np.nonzero((self.start_version < decision.cancel_before) & np.isfinite(self.finish))[0]
            cancelled = victims.shape[0]
            if cancelled:
                self._start(victims)
        if decision.restart_idle:
            waiting = np.nonzero(self.idle)[0]
            self.idle[:] = False
            self._start(waiting)
        metric = math.nan
        stopped = False
        if decision.advanced:
            self.updates_since_record += 1
            if self.updates_since_record >= self.record_every:
                metric = self.objective.metric(self.policy.params)
                self.updates_since_record = 0
                stopped = self.stop_if is not None and bool(self.stop_if(self.now, metric))
        self.rows.append((self.now, worker, decision.delay, decision.accepted, decision.version, cancelled, metric, death))
        return stopped

    def run(self, pause_after: int | None = None) -> Trace:
        """Simulate until the end (horizon, ``max_events``, ``stop_if``, no job left) or
        until ``pause_after`` arrivals in total; returns the trace so far."""
        wall_start = time.perf_counter()
        policy, finish, death_time, dying = self.policy, self.finish, self.death_time, self.dying
        if self.initial_metric is None:
            self.initial_metric = self.objective.metric(policy.params)
            self._start(np.arange(self.n))
        stopped = False
        next_progress = self.now
        limit = self.max_events if pause_after is None else (
            pause_after if self.max_events is None else min(pause_after, self.max_events))
        paused = False
        while not self.ended:
            if limit is not None and self.events >= limit:
                paused = self.max_events is None or self.events < self.max_events
                break
            worker = int(np.argmin(finish))
            t = float(finish[worker])
            death = bool(dying) and death_time[dying[0]] < t  # a job ending exactly at a death is delivered
            if death:
                worker = dying[0]
                t = float(death_time[worker])
            if t > self.horizon:
                break
            self.now = t
            if death:
                dying.pop(0)
                # the worker is gone: its job never ends and no decision may restart it
                self.lost += int(np.isfinite(finish[worker]))
                finish[worker] = np.inf
                self.idle[worker] = False
                decision = policy.remove_worker(worker)
                if decision is None:
                    decision = Decision(accepted=False, advanced=False, version=policy.version, delay=0)
                stopped = self._execute(worker, decision, death=True)
            else:
                version = int(self.start_version[worker])
                policy.observe_time(worker, t - float(self.begin[worker]))
                decision = policy.on_gradient(worker, version, self._gradient(self.snapshots[version], worker))
                self.events += 1
                finish[worker] = np.inf
                stopped = self._execute(worker, decision, death=False)
            if stopped:
                break
            if len(self.snapshots) > 2 * self.n + 16:
                self._prune()
            if self.progress is not None and self.now >= next_progress:
                self.progress(self.now)
                next_progress = self.now + self.horizon / 200
        if not paused:
            self.ended = True
        ran_out = (self.max_events is not None and self.events >= self.max_events) or stopped or not np.isfinite(finish).any()
        end_time = self.now if (ran_out or paused) else self.horizon
        if self.progress is not None:
            self.progress(min(end_time, self.horizon))
        self.wall_s += time.perf_counter() - wall_start
        self.stopped = stopped
        return self.trace(end_time)

    def trace(self, end_time: float) -> Trace:
        rows = self.rows

        def column(i: int, dtype) -> np.ndarray:
            return np.fromiter((r[i] for r in rows), dtype=dtype, count=len(rows))

        return Trace(
            time=column(0, np.float64), worker=column(1, np.int64), delay=column(2, np.int64),
            accepted=column(3, bool), version=column(4, np.int64), cancelled=column(5, np.int64),
            metric=column(6, np.float64), death=column(7, bool),
            initial_metric=self.initial_metric, started=self.started, lost=self.lost, end_time=end_time,
            metric_name=self.objective.metric_name, in_flight=int(np.isfinite(self.finish).sum()), wall_s=self.wall_s,
            stopped=self.stopped,
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything :meth:`load_state_dict` needs to continue this run bit for bit."""
        objective_state = getattr(self.objective, "state_dict", None)
        return {
            "policy": self.policy.state_dict(),
            "params": [p.detach().clone() for p in self.policy.params],
            "objective": objective_state() if objective_state is not None else None,
            "grad_rng": self.grad_rng.bit_generator.state,
            "sampler": self.sample.state_dict(),
            "finish": torch.from_numpy(self.finish.copy()),
            "begin": torch.from_numpy(self.begin.copy()),
            "start_version": torch.from_numpy(self.start_version.copy()),
            "idle": torch.from_numpy(self.idle.copy()),
            "dying": list(self.dying),
            "snapshots": {int(v): [t.clone() for t in ts] for v, ts in self.snapshots.items()},
            "rows": [tuple(r) for r in self.rows],
            "counters": {"started": self.started, "lost": self.lost, "events": self.events,
                         "updates_since_record": self.updates_since_record},
            "now": self.now,
            "initial_metric": self.initial_metric,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` of a simulation built the same way. A state
        that does not fit is a ValueError and leaves the simulation as it was."""
        n = self.n
        for key in ("finish", "start_version", "idle"):
            if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != (n,):
                raise ValueError(f"state: {key} must be a tensor of shape ({n},), one entry per worker")
        params = state["params"]
        if not isinstance(params, (list, tuple)) or len(params) != len(self.policy.params) or not all(
                isinstance(t, torch.Tensor) and t.shape == p.shape for t, p in zip(params, self.policy.params)):
            raise ValueError("state: params must hold one tensor per policy parameter, of its shape")
        # each part validates itself while loading: put every part back if a later one fails
        before = copy.deepcopy(self.state_dict())
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            self._restore(before)
            raise ValueError(f"state does not fit this simulation: {type(exc).__name__}: {exc}") from None

    def _restore(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        with torch.no_grad():
            for p, saved in zip(self.policy.params, state["params"], strict=True):
                p.copy_(saved)
        if state["objective"] is not None:
            self.objective.load_state_dict(state["objective"])
        self.grad_rng.bit_generator.state = state["grad_rng"]
        self.sample.load_state_dict(state["sampler"])  # restores the time stream too
        self.finish[:] = state["finish"].numpy()
        if "begin" in state:  # absent from checkpoints written before policies measured times
            self.begin[:] = state["begin"].numpy()
        self.start_version[:] = state["start_version"].numpy()
        self.idle[:] = state["idle"].numpy()
        self.dying[:] = [int(w) for w in state["dying"]]
        self.snapshots = {int(v): [t.clone() for t in ts] for v, ts in state["snapshots"].items()}
        self.rows = [tuple(r) for r in state["rows"]]
        counters = state["counters"]
        self.started, self.lost, self.events = counters["started"], counters["lost"], counters["events"]
        self.updates_since_record = counters["updates_since_record"]
        self.now, self.initial_metric = float(state["now"]), state["initial_metric"]
