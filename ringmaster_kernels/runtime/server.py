"""The server side of the runtime: the slot pool, the policy loop and the books.

The server owns the fp32 master parameters (one flat buffer; the update rule's tensors
are views into it) and the policy from :mod:`ringmaster_kernels.optim.policies`, the
same object the virtual-time simulator drives. It pops records from the C++
:class:`~ringmaster_kernels.queue.GradientQueue` with the GIL released, hands the policy
a lazy view of the slot (a discarded gradient is never read), executes the returned
:class:`Decision` (publish the new parameters, answer the worker, cancel stale jobs,
release idle workers) and keeps the books::

    pushed = accepted + discarded + in_flight

where discarded splits into ``stale`` (the policy's delay rule), ``nonfinite`` (a
gradient with NaN/inf is never applied) and ``dropped`` (it came from a worker the run
had given up on). Jobs cancelled before they were pushed are counted apart.

On CUDA each worker has its own copy stream; a per-slot event orders the worker's copy
before the server's read and another orders the server's read before the slot's reuse
(host atomics do not order GPU work). Published parameters carry an event too.
"""
from __future__ import annotations

import math
import queue as pyqueue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..optim.estimators import check_job
from ..optim.policies import Decision, Policy
from ..queue import GradientQueue, QueueClosed
from .layout import FlatLayout
from .reporting import History
from .worker import GO, STOP, WorkerBody

# worker states as the server sees them
RUNNING, WAITING, DEAD, DROPPED, STOPPED = "running", "waiting", "dead", "dropped", "stopped"


def stamp() -> tuple[float, float]:
    """(wall clock, this thread's CPU clock): the server's cost both with and without the
    time other threads or processes held the CPU or the GIL."""
    return time.perf_counter(), time.thread_time()


@dataclass
class WorkerState:
    phase: str = WAITING  # written by the worker thread only: running, waiting, stopped
    fate: str | None = None  # written by the server only: dead or dropped (the worker is lost)
    job_version: int = 0
    jobs: int = 0
    pushed: int = 0
    accepted: int = 0
    discarded: int = 0
    cancelled: int = 0
    computed: int = 0  # jobs that ran to the end, and their seconds (emulated slowness included)
    compute_s: float = 0.0
    delay_sum: int = 0
    arrivals: int = 0
    beat: float = 0.0
    error: str | None = None
    inbox: pyqueue.SimpleQueue = field(default_factory=pyqueue.SimpleQueue)
    wake: threading.Event = field(default_factory=threading.Event)


