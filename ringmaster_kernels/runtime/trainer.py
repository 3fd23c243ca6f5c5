"""The real asynchronous training loop: one server thread, one thread per worker.

:class:`AsyncTrainer` composes the runtime's rooms: the flat parameter layout
(``layout.py``), the server loop with the policy and the books (``server.py``), the
worker loop and worker bodies (``worker.py``), checkpoints (``checkpoint.py``) and
reporting (``reporting.py``). What it trains is a :class:`Task`; how an accepted
gradient changes the model is the task's update rule (any ``torch.optim.Optimizer``
with a per-version schedule, e.g. NanoChat's recipe) or, by default, the built-in
LMO-momentum math over the task's norm groups. The delay rule is the policy's, the
same object the virtual-time simulator drives.
"""
from __future__ import annotations

import copy
import math
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ..optim.policies import make_policy
from . import checkpoint
from .layout import FlatLayout, master_update_rule, param_layout
from .reporting import History, progress_line, summary
from .server import Server
from .worker import FAULT_KINDS, Fault, Job, LocalWorker, WorkerBody, worker_main

__all__ = ["AsyncTrainer", "Task", "Fault", "FAULT_KINDS", "Job", "LocalWorker", "WorkerBody", "FlatLayout",
           "param_layout"]


class Task(Protocol):
    """What the runtime trains: a model, its update rule or norm groups, data and a metric.

    Required: ``build_model()`` returns a fresh module (the trainer seeds torch first);
    ``loss(model, batch)`` a scalar tensor; ``evaluate(model)`` a held-out metric
    (float, lower is better); and data, either ``sample(batch_size, generator, device)``
    or ``data_stream(worker=, num_workers=, batch_size=, device=, seed=)`` returning a
    :class:`~ringmaster_kernels.runtime.worker.DataStream` per worker.

    The update: ``update_rule(model)`` returns a ``torch.optim.Optimizer`` or an
    :class:`~ringmaster_kernels.optim.update_rules.UpdateRule` over ``model``'s
    parameters (the server's master copy); without it, ``group_of(name)`` gives each
    parameter's options of the built-in LMO rule, e.g. ``{"norm": "spectral"}``.

    Optional: ``metric_name`` (str); ``export(model, policy, version, metric)`` writes the
    final model in the task's own format after the runtime's final checkpoint (its return
    value is kept as ``trainer.exported``).
    """

    def build_model(self) -> nn.Module: ...
    def group_of(self, name: str) -> dict: ...
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module) -> float: ...


