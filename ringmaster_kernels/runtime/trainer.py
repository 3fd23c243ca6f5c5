"""The real asynchronous training loop: one server thread, one thread per worker.

The server owns the fp32 master parameters (one flat buffer; the policy's tensors are
views into it) and the policy object from :mod:`ringmaster_kernels.optim.policies`, the
same object the virtual-time simulator drives. A worker takes the latest published
parameters with their version, computes a gradient, copies it into a free slot of the
server's slot pool and pushes ``(slot, worker, version)`` into the C++
:class:`~ringmaster_kernels.queue.GradientQueue`; then it waits for the server's verdict
on that gradient, because the method restarts a worker *at the point after* the
decision (``x^{k+1}`` when accepted) and a synchronous barrier keeps it idle.

The server pops with the GIL released, hands the policy a lazy view of the slot (a
discarded gradient is never read), executes the returned :class:`Decision` (publish
the new parameters, answer the worker, cancel stale jobs, release idle workers) and
keeps the books::

    pushed = accepted + discarded + in_flight_at_stop

where discarded splits into ``stale`` (the policy's delay rule), ``nonfinite`` (a
gradient with NaN/inf is never applied) and ``dropped`` (it came from a worker the run
had given up on). Jobs cancelled before they were pushed are counted apart.

On CUDA each worker has its own stream; a per-slot event orders the worker's copy
before the server's read and another orders the server's read before the slot's reuse
(host atomics do not order GPU work). Published parameters carry an event too.

Workers are pluggable: :class:`LocalWorker` computes in this process (a device, or a
CPU thread with emulated slowness); ``runtime.distributed.RemoteWorker`` proxies a
worker on another torch.distributed rank. The server cannot tell them apart.
"""
from __future__ import annotations

import math
import os
import queue as pyqueue
import random
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from ..optim.policies import make_policy
from ..queue import GradientQueue, QueueClosed

FAULT_KINDS = ("raise", "hang", "nan", "kill")

# worker states as the server sees them
RUNNING, WAITING, DEAD, DROPPED, STOPPED = "running", "waiting", "dead", "dropped", "stopped"
_GO, _STOP = 1, 0


def _stamp() -> tuple[float, float]:
    """(wall clock, this thread's CPU clock): the server's cost both with and without the
    time other threads or processes held the CPU or the GIL."""
    return time.perf_counter(), time.thread_time()


class Task(Protocol):
    """What the runtime trains: a model, its norm groups, data and a loss.

    ``build_model()`` must return a fresh module (the trainer seeds torch first).
    ``group_of(name)`` gives the policy group options of a parameter, e.g.
    ``{"norm": "spectral"}``. ``sample(batch_size, generator, device)`` returns a batch
    on ``device`` drawn with ``generator``; ``loss(model, batch)`` a scalar tensor;
    ``evaluate(model)`` a held-out loss (float).
    """

    def build_model(self) -> nn.Module: ...
    def group_of(self, name: str) -> dict: ...
    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> Any: ...
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...
    def evaluate(self, model: nn.Module) -> float: ...


@dataclass(frozen=True)
class Fault:
    """An injected failure: at the start of the worker's job number ``at_job`` (0-based)
    it raises (``"raise"``), blocks forever (``"hang"``), produces a NaN gradient for that
    job (``"nan"``), or SIGKILLs its own process (``"kill"``, remote workers only)."""

    kind: str
    at_job: int

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if isinstance(self.at_job, bool) or not isinstance(self.at_job, int) or self.at_job < 0:
            raise ValueError(f"fault at_job must be an int >= 0, got {self.at_job!r}")

    @staticmethod
    def parse(text: str) -> tuple[int, "Fault"]:
        """``"WORKER:KIND@JOB"`` (e.g. ``"2:raise@5"``) -> ``(worker, Fault)``."""
        try:
            worker, rest = text.split(":", 1)
            kind, job = rest.split("@", 1)
            return int(worker), Fault(kind, int(job))
        except ValueError as exc:
            raise ValueError(f"fault must look like WORKER:KIND@JOB (e.g. 2:raise@5), got {text!r}: {exc}") from None


