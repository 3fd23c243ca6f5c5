"""Several hosts: the same server on rank 0 of a torch.distributed job, remote workers elsewhere.

Launched with ``torchrun``; Gloo on CPU, NCCL on GPU; point-to-point sends only (no
``torch.distributed.rpc``). Rank 0 runs :class:`~ringmaster_kernels.runtime.trainer.AsyncTrainer`
with one :class:`RemoteWorker` per other rank: a rank-0 thread that, like a local worker,
takes the published parameters, but instead of computing sends them to its rank and
receives the gradient back, then pushes the record into the same queue. The server and
the policy cannot tell a remote worker from a local one.

Protocol, per job, on the (0, r) pair: rank 0 sends a header ``[JOB, version, job index,
session, extra]`` (float64; ``extra`` codes the job's ``Job.extra``: 0 for none, else 1 +
its index in ``estimators.JOBS``) and the flat parameters, then, for a job with an extra
(MVR and HCM estimators), the flat previous version; rank r answers ``[loss, cancelled]``
and, unless the job was cancelled, the flat gradient, followed for a job with an extra by
the extra (``2 * numel`` values: the gradient at the previous version or the
Hessian-vector product, computed by the same :class:`LocalWorker` code as on threads).
Cancellations (the stops variant) travel on their own tag: ``[session, cancel_before]``
from the server thread, read on rank r by a listener thread that the job checks between
micro-steps and while it sleeps. Versions restart with every trainer (one per method),
hence the session: a new one voids older thresholds. A header ``[EXIT, 0, 0, 0, 0]`` (and
``[-1, 0]`` on the cancel tag, for the listener) ends rank r's loop. A rank that dies
breaks its pair's next send/recv; its proxy thread raises, the trainer reports the worker
dead and the run goes on.

Limits: remote workers' state is not checkpointed (their data streams, and hcm2's
generator of ``s``: a resumed run starts them afresh from the seed); a rank that hangs is
dropped by the server but its process is left for the launcher to kill. torchrun's agent
stops every rank it launched as soon as one fails; to keep going past a dead worker, start
the ranks with the same environment variables but without the agent (as
tests/test_distributed.py does).
"""
from __future__ import annotations

import datetime
import itertools
import math
import os
import queue
import signal
import socket
import threading
import time

import torch
import torch.distributed as dist

from ..optim.estimators import JOBS, check_job
from .layout import FlatLayout, param_layout
from .worker import Job, LocalWorker

JOB, EXIT = 1.0, 0.0
CANCEL_TAG = 1  # jobs and answers use tag 0
HEADER = 5  # JOB or EXIT, version, job index, session, extra code
_sessions = itertools.count(1)  # one per RemoteWorker, increasing across trainers


def init_from_env(timeout_s: float = 120.0) -> tuple[int, int]:
    """Join the job torchrun started (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the
    environment): NCCL when CUDA is available, else Gloo. Returns ``(rank, world_size)``.

    The rendezvous store: torch's own ``env://`` store listens on every interface, so
    anyone on the network could read and write it. Launched without torchrun's agent
    (ranks started with the same environment), rank 0 creates the store itself on a
    socket bound to ``MASTER_ADDR`` only. Under the agent (``torchrun``), the agent owns
    the store and torch gives no way to bind it: the cluster network must be trusted.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("distributed: RANK/WORLD_SIZE are not set; launch with torchrun --nproc-per-node N")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" or "MASTER_PORT" not in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=_bound_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _bound_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The rendezvous store, listening on ``MASTER_ADDR`` only (rank 0) or joined (others)."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout)
    listener = socket.create_server((host, port), backlog=max(128, world), reuse_port=False)
    # the store's daemon owns the socket from here: detach it so Python never closes it
    return dist.TCPStore(host, port, world, True, timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach(), use_libuv=False)


def comm_device() -> torch.device:
    """Where point-to-point tensors must live for the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class RemoteWorker:
    """Rank 0's proxy for the worker process on ``rank`` (a :class:`WorkerBody`)."""

    def __init__(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1 (rank 0 is the server), got {rank!r}")
        self.rank = rank
        self.device = comm_device()
        self.session = next(_sessions)

    def __repr__(self) -> str:
        return f"RemoteWorker(rank={self.rank}, device={str(self.device)!r})"

    def bind(self, trainer, worker: int) -> None:
        self.trainer, self.worker = trainer, worker

    def setup(self) -> None:
        self.reply = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.numel = self.trainer.layout.numel
        self._results: dict[int, torch.Tensor] = {}  # the received result, by halves (1 or 2)
        # Cancellations are sent from a thread of their own: a send to a stopped or hung
        # rank blocks until the process group's timeout, and the server (which decides
        # cancellations and checks workers' health) must never wait on it.
        self._cancels: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_cancels, name=f"ringmaster-cancel-sender-{self.rank}",
                                        daemon=True)
        self._sender.start()

    def _send_cancels(self) -> None:
        while True:
            message = self._cancels.get()
            if message is None:
                return
            try:
                dist.send(message, dst=self.rank, tag=CANCEL_TAG)
            except Exception:
                return  # a dead peer or a closed group: the proxy thread's pending recv reports it

    def close(self) -> None:
        """End the cancellation sender once its queued messages are sent (the trainer
        calls this when its run ends; a proxy never set up has nothing to end)."""
        cancels = getattr(self, "_cancels", None)
        if cancels is not None:
            cancels.put(None)

    def compute(self, job: Job) -> tuple[torch.Tensor, float] | None:
        code = extra_code(job.extra)
        if code and job.previous is None:
            raise ValueError(f"job.previous: a {job.extra!r} job needs the version before its own")
        if job.ready is not None:
            torch.cuda.current_stream().wait_event(job.ready)
        header = torch.tensor([JOB, job.version, job.index, self.session, code], dtype=torch.float64,
                              device=self.device)
        dist.send(header, dst=self.rank)
        dist.send(job.params.to(self.device), dst=self.rank)
        if code:
            dist.send(job.previous.to(self.device), dst=self.rank)
        dist.recv(self.reply, src=self.rank)
        job.beat()
        loss, cancelled = self.reply.tolist()
        if cancelled:
            return None
        halves = 2 if code else 1
        if halves not in self._results:
            self._results[halves] = torch.empty(halves * self.numel, device=self.device)
        result = self._results[halves]
        dist.recv(result, src=self.rank)
        job.beat()
        return result, loss

    def interrupt(self, cancel_before: int) -> None:
        """Cancel the remote job if it started at a version below ``cancel_before``
        (called by the server thread while :meth:`compute` waits in the proxy thread)."""
        self._cancels.put(torch.tensor([self.session, cancel_before], dtype=torch.float64, device=self.device))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def extra_code(extra: str | None) -> int:
    """A job's ``extra`` on the wire: 0 for None, else 1 + its index in ``estimators.JOBS``."""
    return 0 if check_job(extra, "job.extra") is None else 1 + JOBS.index(extra)


