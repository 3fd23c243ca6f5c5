"""The worker side of the runtime: jobs, worker bodies, data streams, the worker thread loop.

A worker thread repeatedly takes the latest published parameters with their version,
has its *body* compute a gradient (checking for cancellation between micro-steps and
beating a heartbeat), hands it to the server (:meth:`Server.deliver`: a free slot, a
copy, a queue record) and waits for the server's verdict, because a method restarts a
worker *at the point after* the decision (``x^{k+1}`` when accepted) and a synchronous
barrier keeps it idle.

Bodies are pluggable: :class:`LocalWorker` computes in this process (a device, or a
CPU thread with emulated slowness); ``runtime.distributed.RemoteWorker`` proxies a
worker on another torch.distributed rank. The server cannot tell them apart.

Each local worker reads its own :class:`DataStream`: a task may provide one per worker
(``task.data_stream``: e.g. one NanoChat loader per worker, its own shard slice, its
position checkpointed), otherwise batches are drawn by ``task.sample`` with the worker's
own generator.
"""
from __future__ import annotations

import math
import os
import queue as pyqueue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from ..optim.estimators import check_job
from .objectives import gradient_and_hvp, twice_differentiable

if TYPE_CHECKING:
    from .server import Server

FAULT_KINDS = ("raise", "hang", "nan", "kill")
GO, STOP = 1, 0  # the server's answers in a worker's inbox


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
    abandoned: Callable[[], bool] = lambda: False  # the run stops or gave up on this worker
    # what the job returns besides the gradient at ``params`` (an update rule's ``job``, one
    # of ``estimators.JOBS``): the gradient at ``previous`` (MVR) or a Hessian-vector
    # product (HCM), on the same batches, after it in the result (``2 * numel`` values)
    extra: str | None = None
    previous: torch.Tensor | None = None  # the version before ``version`` (flat, read-only)