class FlatLayout:
    """Where each named parameter lives in one flat fp32 buffer, in the policy's order."""

    def __init__(self, named_shapes: Sequence[tuple[str, torch.Size]]):
        self.names = [n for n, _ in named_shapes]
        self.shapes = [torch.Size(s) for _, s in named_shapes]
        self.sizes = [s.numel() for s in self.shapes]
        self.numel = sum(self.sizes)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(flat.split(self.sizes), self.shapes)]

    def bind(self, module: nn.Module, flat_param: torch.Tensor, flat_grad: torch.Tensor) -> None:
        """Make ``module``'s parameters and their ``.grad`` views into the flat buffers,
        so a whole model moves with one copy and backward accumulates in place."""
        params = dict(module.named_parameters())
        for name, p, g in zip(self.names, self.views(flat_param), self.views(flat_grad)):
            p.copy_(params[name].detach())
            params[name].data = p
            params[name].grad = g


def param_layout(task: Task, model: nn.Module) -> tuple[FlatLayout, list[tuple[dict, list[str]]]]:
    """Group ``model``'s parameters by ``task.group_of`` (first appearance order) and lay
    them out group after group, the order the policy sees them in. Every process that
    exchanges flat buffers (server, local and remote workers) derives the same layout.
    Returns the layout and ``[(group options, parameter names)]``."""
    groups: dict[tuple, tuple[dict, list[str]]] = {}
    for name, p in model.named_parameters():
        options = dict(task.group_of(name))
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        groups.setdefault(key, (options, []))[1].append(name)
    shapes = dict((name, p.shape) for name, p in model.named_parameters())
    ordered = [name for _, names in groups.values() for name in names]
    return FlatLayout([(name, shapes[name]) for name in ordered]), list(groups.values())


@dataclass
class Job:
    """One gradient computation as a worker body sees it."""

    worker: int
    index: int
    version: int
    params: torch.Tensor  # flat published parameters on the server device (read-only)
    ready: Any  # CUDA event after which ``params`` may be read, or None
    cancelled: Callable[[], bool]
    beat: Callable[[], None]
    sleep_until: Callable[[float], bool]  # False if woken early (cancel or stop)