def _check_positive_int(name: str, value: object, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")


def _check_seconds(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds > 0 or None, got {value!r}")


class AsyncTrainer:
    """Asynchronous training of ``task`` by ``workers`` under one async method.

    Args:
        task: see :class:`Task`.
        workers: one body per worker (:class:`LocalWorker`, ``RemoteWorker``), at least one.
        method: a name from :data:`ringmaster_kernels.optim.policies.METHODS`.
        policy_options: keyword arguments of :func:`make_policy` (``threshold``,
            ``batch``; for the built-in rule also ``lr``, ``momentum``, ``norm`` ...).
        server_device: where the master parameters, optimizer state and slots live.
        seed: seeds the initial model and every worker's data stream.
        num_slots: gradient slots in the pool (default: workers + 2; each worker holds at
            most one at a time).
        hang_timeout: seconds without a heartbeat while computing after which a worker
            is dropped (``None``: never).
        checkpoint_path: where :meth:`save_checkpoint` writes; written every
            ``checkpoint_every`` updates (if set) and when the run stops.
        log: called with one progress line every ``log_every`` seconds (``None``: quiet).
        eval_every: seconds between held-out evaluations during the run (``None``: only
            at the start and the end).
        torch_threads: intra-op threads for the run (the pool is process-wide; on a small
            CPU each worker thread should compute single-threaded).
        gil_switch_interval: ``sys.setswitchinterval`` during the run (process-wide,
            restored after): bounds how long the server waits for the GIL.
        worker_niceness: how much lower the worker threads' CPU priority is than the
            server's (Linux ``nice``, 0..19; 0: equal). With more threads than cores the
            server waits for a core behind the workers at every record; a lower worker
            priority cuts that wait, but on a machine other processes load it also cuts
            the workers' share of the CPU (see benchmarks/server_wall_breakdown.py).
    """

    def __init__(
        self,
        task: Task,
        workers: Sequence[WorkerBody],
        method: str = "ringmaster",
        policy_options: dict | None = None,
        *,
        server_device: str | torch.device = "cpu",
        seed: int = 0,
        num_slots: int | None = None,
        hang_timeout: float | None = 60.0,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        log: Callable[[str], None] | None = None,
        log_every: float = 5.0,
        eval_every: float | None = None,
        torch_threads: int | None = None,
        gil_switch_interval: float = 2e-4,
        worker_niceness: int = 0,
    ) -> None:
        if not workers:
            raise ValueError("workers must name at least one worker")
        _check_positive_int("num_slots", num_slots)
        _check_positive_int("checkpoint_every", checkpoint_every)
        _check_positive_int("torch_threads", torch_threads)
        _check_seconds("hang_timeout", hang_timeout)
        _check_seconds("log_every", log_every)
        _check_seconds("eval_every", eval_every)
        if isinstance(worker_niceness, bool) or not isinstance(worker_niceness, int) or not 0 <= worker_niceness <= 19:
            raise ValueError(f"worker_niceness must be an int in [0, 19], got {worker_niceness!r}")
        _check_seconds("gil_switch_interval", gil_switch_interval)
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
        self.task = task
        self.workers = list(workers)
        self.n = self.num_workers = len(self.workers)
        self.method = method
        self.seed = int(seed)
        self.server_device = torch.device(server_device)
        self.num_slots = num_slots or self.n + 2
        if self.num_slots < self.n:
            raise ValueError(f"num_slots ({self.num_slots}) must be >= the number of workers ({self.n})")
        self.hang_timeout = hang_timeout
        self.checkpoint_path = os.fspath(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every = checkpoint_every
        self.log, self.log_every, self.eval_every = log, float(log_every), eval_every
        self.torch_threads = torch_threads
        self.gil_switch_interval = float(gil_switch_interval)
        self.worker_niceness = worker_niceness

        torch.manual_seed(self.seed)
        self.model = task.build_model().to(self.server_device)
        self.layout, groups = param_layout(task, self.model)
        self.master = torch.empty(self.layout.numel, device=self.server_device)
        rule, self.rule_order = master_update_rule(task, self.model, self.layout, self.master, groups)
        self.policy = make_policy(method, rule, num_workers=self.n, **(policy_options or {}))
        self.eval_model = task.build_model().to(self.server_device)
        self._eval_flat = torch.empty(self.layout.numel, device=self.server_device)
        with torch.no_grad():
            self.layout.bind(self.eval_model, self._eval_flat)
        for i, body in enumerate(self.workers):
            body.bind(self, i)

        # what survives a resume
        self._elapsed_before = 0.0
        self._totals_before: Counter = Counter()
        self.history = History()
        self.server: Server | None = None
        self.exported: Any = None
        self._stop_reason = ""
        self._ran = False

    # ------------------------------------------------------------------ public
    @property
    def version(self) -> int:
        return self.policy.version

    @property
    def curve(self) -> list[tuple[float, int, float]]:
        return self.history.curve

    @property
    def evals(self) -> list[tuple[float, int, float]]:
        return self.history.evals

    @property
    def trace(self) -> list[tuple[int, int, int, bool, int]]:
        """One row per gradient the policy saw: (worker, start version, delay, accepted, version after)."""
        return self.server.trace if self.server is not None else []

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the run to stop (thread-safe; idempotent). The server drains the queue,
        writes the final checkpoint and :meth:`run` returns."""
        if not self._stop_reason:
            self._stop_reason = reason
        if self.server is not None:
            self.server.request_stop(reason)

    def run(self, max_updates: int | None = None, max_time: float | None = None) -> dict:
        """Train until ``max_updates`` total updates (counting a resumed run's) or
        ``max_time`` seconds of this call, whichever comes first, or Ctrl-C / all
        workers lost. Returns :meth:`summary`. One call per trainer."""
        _check_positive_int("max_updates", max_updates)
        _check_seconds("max_time", max_time)
        if max_updates is None and max_time is None:
            raise ValueError("run needs max_updates or max_time (or both)")
        if self._ran:
            raise RuntimeError("AsyncTrainer.run may be called once; build a new trainer (resume from its checkpoint)")
        self._ran = True
        server = self.server = Server(
            self.policy, self.master, self.layout, self.rule_order, self.workers, num_slots=self.num_slots,
            hang_timeout=self.hang_timeout, history=self.history, now=self._now,
            on_update=self._on_update if self.checkpoint_every else None, log=self.log)
        if self._stop_reason:
            server.request_stop(self._stop_reason)
        server_error: list[BaseException] = []
        done = threading.Event()
        old_threads, old_switch = torch.get_num_threads(), sys.getswitchinterval()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        # The server needs the GIL for a few Python statements per record while worker
        # threads run model code; the default 5 ms switch interval would make it wait
        # that long for its turn, so hand the GIL over more often during the run.
        sys.setswitchinterval(min(old_switch, self.gil_switch_interval))
        try:
            self._start = time.monotonic()
            if not self.evals or self.evals[-1][1] != self.version:
                self.evals.append((self._now(), self.version, self._evaluate()))
            threads = [threading.Thread(target=worker_main, args=(server, i, self.worker_niceness), name=f"ringmaster-worker-{i}", daemon=True)
                       for i in range(self.n)]

            def serve() -> None:
                try:
                    server.serve(self._start, max_updates, max_time, threads)
                except BaseException as exc:  # reported by run(); serve() has released the workers
                    server_error.append(exc)
                    server.stop_reason = server.stop_reason or f"server error: {exc!r}"
                finally:
                    done.set()

            thread = threading.Thread(target=serve, name="ringmaster-server", daemon=True)
            for t in threads:
                t.start()
            thread.start()
            self._monitor(done)
            thread.join()
            if server_error:
                raise RuntimeError("the server thread failed") from server_error[0]
            self.evals.append((self._now(), self.version, self._evaluate()))
            if self.checkpoint_path:
                self.save_checkpoint()
                export = getattr(self.task, "export", None)
                if export is not None:
                    self.exported = export(self.model, self.policy, self.version, self.evals[-1][2])
        finally:
            for body in self.workers:  # a body holding threads or connections lets go of them
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            torch.set_num_threads(old_threads)
            sys.setswitchinterval(old_switch)
        return self.summary()

    def _now(self) -> float:
        return self._elapsed_before + time.monotonic() - self._start

    def _on_update(self, version: int) -> None:
        if version % self.checkpoint_every == 0:
            self.save_checkpoint()

    def _monitor(self, done: threading.Event) -> None:
        """Main thread: progress lines, periodic evaluation, Ctrl-C and SIGTERM (torchrun's
        answer to a failed rank, a scheduler's stop): both stop the run cleanly, with the
        final checkpoint and summary."""
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if on_main else None
        try:
            self._watch(done)
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.request_stop("terminated")
        if self.log:
            self.log("[ringmaster] SIGTERM: stopping cleanly (final checkpoint follows)")

    def _watch(self, done: threading.Event) -> None:
        server = self.server
        next_log = time.monotonic() + self.log_every
        next_eval = time.monotonic() + (self.eval_every or math.inf)
        try:
            while not done.wait(0.05):
                now = time.monotonic()
                if now >= next_eval:
                    self.evals.append((self._now(), server.published[0], self._evaluate()))
                    next_eval = now + self.eval_every
                if self.log and now >= next_log:
                    self.log(progress_line(server, self.method, self._start))
                    next_log = now + self.log_every
        except KeyboardInterrupt:
            self.request_stop("interrupted")
            if self.log:
                self.log("[ringmaster] interrupted: stopping cleanly (final checkpoint follows)")
            done.wait()

    def _evaluate(self) -> float:
        """The task's metric at the published parameters (the master before a run)."""
        if self.server is not None:
            _, params, ready = self.server.published
            if ready is not None:
                torch.cuda.current_stream(self.server_device).wait_event(ready)
        else:
            params = self.master
        with torch.no_grad():
            self._eval_flat.copy_(params[: self.layout.numel])  # an MVR/HCM snapshot also holds the previous version
            was_training = self.eval_model.training
            self.eval_model.eval()
            try:
                return float(self.task.evaluate(self.eval_model))
            finally:
                self.eval_model.train(was_training)

    def summary(self) -> dict:
        """Everything measured by :meth:`run`; see :func:`reporting.summary`."""
        if not self._ran:
            raise RuntimeError("summary: the trainer has not run yet")
        return summary(self.server, method=self.method, wall=time.monotonic() - self._start,
                       elapsed_total=self._now(), totals_before=self._totals_before,
                       metric_name=getattr(self.task, "metric_name", "held-out loss"))

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        if self.server_device.type == "cuda":
            torch.cuda.synchronize(self.server_device)  # the master may be written on the server stream
        totals = Counter(self._totals_before)
        if self.server is not None:
            totals.update(self.server.run_totals())
        return {
            "format": checkpoint.FORMAT,
            "method": self.method,
            "layout": self.layout.as_list(),
            "params": self.master.detach().cpu().clone(),
            "policy": self.policy.state_dict(),
            "elapsed": self._now() if self.server is not None else self._elapsed_before,
            "totals": dict(totals),
            "history": self.history.state_dict(),
            "workers": [body.state_dict() for body in self.workers],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> str:
        """Write parameters, policy and update-rule state, metrics, data positions and RNG
        states atomically (see :mod:`runtime.checkpoint`). Returns the path."""
        path = os.fspath(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("path: no checkpoint path given and the trainer has none")
        return checkpoint.write_atomic(path, self._state())

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint written by a trainer built the same way (same task,
        method and number of workers); call before :meth:`run`. The file is untrusted:
        it is read without unpickling code and validated (format, method, layout, worker
        count, finite parameters and state, counters) before anything is changed."""
        if self._ran:
            raise RuntimeError("load_checkpoint must be called before run")
        path = os.fspath(path)
        state = checkpoint.read_trainer_state(path, method=self.method, layout=self.layout.as_list(),
                                              num_workers=self.n, shape=self.master.shape)
        # Each part validates itself while loading, so a file can fail half-way: keep the
        # whole trainer as it was and put all of it back if any part does not fit.
        before = copy.deepcopy(self._state())
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            self._restore(before)
            raise ValueError(f"path: checkpoint {path!r} does not fit this trainer: {type(exc).__name__}: {exc}") from None
        self._elapsed_before = float(state["elapsed"])
        self._totals_before = Counter(state["totals"])

    def _restore(self, state: dict) -> None:
        """Parameters, policy, history, worker positions and RNGs from a :meth:`_state` dict."""
        with torch.no_grad():
            self.master.copy_(state["params"])
        self.policy.load_state_dict(state["policy"])
        self.history.load_state_dict(state["history"])
        for body, saved in zip(self.workers, state["workers"]):
            body.load_state_dict(saved)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