class WorkerBody(Protocol):
    """How one worker produces gradients; the worker thread loop is shared.

    ``bind(context, worker)`` gives the body what it needs of the run: ``context.task``,
    ``context.layout``, ``context.seed`` and ``context.num_workers``.
    ``compute`` returns ``(flat gradient, loss)`` (for a job with ``extra``, the gradient
    followed by the extra: ``2 * numel`` values), or ``None`` for a job abandoned
    because ``job.cancelled()`` became true. A body that computes out of this process
    may also define ``interrupt(cancel_before)``: the server calls it when the running
    job is cancelled (local bodies see ``job.cancelled()`` and wake from ``sleep_until``),
    and ``close()``: the trainer calls it once its run has ended.
    """

    device: torch.device

    def bind(self, context: Any, worker: int) -> None: ...
    def setup(self) -> None: ...
    def compute(self, job: Job) -> tuple[torch.Tensor, float] | None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class DataStream(Protocol):
    """One worker's batches: ``next_batch()`` on the worker's device, and its position."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class SampledStream:
    """Batches of ``task.sample(batch_size, generator, device)`` from a generator of its own."""

    def __init__(self, task: Any, batch_size: int, device: torch.device, seed: int) -> None:
        self.task, self.batch_size, self.device = task, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> Any:
        return self.task.sample(self.batch_size, self.generator, self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        generator = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8:
            raise ValueError("worker state: 'generator' must be a torch.Generator state (uint8 tensor)")
        self.generator.set_state(generator)


def open_stream(task: Any, worker: int, num_workers: int, batch_size: int, device: torch.device, seed: int) -> DataStream:
    """Worker ``worker``'s data: the task's own stream if it has one, else a :class:`SampledStream`."""
    factory = getattr(task, "data_stream", None)
    if factory is not None:
        return factory(worker=worker, num_workers=num_workers, batch_size=batch_size, device=device, seed=seed)
    return SampledStream(task, batch_size, device, seed * 1_000_003 + worker + 1)


# One job as passes over the same micro-batches, per ``Job.extra``: (point, product) with
# point "current" (x_v), "previous" (x_{v-1}) or "random" (x_{v-1} + s d, d = x_v - x_{v-1})
# and product "gradient" (backward), "hvp" (H d by double backward, the gradient there
# unused) or "both" (the gradient and H d from one forward, with the gradient's graph).
_PASSES = {
    None: (("current", "gradient"),),
    "previous_gradient": (("current", "gradient"), ("previous", "gradient")),
    "hvp:current": (("current", "both"),),
    "hvp:random": (("current", "gradient"), ("random", "hvp")),
}
# emulated cost of one micro-step of each product, in gradients (see LocalWorker's compute_time)
_UNITS = {"gradient": 1, "hvp": 1, "both": 2}


class LocalWorker:
    """A worker in this process: a CUDA device with its own stream, or a CPU thread.

    Jobs with an ``extra`` (MVR and HCM estimators, :data:`_PASSES`) return ``[g, e]`` on
    the same micro-batches: ``e`` is the gradient at the previous version (MVR), or the
    Hessian-vector product ``H(p) d`` with ``d = x_v - x_{v-1}`` at ``p = x_v`` (hcm1:
    one forward, the gradient with its graph, then the double backward) or at
    ``p = x_{v-1} + s d`` (hcm2: a second pass at ``p``; ``s ~ U(0, 1)`` from this
    worker's own generator, :attr:`hvp_generator`, seeded from the run's seed and the
    worker and saved in its state). Over ``accum_steps`` micro-batches both are averages.
    An HVP runs attention in SDPA's math backend (the fused kernels have no double
    backward); a loss that still has none makes the job raise a ValueError saying so.

    Args:
        device: where the replica computes.
        batch_size: sequences per micro-batch.
        accum_steps: micro-batches accumulated per gradient (cancellation is checked
            between them).
        compute_time: emulated seconds per gradient: the worker sleeps so each job
            lasts at least this long (spread over the micro-steps), so the staleness
            the server sees on a 2-core CPU is the staleness of heterogeneous devices.
            An MVR or HCM job counts as two gradients (:data:`_UNITS`: MVR's second
            gradient, HCM's Hessian-vector product, whether in the same pass or in a
            second pass at ``p``, each as one gradient's time), as the simulator's
            budget counts them; their real extra cost (an HVP by double backward costs
            more than a gradient) shows through ``slowdown``, which scales measured time.
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

    def bind(self, context: Any, worker: int) -> None:
        self.context, self.worker = context, worker
        self.stream = open_stream(context.task, worker, context.num_workers, self.batch_size, self.device, context.seed)
        self.hvp_generator = torch.Generator().manual_seed(context.seed * 1_000_003 + 500_009 + worker)

    @property
    def generator(self) -> torch.Generator:
        """The sampling generator of a task without its own data streams."""
        return self.stream.generator

    def setup(self) -> None:
        context = self.context
        self.model = context.task.build_model().to(self.device)
        layout = context.layout
        self.flat_param = torch.empty(layout.numel, device=self.device)
        self.flat_grad = torch.zeros(layout.numel, device=self.device)
        with torch.no_grad():
            layout.bind(self.model, self.flat_param, self.flat_grad)
        params = dict(self.model.named_parameters())
        self._leaves = [params[name] for name in layout.names]  # in layout order, for autograd.grad
        self._grad_views = layout.views(self.flat_grad)
        self._pair: torch.Tensor | None = None  # [g, e] of jobs with an extra, and HCM's d
        self._direction: torch.Tensor | None = None

    def compute(self, job: Job) -> tuple[torch.Tensor, float] | None:
        result = self._run_job(job)
        if result is None and self.device.type == "cuda":
            # the snapshot's reference dies with ``job``: let its asynchronous copy finish first
            torch.cuda.current_stream(self.device).synchronize()
        return result

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``2 * numel`` result of a job with an extra and the ``numel`` direction d
        (allocated at the first such job: plain jobs never need them)."""
        if self._pair is None:
            numel = self.flat_grad.numel()
            self._pair = torch.empty(2 * numel, device=self.device)
            self._direction = torch.empty(numel, device=self.device)
            self._extra_views = self.context.layout.views(self._pair[numel:])
            self._direction_views = self.context.layout.views(self._direction)
        return self._pair, self._direction

    def _run_job(self, job: Job) -> tuple[torch.Tensor, float] | None:
        task = self.context.task
        cuda = self.device.type == "cuda"
        passes = _PASSES[check_job(job.extra, "job.extra")]
        if job.extra is not None and job.previous is None:
            raise ValueError(f"job.previous: a {job.extra!r} job needs the version before its own")
        if job.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(job.ready)
        # ``job`` keeps the snapshot alive until float(loss_sum) below has synchronized
        # this stream, so the asynchronous copy never reads freed memory
        self.flat_param.copy_(job.params, non_blocking=True)
        fault = self.fault if self.fault is not None and self.fault.at_job == job.index else None
        if fault is not None and fault.kind == "raise":
            raise RuntimeError(f"injected fault: worker {job.worker} raised at job {job.index}")
        if fault is not None and fault.kind == "hang":
            # silent (no heartbeat) until the run drops or stops it; a cancellation (the
            # stops of Ringmaster, Rennala's restart) does not end a hang, or the hang
            # detector would never be exercised for those methods
            while not job.abandoned():
                time.sleep(0.02)
            return None
        numel = self.flat_grad.numel()
        out = self.flat_grad
        if job.extra is not None:
            out, direction = self._buffers()
            if job.extra.startswith("hvp"):
                direction.copy_(job.previous, non_blocking=True).neg_().add_(self.flat_param)  # d = x_v - x_{v-1}
                out[numel:].zero_()
        s = float(torch.rand((), generator=self.hvp_generator)) if job.extra == "hvp:random" else 0.0
        start = time.monotonic()
        real, units = 0.0, 0
        loss_sum = torch.zeros((), device=self.device)
        batches: list[Any] = []
        for index, (point, product) in enumerate(passes):
            if point == "previous":
                self.flat_param.copy_(job.previous, non_blocking=True)
            elif point == "random":
                self.flat_param.copy_(job.previous, non_blocking=True).add_(self._direction, alpha=s)
            self.flat_grad.zero_()
            for step in range(self.accum_steps):
                if job.cancelled():
                    return None
                t0 = time.monotonic()
                if index == 0:
                    batches.append(self.stream.next_batch())
                if product == "gradient":
                    loss = task.loss(self.model, batches[step]) / self.accum_steps
                    loss.backward()
                else:
                    loss = self._hvp_step(task, batches[step], with_gradient=product == "both")
                if index == 0:
                    loss_sum += loss.detach()
                if cuda and self.slowdown > 1.0:  # the speed factor needs device time, not launch time
                    torch.cuda.current_stream(self.device).synchronize()
                real += time.monotonic() - t0
                units += _UNITS[product]
                job.beat()
                target = max((self.compute_time or 0.0) * units / self.accum_steps, real * self.slowdown)
                if not job.sleep_until(start + target):
                    return None
            if out is not self.flat_grad and product != "hvp":  # this pass's gradient: half ``index``
                out[index * numel:(index + 1) * numel].copy_(self.flat_grad)
        if fault is not None and fault.kind == "nan":
            out.fill_(math.nan)
        return out, float(loss_sum)

    def _hvp_step(self, task: Any, batch: Any, with_gradient: bool) -> torch.Tensor:
        """One micro-batch's ``H d / accum_steps`` added to the result's second half (and,
        ``with_gradient``, its gradient to ``flat_grad``); returns the micro-batch's loss."""
        with twice_differentiable():
            loss = task.loss(self.model, batch) / self.accum_steps
            try:
                grads, hv = gradient_and_hvp(loss, self._leaves, self._direction_views)
            except ValueError as exc:
                raise ValueError(f"an HCM job needs a Hessian-vector product of task.loss, and {exc}; use an "
                                 "estimator without one (ema, nesterov, mvr1-3) for this task") from exc
        if with_gradient:
            torch._foreach_add_(self._grad_views, grads)
        torch._foreach_add_(self._extra_views, hv)
        return loss

    def state_dict(self) -> dict:
        """The data stream's position and the HCM generator (``"hvp_generator"``)."""
        return {**self.stream.state_dict(), "hvp_generator": self.hvp_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"worker state must be a dict, got {type(state).__name__}")
        stream_state = {k: v for k, v in state.items() if k != "hvp_generator"}
        generator = state.get("hvp_generator")
        # absent in states saved before HCM jobs ran here: the seeded generator goes on
        if generator is not None and (not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8):
            raise ValueError("worker state: 'hvp_generator' must be a torch.Generator state (uint8 tensor)")
        self.stream.load_state_dict(stream_state)
        if generator is not None:
            self.hvp_generator.set_state(generator)


_BEAT_EVERY = 0.1  # seconds between heartbeats of a worker in an emulated sleep


def worker_main(server: "Server", i: int, niceness: int = 0) -> None:
    """Thread body of worker ``i``: set up its body, then run jobs until the run stops.
    An exception is reported to the server (the worker is lost; the run goes on).
    ``niceness`` > 0 lowers this thread's CPU priority (Linux; elsewhere ignored)."""
    ws = server.ws[i]
    body = server.bodies[i]
    if niceness > 0 and sys.platform == "linux":
        # With more worker threads than cores the server, woken by a record, waits for a
        # core behind them; a lower priority for the workers lets it run first. Linux
        # applies it to this thread only.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    try:
        if body.device.type == "cuda":
            stream = torch.cuda.Stream(body.device)
            with torch.cuda.device(body.device), torch.cuda.stream(stream):
                body.setup()
                _work(server, i, body)
        else:
            body.setup()
            _work(server, i, body)
    except Exception:
        ws.phase = "stopped"  # not running: the server's hang check must not race the report
        if not server.stopping.is_set():
            server.faults.put((i, traceback.format_exc()))
        return
    ws.phase = "stopped"


def _work(server: "Server", i: int, body: WorkerBody) -> None:
    ws = server.ws[i]
    stopping = server.stopping

    def beat() -> None:
        ws.beat = time.monotonic()

    def sleep_until(deadline: float) -> bool:
        # emulated compute time is a healthy worker's time: beat through it, or a slow
        # worker (compute_time > hang_timeout) would be dropped as hung
        while (remaining := deadline - time.monotonic()) > 0:
            if ws.wake.wait(min(remaining, _BEAT_EVERY)):
                return False
            beat()
        return True

    while not stopping.is_set():
        version, params, ready = server.published
        previous = None
        if server.job is not None:  # an MVR/HCM server publishes [x^v, x^{v-1}] as one snapshot
            params, previous = params.chunk(2)
        ws.job_version = version
        ws.wake.clear()
        job = Job(i, ws.jobs, version, params, ready,
                  cancelled=lambda v=version: v < server.cancel_below[i] or stopping.is_set() or ws.fate is not None,
                  beat=beat, sleep_until=sleep_until, abandoned=lambda: stopping.is_set() or ws.fate is not None,
                  extra=server.job, previous=previous)
        ws.jobs += 1
        beat()
        ws.phase = "running"
        started = time.monotonic()
        result = body.compute(job)
        ws.phase = "waiting"
        if stopping.is_set() or ws.fate:
            return
        if result is None or job.cancelled():
            ws.cancelled += 1
            continue
        ws.computed += 1
        ws.compute_s += time.monotonic() - started
        grad, loss = result
        if not server.deliver(i, version, grad, loss, body.device):
            return
        while True:
            try:
                answer = ws.inbox.get(timeout=0.1)
            except pyqueue.Empty:
                if stopping.is_set():
                    return
                continue
            if answer == STOP:
                return
            break