class WorkerBody(Protocol):
    """How one worker produces gradients; the trainer's thread loop is shared.

    ``compute`` returns ``(flat gradient, loss)``, or ``None`` for a job abandoned
    because ``job.cancelled()`` became true. A body that computes out of this process
    may also define ``interrupt(cancel_before)``: the server calls it when the running
    job is cancelled (local bodies see ``job.cancelled()`` and wake from ``sleep_until``).
    """

    device: torch.device

    def bind(self, trainer: "AsyncTrainer", worker: int) -> None: ...
    def setup(self) -> None: ...
    def compute(self, job: Job) -> tuple[torch.Tensor, float] | None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class LocalWorker:
    """A worker in this process: a CUDA device with its own stream, or a CPU thread.

    Args:
        device: where the replica computes.
        batch_size: sequences per micro-batch.
        accum_steps: micro-batches accumulated per gradient (cancellation is checked
            between them).
        compute_time: emulated seconds per gradient: the worker sleeps so each job
            lasts at least this long (spread over the micro-steps), so the staleness
            the server sees on a 2-core CPU is the staleness of heterogeneous devices.
        slowdown: emulated speed factor: each job lasts at least ``slowdown`` times its
            real compute time (on CUDA, measured with a stream sync per micro-step).
        fault: an injected :class:`Fault` (``"kill"`` is for remote workers only).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        accum_steps: int = 1,
        compute_time: float | None = None,
        slowdown: float = 1.0,
        fault: Fault | None = None,
    ) -> None:
        self.device = torch.device(device)
        for name, value in (("batch_size", batch_size), ("accum_steps", accum_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if compute_time is not None and not (isinstance(compute_time, (int, float)) and 0 <= compute_time < math.inf):
            raise ValueError(f"compute_time must be a finite number >= 0 or None, got {compute_time!r}")
        if not (isinstance(slowdown, (int, float)) and 1.0 <= slowdown < math.inf):
            raise ValueError(f"slowdown must be a finite number >= 1, got {slowdown!r}")
        if fault is not None and fault.kind == "kill":
            raise ValueError("fault kind 'kill' would kill the whole process; use it with remote workers")
        self.batch_size, self.accum_steps = batch_size, accum_steps
        self.compute_time, self.slowdown, self.fault = compute_time, float(slowdown), fault

    def __repr__(self) -> str:
        return (f"LocalWorker(device={str(self.device)!r}, batch_size={self.batch_size}, accum_steps={self.accum_steps}, "
                f"compute_time={self.compute_time}, slowdown={self.slowdown}, fault={self.fault})")

    def bind(self, trainer: "AsyncTrainer", worker: int) -> None:
        self.trainer, self.worker = trainer, worker
        self.generator = torch.Generator().manual_seed(trainer.seed * 1_000_003 + worker + 1)

    def setup(self) -> None:
        trainer = self.trainer
        self.model = trainer.task.build_model().to(self.device)
        numel = trainer.layout.numel
        self.flat_param = torch.empty(numel, device=self.device)
        self.flat_grad = torch.zeros(numel, device=self.device)
        with torch.no_grad():
            trainer.layout.bind(self.model, self.flat_param, self.flat_grad)

    def compute(self, job: Job) -> tuple[torch.Tensor, float] | None:
        result = self._run_job(job)
        if result is None and self.device.type == "cuda":
            # the snapshot's reference dies with ``job``: let its asynchronous copy finish first
            torch.cuda.current_stream(self.device).synchronize()
        return result

    def _run_job(self, job: Job) -> tuple[torch.Tensor, float] | None:
        trainer = self.trainer
        cuda = self.device.type == "cuda"
        if job.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(job.ready)
        # ``job`` keeps the snapshot alive until float(loss_sum) below has synchronized
        # this stream, so the asynchronous copy never reads freed memory
        self.flat_param.copy_(job.params, non_blocking=True)
        fault = self.fault if self.fault is not None and self.fault.at_job == job.index else None
        if fault is not None and fault.kind == "raise":
            raise RuntimeError(f"injected fault: worker {job.worker} raised at job {job.index}")
        if fault is not None and fault.kind == "hang":
            while not job.cancelled():  # silent (no heartbeat) until the run drops or stops it
                time.sleep(0.02)
            return None
        self.flat_grad.zero_()
        start = time.monotonic()
        real = 0.0
        loss_sum = torch.zeros((), device=self.device)
        for step in range(self.accum_steps):
            if job.cancelled():
                return None
            t0 = time.monotonic()
            batch = trainer.task.sample(self.batch_size, self.generator, self.device)
            loss = trainer.task.loss(self.model, batch) / self.accum_steps
            loss.backward()
            loss_sum += loss.detach()
            if cuda and self.slowdown > 1.0:  # the speed factor needs device time, not launch time
                torch.cuda.current_stream(self.device).synchronize()
            real += time.monotonic() - t0
            job.beat()
            target = max((self.compute_time or 0.0) * (step + 1) / self.accum_steps, real * self.slowdown)
            if not job.sleep_until(start + target):
                return None
        if fault is not None and fault.kind == "nan":
            self.flat_grad.fill_(math.nan)
        return self.flat_grad, float(loss_sum)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class _WorkerState:
    phase: str = WAITING  # written by the worker thread only: running, waiting, stopped
    fate: str | None = None  # written by the server only: dead or dropped (the worker is lost)
    job_version: int = 0
    jobs: int = 0
    pushed: int = 0
    accepted: int = 0
    discarded: int = 0
    cancelled: int = 0
    delay_sum: int = 0
    arrivals: int = 0
    beat: float = 0.0
    error: str | None = None
    inbox: pyqueue.SimpleQueue = field(default_factory=pyqueue.SimpleQueue)
    wake: threading.Event = field(default_factory=threading.Event)


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
        policy_options: keyword arguments of :func:`make_policy` (``lr``, ``threshold``,
            ``momentum``, ``norm`` defaults, ...); per-parameter groups come from
            ``task.group_of``.
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
    ) -> None:
        if not workers:
            raise ValueError("workers must name at least one worker")
        _check_positive_int("num_slots", num_slots)
        _check_positive_int("checkpoint_every", checkpoint_every)
        _check_positive_int("torch_threads", torch_threads)
        _check_seconds("hang_timeout", hang_timeout)
        _check_seconds("log_every", log_every)
        _check_seconds("eval_every", eval_every)
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
        self.task = task
        self.workers = list(workers)
        self.n = len(self.workers)
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
        _check_seconds("gil_switch_interval", gil_switch_interval)
        self.gil_switch_interval = float(gil_switch_interval)
        self._cuda = self.server_device.type == "cuda"

        torch.manual_seed(self.seed)
        master_model = task.build_model()
        self.layout, groups = param_layout(task, master_model)
        self.master = torch.empty(self.layout.numel, device=self.server_device)
        views = dict(zip(self.layout.names, self.layout.views(self.master)))
        params = dict(master_model.named_parameters())
        with torch.no_grad():
            for name in self.layout.names:
                views[name].copy_(params[name].detach())
        param_groups = [{"params": [views[name] for name in names], **options} for options, names in groups]
        self.policy = make_policy(method, param_groups, num_workers=self.n, **(policy_options or {}))
        self.eval_model = task.build_model().to(self.server_device)
        self._eval_flat = torch.empty(self.layout.numel, device=self.server_device)
        with torch.no_grad():
            self.layout.bind(self.eval_model, self._eval_flat, torch.zeros_like(self._eval_flat))
        for i, body in enumerate(self.workers):
            body.bind(self, i)

        # what survives a resume
        self._elapsed_before = 0.0
        self._totals_before: Counter = Counter()
        self.curve: list[tuple[float, int, float]] = []  # (wall s, version, train-loss EMA)
        self.evals: list[tuple[float, int, float]] = []  # (wall s, version, held-out loss)
        self.delay_hist: Counter = Counter()  # delay of every gradient that reached the policy
        self._loss_ema: float | None = None
        self._ran = False
        self._stop_requested = threading.Event()
        self._stop_reason = ""
        self._stopping = threading.Event()
        self._done = threading.Event()

    # ------------------------------------------------------------------ public
    @property
    def version(self) -> int:
        return self.policy.version

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the run to stop (thread-safe; idempotent). The server drains the queue,
        writes the final checkpoint and :meth:`run` returns."""
        if not self._stop_reason:
            self._stop_reason = reason
        self._stop_requested.set()

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
        self.max_updates, self.max_time = max_updates, max_time
        capacity = 1 << max(1, (self.num_slots - 1).bit_length())
        self.queue = GradientQueue(capacity, self.num_slots, self.n)
        self.queue.set_version(self.policy.version)
        self._slots = torch.empty(self.num_slots, self.layout.numel, device=self.server_device)
        self._slot_views = [self.layout.views(s) for s in self._slots]
        self._slot_loss = [math.nan] * self.num_slots
        self._slot_finite = [True] * self.num_slots
        if self._cuda:
            self._server_stream = torch.cuda.Stream(self.server_device)
            self._slot_ready = [torch.cuda.Event() for _ in range(self.num_slots)]
            self._slot_free = [torch.cuda.Event() for _ in range(self.num_slots)]
            self._copy_streams = [torch.cuda.Stream(self.server_device) for _ in range(self.n)]
        self._ws = [_WorkerState() for _ in range(self.n)]
        self._cancel_below = [0] * self.n
        self._idle: set[int] = set()
        self._faults: pyqueue.SimpleQueue = pyqueue.SimpleQueue()
        self.fault_log: list[dict] = []
        # one row per gradient the policy saw, appended once its decision is fully executed:
        # (worker, start version, delay, accepted, version after)
        self.trace: list[tuple[int, int, int, bool, int]] = []
        self.totals: Counter = Counter()
        self._timing = Counter()  # server seconds, wall and (suffix _cpu) thread CPU: busy, math, publish
        self._server_error: BaseException | None = None
        self._version_at_start = self.policy.version
        self._publish()
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
            self._threads = [
                threading.Thread(target=self._worker_main, args=(i,), name=f"ringmaster-worker-{i}", daemon=True)
                for i in range(self.n)
            ]
            server = threading.Thread(target=self._server_main, name="ringmaster-server", daemon=True)
            for t in self._threads:
                t.start()
            server.start()
            self._monitor()
            server.join()
            if self._server_error is not None:
                raise RuntimeError("the server thread failed") from self._server_error
            self.evals.append((self._now(), self.version, self._evaluate()))
            if self.checkpoint_path:
                self.save_checkpoint()
        finally:
            torch.set_num_threads(old_threads)
            sys.setswitchinterval(old_switch)
        return self.summary()

    # ------------------------------------------------------------------ server
    def _now(self) -> float:
        return self._elapsed_before + time.monotonic() - self._start

    def _publish(self) -> None:
        """Make the current master parameters the ones new jobs start from."""
        if self._cuda:
            with torch.cuda.stream(self._server_stream):
                snapshot = self.master.clone()
                ready = torch.cuda.Event()
                ready.record(self._server_stream)
        else:
            snapshot, ready = self.master.clone(), None
        self._published = (self.policy.version, snapshot, ready)

    def _server_main(self) -> None:
        try:
            if self._cuda:
                with torch.cuda.stream(self._server_stream):
                    self._serve()
            else:
                self._serve()
        except BaseException as exc:  # reported by run(); the workers must still be released
            self._server_error = exc
            self._stop_reason = self._stop_reason or f"server error: {exc!r}"
        finally:
            self._shutdown()
            self._done.set()

    def _serve(self) -> None:
        poll = 0.05
        next_health = 0.0
        while True:
            now = time.monotonic()
            if now >= next_health:
                self._check_health(now)
                next_health = now + poll
            reason = self._should_stop(now)
            if reason:
                self._stop_reason = self._stop_reason or reason
                return
            try:
                record = self.queue.pop(timeout=poll)
            except QueueClosed:
                return
            if record is not None:
                self._handle(record)

    def _should_stop(self, now: float) -> str:
        if self._stop_requested.is_set():
            return self._stop_reason or "requested"
        if self.max_updates is not None and self.policy.version >= self.max_updates:
            return "max_updates"
        if self.max_time is not None and now - self._start >= self.max_time:
            return "max_time"
        if all(ws.fate or ws.phase == STOPPED for ws in self._ws):
            return "all workers lost"
        return ""

    def _drain_faults(self) -> None:
        while True:
            try:
                worker, error = self._faults.get_nowait()
            except pyqueue.Empty:
                return
            self._lose_worker(worker, DEAD, error)

    def _check_health(self, now: float) -> None:
        self._drain_faults()
        if self.hang_timeout is None:
            return
        for i, ws in enumerate(self._ws):
            if ws.fate is None and ws.phase == RUNNING and now - ws.beat > self.hang_timeout:
                self._lose_worker(i, DROPPED, f"no heartbeat for {now - ws.beat:.1f} s (hang_timeout={self.hang_timeout})")

    def _lose_worker(self, worker: int, state: str, error: str) -> None:
        ws = self._ws[worker]
        if ws.fate:
            return
        ws.fate, ws.error = state, error
        self.fault_log.append({"worker": worker, "status": state, "error": error, "version": self.policy.version, "t": self._now()})
        if self.log:
            self.log(f"[ringmaster] worker {worker} {state}: {error.strip().splitlines()[-1]}; the run continues")
        self._idle.discard(worker)
        ws.inbox.put(_STOP)
        ws.wake.set()
        decision = self.policy.remove_worker(worker)
        if decision is not None:
            self._execute(worker, decision, answer=False)

    def _clock(self, key: str, since: tuple[float, float]) -> None:
        """Add the wall and this thread's CPU time elapsed since ``since`` to ``key``."""
        now = _stamp()
        self._timing[key] += now[0] - since[0]
        self._timing[key + "_cpu"] += now[1] - since[1]

    def _handle(self, record) -> None:
        t0 = _stamp()
        slot, worker, version = record.slot, record.worker, record.version
        ws = self._ws[worker]
        if ws.fate:
            self.totals["dropped"] += 1
            self._release(slot)
            self._clock("busy", t0)
            return
        if not self._slot_finite[slot]:
            self.totals["nonfinite"] += 1
            ws.discarded += 1
            self._release(slot)
            self._clock("busy", t0)
            ws.inbox.put(_GO)
            return
        used_at = []

        def gradient() -> list[torch.Tensor]:
            used_at.append(_stamp())
            if self._cuda:
                torch.cuda.current_stream(self.server_device).wait_event(self._slot_ready[slot])
            return self._slot_views[slot]

        decision = self.policy.on_gradient(worker, version, gradient)
        if used_at:  # the update math: from the policy's first touch of the gradient to its return
            self._clock("math", used_at[0])
        self._release(slot)
        self.delay_hist[decision.delay] += 1
        ws.arrivals += 1
        ws.delay_sum += decision.delay
        if decision.accepted:
            self.totals["accepted"] += 1
            ws.accepted += 1
            loss = self._slot_loss[slot]
            self._loss_ema = loss if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * loss
        else:
            self.totals["stale"] += 1
            ws.discarded += 1
        if decision.advanced and self.checkpoint_every and decision.version % self.checkpoint_every == 0:
            self.save_checkpoint()
        self._execute(worker, decision, answer=True, started=t0)
        self.trace.append((worker, version, decision.delay, decision.accepted, decision.version))

    def _release(self, slot: int) -> None:
        if self._cuda:
            self._slot_free[slot].record(self._server_stream)
        self.queue.release_slot(slot)

    def _execute(self, worker: int, decision, answer: bool, started: tuple[float, float] | None = None) -> None:
        """Carry out a policy :class:`Decision` for the gradient ``worker`` delivered;
        ``started``: when the server took the record (its busy time ends before the
        answers, see below)."""
        if decision.advanced:
            t = _stamp()
            self._publish()
            self.queue.set_version(decision.version)
            self._clock("publish", t)
            self.curve.append((self._now(), decision.version, self._loss_ema if self._loss_ema is not None else math.nan))
        if decision.cancel_before is not None:
            for i, ws in enumerate(self._ws):
                if decision.cancel_before > self._cancel_below[i]:
                    self._cancel_below[i] = decision.cancel_before
                    if ws.phase == RUNNING and ws.job_version < decision.cancel_before:
                        ws.wake.set()
                        interrupt = getattr(self.workers[i], "interrupt", None)
                        if interrupt is not None:  # a body computing elsewhere must be told
                            interrupt(decision.cancel_before)
        # Answers go last and outside the busy clock: a woken worker thread asks for the
        # GIL at once, and what the server then waits is other threads' Python time.
        if started is not None:
            self._clock("busy", started)
        if answer and not decision.restart:
            self._idle.add(worker)
        if decision.restart_idle:
            for i in self._idle:
                self._ws[i].inbox.put(_GO)
            self._idle.clear()
        if answer and decision.restart:
            self._ws[worker].inbox.put(_GO)

    def _shutdown(self) -> None:
        """Stop every worker, then count what is still in the queue as in flight."""
        self._drain_faults()  # crashes reported after the last health check
        self._stopping.set()
        for ws in self._ws:
            ws.inbox.put(_STOP)
            ws.wake.set()
        self.queue.close()
        while True:
            try:
                record = self.queue.try_pop()
            except QueueClosed:
                break
            if record is None:
                break
            self.totals["in_flight"] += 1
        deadline = time.monotonic() + 10.0
        for i, thread in enumerate(self._threads):
            if not self._ws[i].fate:
                thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ worker
    def _worker_main(self, i: int) -> None:
        ws = self._ws[i]
        body = self.workers[i]
        try:
            if body.device.type == "cuda":
                stream = torch.cuda.Stream(body.device)
                with torch.cuda.device(body.device), torch.cuda.stream(stream):
                    body.setup()
                    self._work(i, ws, body)
            else:
                body.setup()
                self._work(i, ws, body)
        except Exception:
            ws.phase = STOPPED  # not RUNNING: the server's hang check must not race the report
            if not self._stopping.is_set():
                self._faults.put((i, traceback.format_exc()))
            return
        ws.phase = STOPPED

    def _work(self, i: int, ws: _WorkerState, body: WorkerBody) -> None:
        stopping = self._stopping

        def beat() -> None:
            ws.beat = time.monotonic()

        def sleep_until(deadline: float) -> bool:
            remaining = deadline - time.monotonic()
            return remaining <= 0 or not ws.wake.wait(remaining)

        while not stopping.is_set():
            version, params, ready = self._published
            ws.job_version = version
            ws.wake.clear()
            job = Job(i, ws.jobs, version, params, ready,
                      cancelled=lambda v=version: v < self._cancel_below[i] or stopping.is_set() or ws.fate is not None,
                      beat=beat, sleep_until=sleep_until)
            ws.jobs += 1
            beat()
            ws.phase = RUNNING
            result = body.compute(job)
            ws.phase = WAITING
            if stopping.is_set() or ws.fate:
                return
            if result is None or job.cancelled():
                ws.cancelled += 1
                continue
            grad, loss = result
            finite = bool(torch.isfinite(grad).all())
            try:
                slot = None
                while slot is None:
                    slot = self.queue.acquire_slot(timeout=0.1)
                    if stopping.is_set() and slot is None:
                        return
                if self._cuda:
                    self._copy_to_slot(i, slot, grad, torch.cuda.current_stream(body.device))
                else:
                    self._slots[slot].copy_(grad)
                self._slot_loss[slot], self._slot_finite[slot] = loss, finite
                self.queue.push(slot, i, version)
            except QueueClosed:
                return
            ws.pushed += 1
            while True:
                try:
                    answer = ws.inbox.get(timeout=0.1)
                except pyqueue.Empty:
                    if stopping.is_set():
                        return
                    continue
                if answer == _STOP:
                    return
                break

    def _copy_to_slot(self, worker: int, slot: int, grad: torch.Tensor, compute: torch.cuda.Stream) -> None:
        """Copy on a per-worker stream of the server device, after the gradient is computed
        and after the server's last read of the slot; the slot's event marks the end."""
        copy = self._copy_streams[worker]
        copy.wait_stream(compute)
        copy.wait_event(self._slot_free[slot])
        with torch.cuda.stream(copy):
            self._slots[slot].copy_(grad, non_blocking=True)
            self._slot_ready[slot].record(copy)
        compute.wait_stream(copy)  # the next job zeroes ``grad`` on the compute stream

    # ------------------------------------------------------------------ monitor
    def _monitor(self) -> None:
        """Main thread: progress lines, periodic evaluation, Ctrl-C."""
        next_log = time.monotonic() + self.log_every
        next_eval = time.monotonic() + (self.eval_every or math.inf)
        try:
            while not self._done.wait(0.05):
                now = time.monotonic()
                if now >= next_eval:
                    self.evals.append((self._now(), self._published[0], self._evaluate()))
                    next_eval = now + self.eval_every
                if self.log and now >= next_log:
                    self.log(self._progress_line())
                    next_log = now + self.log_every
        except KeyboardInterrupt:
            self.request_stop("interrupted")
            if self.log:
                self.log("[ringmaster] interrupted: stopping cleanly (final checkpoint follows)")
            self._done.wait()

    def _progress_line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        v = self.policy.version
        done = self.totals["accepted"] + self.totals["stale"] + self.totals["nonfinite"] + self.totals["dropped"]
        rate = (done - self.totals["accepted"]) / done if done else 0.0
        loss = f"{self._loss_ema:.3f}" if self._loss_ema is not None else "-"
        per_worker = " ".join(f"{ws.pushed / elapsed:.1f}" for ws in self._ws)
        return (f"[ringmaster {self.method}] t={self._now():6.1f}s version={v} upd/s={(v - self._version_at_start) / elapsed:6.1f} "
                f"accepted={self.totals['accepted']} discarded={done - self.totals['accepted']} ({rate:.0%}) "
                f"cancelled={sum(ws.cancelled for ws in self._ws)} grads/s per worker=[{per_worker}] loss={loss}")

    def _evaluate(self) -> float:
        version, params, ready = self._published
        if ready is not None:
            torch.cuda.current_stream(self.server_device).wait_event(ready)
        with torch.no_grad():
            self._eval_flat.copy_(params)
            was_training = self.eval_model.training
            self.eval_model.eval()
            try:
                return float(self.task.evaluate(self.eval_model))
            finally:
                self.eval_model.train(was_training)

    # ------------------------------------------------------------------ results
    def summary(self) -> dict:
        """Everything measured by :meth:`run` as a JSON-ready dict.

        Counts under ``totals`` are this run's (a resumed run adds its predecessors' in
        ``totals_including_resumed``); ``accounting_ok`` checks
        ``pushed == accepted + stale + nonfinite + dropped + in_flight``. ``server``
        holds the server's overhead (queue, policy decision, bookkeeping: its busy time
        minus the update math and the parameter publication) per record and per update,
        in wall time and in the server thread's CPU time (wall time also counts waits for
        the GIL and for a loaded CPU).
        """
        if not self._ran:
            raise RuntimeError("summary: the trainer has not run yet")
        wall = time.monotonic() - self._start
        totals = self._run_totals()
        pushed, discarded = totals["pushed"], totals["discarded"]
        stats = self.queue.stats()
        updates = self.policy.version - self._version_at_start
        per_worker = []
        for i, (ws, body) in enumerate(zip(self._ws, self.workers)):
            per_worker.append({
                "worker": i, "body": repr(body), "status": ws.fate or ws.phase, "jobs": ws.jobs, "pushed": ws.pushed,
                "accepted": ws.accepted, "discarded": ws.discarded, "cancelled": ws.cancelled,
                "gradients_per_s": ws.pushed / wall if wall > 0 else 0.0,
                "mean_delay": ws.delay_sum / ws.arrivals if ws.arrivals else None, "error": ws.error,
            })
        timing = self._timing
        records = totals["accepted"] + discarded
        overhead = timing["busy"] - timing["math"] - timing["publish"]
        overhead_cpu = timing["busy_cpu"] - timing["math_cpu"] - timing["publish_cpu"]
        combined = Counter(self._totals_before)
        combined.update(totals)
        return {
            "method": self.method,
            "policy": self.policy.hyperparameters(),
            "workers": self.n,
            "stop_reason": self._stop_reason,
            "wall_time_s": wall,
            "elapsed_including_resumed_s": self._now(),
            "version": self.policy.version,
            "updates": updates,
            "updates_per_s": updates / wall if wall > 0 else 0.0,
            "totals": totals,
            "totals_including_resumed": dict(combined),
            "queue_pushed": stats["pushed"],
            "accounting_ok": pushed == stats["pushed"] == totals["accepted"] + discarded + totals["in_flight"],
            "discard_rate": discarded / pushed if pushed else 0.0,
            "per_worker": per_worker,
            "delay_histogram": {str(k): v for k, v in sorted(self.delay_hist.items())},
            "server": {
                "records": records,
                "overhead_us_per_record": 1e6 * overhead / records if records else None,
                "overhead_us_per_update": 1e6 * overhead / updates if updates else None,
                "overhead_cpu_us_per_update": 1e6 * overhead_cpu / updates if updates else None,
                "math_ms_per_update": 1e3 * timing["math"] / updates if updates else None,
                "publish_us_per_update": 1e6 * timing["publish"] / updates if updates else None,
            },
            "final_loss": self.evals[-1][2] if self.evals else None,
            "initial_loss": self.evals[0][2] if self.evals else None,
            "train_loss_ema": self._loss_ema,
            "curve": self.curve,
            "evals": self.evals,
            "faults": self.fault_log,
        }

    # ------------------------------------------------------------------ checkpoints
    def _run_totals(self) -> dict[str, int]:
        """This run's counts: pushed, accepted, discarded (= stale + nonfinite + dropped),
        in flight at stop, and cancelled jobs (never pushed)."""
        totals = {key: self.totals[key] for key in ("accepted", "stale", "nonfinite", "dropped", "in_flight")}
        totals["discarded"] = totals["stale"] + totals["nonfinite"] + totals["dropped"]
        totals["pushed"] = sum(ws.pushed for ws in self._ws)
        totals["cancelled"] = sum(ws.cancelled for ws in self._ws)
        return totals

    def _state(self) -> dict:
        if self._cuda:
            torch.cuda.synchronize(self.server_device)  # the master may be written on the server stream
        worker_states = [body.state_dict() for body in self.workers]
        totals = Counter(self._totals_before)
        if self._ran:
            totals.update(self._run_totals())
        return {
            "format": 1,
            "method": self.method,
            "layout": list(zip(self.layout.names, [tuple(s) for s in self.layout.shapes])),
            "params": self.master.detach().cpu().clone(),
            "policy": self.policy.state_dict(),
            "elapsed": self._now() if hasattr(self, "_start") else self._elapsed_before,
            "totals": dict(totals),
            "curve": list(self.curve),
            "evals": list(self.evals),
            "delay_hist": dict(self.delay_hist),
            "loss_ema": self._loss_ema,
            "workers": worker_states,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> str:
        """Write parameters, policy state, version, metrics and RNG states atomically
        (temporary file, fsync, rename, fsync of the directory). Returns the path."""
        path = os.fspath(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ValueError("path: no checkpoint path given and the trainer has none")
        state = self._state()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Continue from a checkpoint written by a trainer built the same way (same
        task, method and number of workers); call before :meth:`run`."""
        if self._ran:
            raise RuntimeError("load_checkpoint must be called before run")
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
        layout = list(zip(self.layout.names, [tuple(s) for s in self.layout.shapes]))
        if state.get("format") != 1 or state["method"] != self.method or [tuple(x) for x in state["layout"]] != layout:
            raise ValueError(f"path: checkpoint {os.fspath(path)!r} is for another model or method "
                             f"({state.get('method')!r}); this trainer runs {self.method!r}")
        if len(state["workers"]) != self.n:
            raise ValueError(f"path: checkpoint has {len(state['workers'])} workers, this trainer {self.n}")
        with torch.no_grad():
            self.master.copy_(state["params"])
        self.policy.load_state_dict(state["policy"])
        self._elapsed_before = float(state["elapsed"])
        self._totals_before = Counter(state["totals"])
        self.curve = [tuple(x) for x in state["curve"]]
        self.evals = [tuple(x) for x in state["evals"]]
        self.delay_hist = Counter(state["delay_hist"])
        self._loss_ema = state["loss_ema"]
        for body, saved in zip(self.workers, state["workers"]):
            body.load_state_dict(saved)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