def send_exit(ranks: list[int]) -> list[int]:
    """Tell each rank's worker loop to end; returns the ranks that could not be told."""
    failed = []
    header = torch.tensor([EXIT] + [0.0] * (HEADER - 1), dtype=torch.float64, device=comm_device())
    stop_listener = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=comm_device())
    for rank in ranks:
        try:
            dist.send(header, dst=rank)
            dist.send(stop_listener, dst=rank, tag=CANCEL_TAG)
        except Exception:  # a dead peer breaks the pair; nothing else to do for it
            failed.append(rank)
    return failed


class _CancelListener:
    """Worker-rank thread receiving cancellation thresholds from rank 0 (monotone within
    a session)."""

    def __init__(self, device: torch.device):
        self.session, self.before = 0, 0
        self.exiting = False
        self.signal = threading.Event()
        self._buf = torch.zeros(2, dtype=torch.float64, device=device)
        self._thread = threading.Thread(target=self._listen, name="ringmaster-cancel-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while True:
            dist.recv(self._buf, src=0, tag=CANCEL_TAG)
            session, before = (int(v) for v in self._buf.tolist())
            if session < 0:
                self.exiting = True
                return
            if session > self.session:
                self.session, self.before = session, before
            elif session == self.session:
                self.before = max(self.before, before)
            self.signal.set()

    def job(self, worker: int, index: int, version: int, session: int, params: torch.Tensor,
            extra: str | None = None, previous: torch.Tensor | None = None) -> Job:
        """A :class:`Job` whose ``cancelled``/``sleep_until`` follow this listener."""
        self.signal.clear()

        def cancelled() -> bool:
            return self.session == session and version < self.before

        def sleep_until(deadline: float) -> bool:
            while not cancelled():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                if self.signal.wait(remaining):
                    self.signal.clear()
            return False

        return Job(worker, index, version, params, None, cancelled=cancelled, beat=lambda: None, sleep_until=sleep_until,
                   abandoned=lambda: self.exiting, extra=extra, previous=previous)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class _WorkerContext:
    """What :class:`LocalWorker` needs from a trainer, on a worker rank."""

    def __init__(self, task, layout: FlatLayout, seed: int, num_workers: int):
        self.task, self.layout, self.seed, self.num_workers = task, layout, seed, num_workers


def serve(task, body: LocalWorker, worker: int, seed: int, kill_at_job: int | None = None,
          num_workers: int | None = None) -> int:
    """Worker-rank loop: compute a gradient for every job rank 0 sends until EXIT.

    ``body`` computes exactly as a local worker would (same data stream seed, same
    emulated speed and faults); ``kill_at_job`` SIGKILLs this process when that job
    arrives (a ``"kill"`` :class:`Fault`). Returns the number of gradients sent.
    """
    device = comm_device()
    torch.manual_seed(seed)
    layout, _ = param_layout(task, task.build_model())
    workers = dist.get_world_size() - 1 if num_workers is None else num_workers
    body.bind(_WorkerContext(task, layout, seed, workers), worker)
    body.setup()
    header = torch.zeros(HEADER, dtype=torch.float64, device=device)
    current = torch.empty(layout.numel, device=device)
    previous = None  # allocated at the first MVR/HCM job
    listener = _CancelListener(device)
    sent = 0
    while True:
        dist.recv(header, src=0)
        if header[0].item() == EXIT:
            listener.join(timeout=10.0)
            return sent
        version, index, session, code = (int(v) for v in header[1:].tolist())
        if not 0 <= code <= len(JOBS):
            raise ValueError(f"rank 0 sent a job with extra code {code}; this worker knows 0..{len(JOBS)}")
        extra = JOBS[code - 1] if code else None
        dist.recv(current, src=0)
        if extra is not None:
            previous = torch.empty_like(current) if previous is None else previous
            dist.recv(previous, src=0)
        if kill_at_job is not None and index == kill_at_job:
            os.kill(os.getpid(), signal.SIGKILL)
        result = body.compute(listener.job(worker, index, version, session, current, extra,
                                           None if extra is None else previous))
        if result is None:
            dist.send(torch.tensor([math.nan, 1.0], dtype=torch.float64, device=device), dst=0)
            continue
        grad, loss = result
        dist.send(torch.tensor([loss, 0.0], dtype=torch.float64, device=device), dst=0)
        dist.send(grad.to(device), dst=0)
        sent += 1