class Server:
    """One run's server: slots, publication, the policy loop, health checks, accounting.

    Args:
        policy: the async method; its update rule's parameters are views into ``master``.
        master: the flat fp32 master parameters.
        layout: the flat layout of ``master`` and of every slot.
        rule_order: for each of ``policy.params`` (the order the rule takes gradients),
            its index in ``layout``.
        bodies: the worker bodies (their ``interrupt`` is called on cancellation).
        num_slots: gradient slots in the pool.
        hang_timeout: seconds without a heartbeat after which a running worker is dropped.
        history: curve, delay histogram and loss EMA (kept across resumes).
        now: the run's clock in seconds (including resumed runs).
        on_update: called with the new version after every advance (checkpoints).
        log: progress and fault lines, or ``None``.
    """

    def __init__(
        self,
        policy: Policy,
        master: torch.Tensor,
        layout: FlatLayout,
        rule_order: Sequence[int],
        bodies: Sequence[WorkerBody],
        *,
        num_slots: int,
        hang_timeout: float | None,
        history: History,
        now: Callable[[], float],
        on_update: Callable[[int], None] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.policy, self.master, self.layout = policy, master, layout
        self.bodies = list(bodies)
        self.n = len(self.bodies)
        self.num_slots = num_slots
        self.hang_timeout = hang_timeout
        self.history, self.now, self.on_update, self.log = history, now, on_update, log
        self.device = master.device
        self.cuda = self.device.type == "cuda"
        capacity = 1 << max(1, (num_slots - 1).bit_length())
        self.queue = GradientQueue(capacity, num_slots, self.n)
        self.queue.set_version(policy.version)
        # An MVR or HCM rule's jobs return the gradient at their version and, on the same
        # batches, the gradient at the version before or a Hessian-vector product
        # (2 x numel per slot); they read both versions from one published snapshot.
        self.job: str | None = check_job(getattr(policy.rule, "job", None), "policy.rule.job")
        self.rule_order = list(rule_order)
        halves = 1 if self.job is None else 2
        self.slots = torch.empty(num_slots, halves * layout.numel, device=self.device)
        self._slot_views = [[views[j] for half in s.chunk(halves) for views in [layout.views(half)] for j in rule_order]
                            for s in self.slots]
        self.slot_loss = [math.nan] * num_slots
        self.slot_finite = [True] * num_slots
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self._slot_ready = [torch.cuda.Event() for _ in range(num_slots)]
            self._slot_free = [torch.cuda.Event() for _ in range(num_slots)]
            self._copy_streams = [torch.cuda.Stream(self.device) for _ in range(self.n)]
        self.ws = [WorkerState() for _ in range(self.n)]
        self.cancel_below = [0] * self.n
        self.idle: set[int] = set()
        self.faults: pyqueue.SimpleQueue = pyqueue.SimpleQueue()  # (worker, traceback) from worker threads
        self.fault_log: list[dict] = []
        # one row per gradient the policy saw, appended once its decision is fully executed:
        # (worker, start version, delay, accepted, version after)
        self.trace: list[tuple[int, int, int, bool, int]] = []
        self.totals: Counter = Counter()
        self.timing: Counter = Counter()  # server seconds, wall and (suffix _cpu) thread CPU: busy, math, publish
        self.stopping = threading.Event()
        self.stop_requested = threading.Event()
        self.stop_reason = ""
        self.version_at_start = policy.version
        self.publish()

    # ------------------------------------------------------------------ publication
    def publish(self) -> None:
        """Make the current master parameters the ones new jobs start from."""
        if self.cuda:
            with torch.cuda.stream(self.stream):
                snapshot = self._snapshot()
                ready = torch.cuda.Event()
                ready.record(self.stream)
        else:
            snapshot, ready = self._snapshot(), None
        self.published = (self.policy.version, snapshot, ready)

    def _snapshot(self) -> torch.Tensor:
        """The flat parameters, followed for an MVR/HCM rule by its previous copy (the rule
        keeps it, in rule order: checkpoints carry it) laid out as the master."""
        if self.job is None:
            return self.master.clone()
        snapshot = torch.empty(2 * self.layout.numel, device=self.device)
        snapshot[: self.layout.numel].copy_(self.master)
        views = self.layout.views(snapshot[self.layout.numel:])
        for k, j in enumerate(self.rule_order):
            views[j].copy_(self.policy.rule.previous[k])
        return snapshot

    # ------------------------------------------------------------------ worker side
    def deliver(self, worker: int, version: int, grad: torch.Tensor, loss: float, device: torch.device) -> bool:
        """Called by worker ``worker``'s thread: copy ``grad`` into a free slot and push its
        record. Returns ``False`` when the run is stopping (nothing was pushed)."""
        finite = bool(torch.isfinite(grad).all())
        try:
            slot = None
            while slot is None:
                slot = self.queue.acquire_slot(timeout=0.1)
                if slot is None and self.stopping.is_set():
                    return False
            if self.cuda:
                self._copy_to_slot(worker, slot, grad, torch.cuda.current_stream(device))
            else:
                self.slots[slot].copy_(grad)
            self.slot_loss[slot], self.slot_finite[slot] = loss, finite
        except QueueClosed:
            return False
        ws = self.ws[worker]
        ws.pushed += 1  # before the push: the server may decide the record before this thread runs again
        try:
            self.queue.push(slot, worker, version)
        except QueueClosed:
            ws.pushed -= 1
            return False
        return True

    def _copy_to_slot(self, worker: int, slot: int, grad: torch.Tensor, compute: torch.cuda.Stream) -> None:
        """Copy on a per-worker stream of the server device, after the gradient is computed
        and after the server's last read of the slot; the slot's event marks the end."""
        copy = self._copy_streams[worker]
        copy.wait_stream(compute)
        copy.wait_event(self._slot_free[slot])
        with torch.cuda.stream(copy):
            self.slots[slot].copy_(grad, non_blocking=True)
            self._slot_ready[slot].record(copy)
        compute.wait_stream(copy)  # the next job zeroes ``grad`` on the compute stream

    # ------------------------------------------------------------------ loop
    def request_stop(self, reason: str = "requested") -> None:
        if not self.stop_reason:
            self.stop_reason = reason
        self.stop_requested.set()

    def serve(self, start: float, max_updates: int | None, max_time: float | None, threads: Sequence[threading.Thread]) -> None:
        """The server thread's loop until a stop condition; then :meth:`shutdown`."""
        self._threads = threads
        try:
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    self._serve(start, max_updates, max_time)
            else:
                self._serve(start, max_updates, max_time)
        finally:
            self.shutdown()

    def _serve(self, start: float, max_updates: int | None, max_time: float | None) -> None:
        poll = 0.05
        next_health = 0.0
        while True:
            now = time.monotonic()
            if now >= next_health:
                self.check_health(now)
                next_health = now + poll
            reason = self._should_stop(now - start, max_updates, max_time)
            if reason:
                self.stop_reason = self.stop_reason or reason
                return
            try:
                record = self.queue.pop(timeout=poll)
            except QueueClosed:
                return
            if record is not None:
                self.handle(record)

    def _should_stop(self, elapsed: float, max_updates: int | None, max_time: float | None) -> str:
        if self.stop_requested.is_set():
            return self.stop_reason or "requested"
        if max_updates is not None and self.policy.version >= max_updates:
            return "max_updates"
        if max_time is not None and elapsed >= max_time:
            return "max_time"
        if all(ws.fate or ws.phase == STOPPED for ws in self.ws):
            return "all workers lost"
        return ""

    # ------------------------------------------------------------------ health
    def _drain_faults(self) -> None:
        while True:
            try:
                worker, error = self.faults.get_nowait()
            except pyqueue.Empty:
                return
            self.lose_worker(worker, DEAD, error)

    def check_health(self, now: float) -> None:
        self._drain_faults()
        if self.hang_timeout is None:
            return
        for i, ws in enumerate(self.ws):
            if ws.fate is None and ws.phase == RUNNING and now - ws.beat > self.hang_timeout:
                self.lose_worker(i, DROPPED, f"no heartbeat for {now - ws.beat:.1f} s (hang_timeout={self.hang_timeout})")

    def lose_worker(self, worker: int, state: str, error: str) -> None:
        ws = self.ws[worker]
        if ws.fate:
            return
        ws.fate, ws.error = state, error
        self.fault_log.append({"worker": worker, "status": state, "error": error, "version": self.policy.version, "t": self.now()})
        if self.log:
            self.log(f"[ringmaster] worker {worker} {state}: {error.strip().splitlines()[-1]}; the run continues")
        self.idle.discard(worker)
        ws.inbox.put(STOP)
        ws.wake.set()
        decision = self.policy.remove_worker(worker)
        if decision is not None:
            self.execute(worker, decision, answer=False)

    # ------------------------------------------------------------------ records
    def _clock(self, key: str, since: tuple[float, float]) -> None:
        """Add the wall and this thread's CPU time elapsed since ``since`` to ``key``."""
        now = stamp()
        self.timing[key] += now[0] - since[0]
        self.timing[key + "_cpu"] += now[1] - since[1]

    def handle(self, record: Any) -> None:
        t0 = stamp()
        slot, worker, version = record.slot, record.worker, record.version
        ws = self.ws[worker]
        if ws.fate:
            self.totals["dropped"] += 1
            self._release(slot)
            self._clock("busy", t0)
            return
        if not self.slot_finite[slot]:
            self.totals["nonfinite"] += 1
            ws.discarded += 1
            self._release(slot)
            self._clock("busy", t0)
            ws.inbox.put(GO)
            return
        used_at = []

        def gradient() -> list[torch.Tensor]:
            used_at.append(stamp())
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._slot_ready[slot])
            return self._slot_views[slot]

        decision = self.policy.on_gradient(worker, version, gradient)
        if used_at:  # the update math: from the policy's first touch of the gradient to its return
            self._clock("math", used_at[0])
        loss = self.slot_loss[slot]  # before the release: a worker may take the slot and write it
        self._release(slot)
        history = self.history
        history.delay_hist[decision.delay] += 1
        ws.arrivals += 1
        ws.delay_sum += decision.delay
        if decision.accepted:
            self.totals["accepted"] += 1
            ws.accepted += 1
            history.add_loss(loss)
        else:
            self.totals["stale"] += 1
            ws.discarded += 1
        self.execute(worker, decision, answer=True, started=t0)
        self.trace.append((worker, version, decision.delay, decision.accepted, decision.version))
        if decision.advanced and self.on_update is not None:
            # after execute: a checkpoint taken here holds this update's curve point
            self.on_update(decision.version)

    def _release(self, slot: int) -> None:
        if self.cuda:
            self._slot_free[slot].record(self.stream)
        self.queue.release_slot(slot)

    def execute(self, worker: int, decision: Decision, answer: bool, started: tuple[float, float] | None = None) -> None:
        """Carry out a policy :class:`Decision` for the gradient ``worker`` delivered;
        ``started``: when the server took the record (its busy time ends before the
        answers, see below)."""
        if decision.advanced:
            t = stamp()
            self.publish()
            self.queue.set_version(decision.version)
            self._clock("publish", t)
            self.history.curve.append((self.now(), decision.version, self.history.loss_ema))
        if decision.cancel_before is not None:
            for i, ws in enumerate(self.ws):
                if decision.cancel_before > self.cancel_below[i]:
                    self.cancel_below[i] = decision.cancel_before
                    if ws.phase == RUNNING and ws.job_version < decision.cancel_before:
                        ws.wake.set()
                        interrupt = getattr(self.bodies[i], "interrupt", None)
                        if interrupt is not None:  # a body computing elsewhere must be told
                            interrupt(decision.cancel_before)
        # Answers go last and outside the busy clock: a woken worker thread asks for the
        # GIL at once, and what the server then waits is other threads' Python time.
        if started is not None:
            self._clock("busy", started)
        if answer and not decision.restart:
            self.idle.add(worker)
        if decision.restart_idle:
            for i in self.idle:
                self.ws[i].inbox.put(GO)
            self.idle.clear()
        if answer and decision.restart:
            self.ws[worker].inbox.put(GO)

    def shutdown(self) -> None:
        """Stop every worker, then count what is still in the queue as in flight."""
        self._drain_faults()  # crashes reported after the last health check
        self.stopping.set()
        for ws in self.ws:
            ws.inbox.put(STOP)
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
            if not self.ws[i].fate:
                thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ books
    def run_totals(self) -> dict[str, int]:
        """This run's counts: pushed, accepted, discarded (= stale + nonfinite + dropped),
        in flight (at stop; during the run: pushed and not yet decided, which is what a
        mid-run checkpoint must record), and cancelled jobs (never pushed)."""
        totals = {key: self.totals[key] for key in ("accepted", "stale", "nonfinite", "dropped")}
        totals["discarded"] = totals["stale"] + totals["nonfinite"] + totals["dropped"]
        totals["pushed"] = sum(ws.pushed for ws in self.ws)
        undecided = totals["pushed"] - totals["accepted"] - totals["discarded"]
        totals["in_flight"] = self.totals["in_flight"] if self.stopping.is_set() else undecided
        totals["cancelled"] = sum(ws.cancelled for ws in self.ws)
        return totals
