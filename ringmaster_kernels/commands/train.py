"""``ringmaster train``: a tiny byte-level GPT trained by real asynchronous workers.

The text is the Python standard library's own sources (nothing to download). Workers
are one thread per GPU when there are GPUs (at least two threads on a single GPU), else
CPU threads. Their speeds are made unequal: worker ``i`` (1-based) takes ``f(i)`` times
its own measured compute time per gradient (``f(i) = i`` for ``--profile linear``), so
the ratios hold however loaded the machine is and the server sees the staleness of a
heterogeneous cluster. Each method named by ``--methods`` (default: Ringmaster LMO vs
synchronous) trains for ``--time`` seconds from the same initial model; the command ends
with a table (held-out and training loss, updates, discards, the server's cost per
update), each worker's achieved speed, ``--out/summary.json`` and
``--out/loss_vs_time.png``. ``--json`` prints one JSON object instead of the table.

Under ``torchrun`` (``--distributed``), rank 0 runs the server and every other rank one
remote worker (Gloo on CPU, NCCL on GPU); see ``runtime/distributed.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from ._args import nonnegative_float, nonnegative_int, positive_float, positive_int, unit_interval

PROG = "ringmaster train"
DEFAULT_METHODS = "ringmaster,sync"
PROFILES = ("linear", "sqrt", "constant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated async methods to compare")
    parser.add_argument("--workers", type=positive_int,
                        help="number of workers (default: all GPUs, at least 2; else 4 CPU threads)")
    parser.add_argument("--time", type=positive_float, default=60.0, help="wall seconds per method")
    parser.add_argument("--max-updates", type=positive_int, help="also stop a method after this many updates")
    parser.add_argument("--out", default="runs/train", help="directory for summary.json, the plot and checkpoints")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    model = parser.add_argument_group("model and data")
    model.add_argument("--d-model", type=positive_int, default=64, help="width (a multiple of --heads)")
    model.add_argument("--layers", type=positive_int, default=2, help="transformer blocks")
    model.add_argument("--heads", type=positive_int, default=4, help="attention heads")
    model.add_argument("--seq-len", type=positive_int, default=64, help="bytes per sequence")
    model.add_argument("--batch-size", type=positive_int, default=16, help="sequences per micro-batch")
    model.add_argument("--accum", type=positive_int, default=1, help="micro-batches per gradient")
    model.add_argument("--corpus-bytes", type=positive_int, default=4_000_000, help="bytes of stdlib source to read")
    method = parser.add_argument_group("method")
    method.add_argument("--lr", type=nonnegative_float, default=0.02, help="step size eta of every method")
    method.add_argument("--threshold", type=positive_int, default=4, help="Ringmaster's delay threshold R")
    method.add_argument("--momentum", type=unit_interval, default=0.9, help="beta, in [0, 1)")
    method.add_argument("--batch", type=positive_int, help="Rennala's batch B (default: number of workers)")
    hetero = parser.add_argument_group("emulated heterogeneity")
    hetero.add_argument("--profile", default="linear", choices=PROFILES,
                        help="worker i (1-based) takes f(i) = i (linear), sqrt(i) or 1 (constant) times its own "
                             "measured compute time per gradient")
    hetero.add_argument("--tau", type=nonnegative_float, default=0.0,
                        help="also a floor: worker i takes at least tau*f(i) wall seconds per gradient (0: none)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    runtime.add_argument("--torch-threads", type=positive_int, default=1, help="intra-op threads (process-wide)")
    runtime.add_argument("--worker-niceness", type=int, choices=range(20), default=0, metavar="0..19",
                         help="run the worker threads this much nicer than the server (Linux): the server "
                              "waits less for a core, but the workers yield to other processes too")
    runtime.add_argument("--seed", type=nonnegative_int, default=0)
    runtime.add_argument("--hang-timeout", type=positive_float, default=60.0, help="drop a worker silent this long (s)")
    runtime.add_argument("--checkpoint-every", type=positive_int, help="updates between checkpoints (always one at the end)")
    runtime.add_argument("--resume", action="store_true", help="continue each method from its checkpoint under --out")
    runtime.add_argument("--fault", action="append", default=[], metavar="WORKER:KIND@JOB",
                         help="inject a fault (raise, hang, nan; kill for remote workers), e.g. 2:raise@5")
    runtime.add_argument("--log-every", type=positive_float, default=5.0, help="seconds between progress lines (stderr)")
    runtime.add_argument("--eval-every", type=positive_float, default=10.0, help="seconds between held-out evaluations")
    runtime.add_argument("--distributed", action="store_true",
                         help="run under torchrun: rank 0 serves, other ranks are workers")


def slowdowns(n: int, profile: str) -> list[float]:
    """``f(i)`` for workers i = 1..n: how many times its own compute time each one takes."""
    factor = {"linear": float, "sqrt": math.sqrt, "constant": lambda i: 1.0}[profile]
    return [factor(i) for i in range(1, n + 1)]


def compute_times(n: int, profile: str, tau: float) -> list[float | None]:
    """Each worker's floor in wall seconds per gradient, ``tau * f(i)`` (``None``: none)."""
    if tau <= 0:
        return [None] * n
    return [tau * f for f in slowdowns(n, profile)]


def local_worker(args: argparse.Namespace, device: str, worker: int, n: int, fault=None):
    """Worker ``worker`` of ``n`` as ``args`` describe it: its slowdown, floor and fault."""
    from ..runtime.trainer import LocalWorker

    return LocalWorker(device, args.batch_size, args.accum, compute_times(n, args.profile, args.tau)[worker],
                       slowdown=slowdowns(n, args.profile)[worker], fault=fault)


def build_task(args: argparse.Namespace):
    """The GPT task of ``args`` (every rank builds the same one)."""
    from ..runtime.data import ByteData, stdlib_corpus
    from ..runtime.model import GPTConfig, GPTTask

    cfg = GPTConfig(seq_len=args.seq_len, n_layer=args.layers, n_head=args.heads, d_model=args.d_model)
    return GPTTask(cfg, ByteData(stdlib_corpus(args.corpus_bytes), cfg.seq_len))


def method_list(text: str) -> list[str]:
    """``--methods`` as names of ``METHODS``, each once (ValueError naming the flag otherwise)."""
    from ..optim.policies import METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown:
        raise ValueError(f"--methods: unknown {unknown or names}; known: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods: each method once, got {names}")
    return names


def policy_options(args: argparse.Namespace, method: str, num_workers: int) -> dict:
    """The flags ``method`` takes (every Ringmaster variant by name takes ``--threshold``;
    the parameter-agnostic ones follow their own momentum schedule)."""
    from ..optim.policies import METHODS

    options = {"lr": args.lr, "momentum": args.momentum, "threshold": args.threshold,
               "batch": args.batch or num_workers}
    return {k: v for k, v in options.items() if k in METHODS[method][2]}


def parse_faults(specs: list[str], n: int) -> dict:
    from ..runtime.trainer import Fault

    faults = {}
    for spec in specs:
        try:
            worker, fault = Fault.parse(spec)
        except ValueError as exc:
            raise ValueError(f"--fault {spec}: {exc}") from None
        if not 0 <= worker < n:
            raise ValueError(f"--fault {spec}: worker must be in [0, {n})")
        if worker in faults:
            raise ValueError(f"--fault {spec}: worker {worker} already has a fault ({faults[worker].kind}@{faults[worker].at_job})")
        faults[worker] = fault
    return faults


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_methods(args: argparse.Namespace, make_workers, server_device: str) -> dict:
    """Train every method of ``args.methods`` with fresh workers; returns name -> summary."""
    from ..runtime.trainer import AsyncTrainer

    task = build_task(args)
    summaries = {}
    for method in method_list(args.methods):
        workers = make_workers()
        path = os.path.join(args.out, method, "checkpoint.pt")
        trainer = AsyncTrainer(
            task, workers, method, policy_options(args, method, len(workers)),
            server_device=server_device, seed=args.seed, hang_timeout=args.hang_timeout,
            checkpoint_path=path, checkpoint_every=args.checkpoint_every,
            log=_log, log_every=args.log_every, eval_every=args.eval_every, torch_threads=args.torch_threads,
            worker_niceness=args.worker_niceness,
        )
        if args.resume and os.path.exists(path):
            trainer.load_checkpoint(path)
            _log(f"[ringmaster] {method}: resumed from {path} at version {trainer.version}")
        _log(f"[ringmaster] {method}: {len(workers)} workers, {args.time:g} s")
        summaries[method] = trainer.run(max_updates=args.max_updates, max_time=args.time)
        if summaries[method]["stop_reason"] == "interrupted":
            break
    return summaries


def report(args: argparse.Namespace, summaries: dict) -> None:
    """Write summary.json and the plot under ``args.out``; print the table or JSON."""
    from ._timing import machine_info

    os.makedirs(args.out, exist_ok=True)
    result = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "methods": summaries}
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    plot_path = os.path.join(args.out, "loss_vs_time.png")
    plot(summaries, plot_path)
    if args.json:
        light = {name: {k: v for k, v in s.items() if k not in ("curve", "evals")} for name, s in summaries.items()}
        print(json.dumps({"machine": result["machine"], "methods": light, "plot": plot_path}, default=str))
        return
    print(table(summaries, args.profile))
    print(f"summary: {os.path.join(args.out, 'summary.json')}  plot: {plot_path}")


TABLE_NOTES = """\
held-out: the task's loss on held-out bytes (nats/byte) at the start and the end of the method's run;
  train EMA: moving average of the accepted gradients' batch losses (what the progress lines print).
discarded: share of delivered gradients the method threw away; cancelled: jobs stopped before delivery.
server us/upd: the server's own cost per update (queue, policy, books; update math and publication
  excluded). CPU is the server thread's CPU time; wall also counts the time it waited, runnable, for a
  core or the GIL while {threads} worker threads share {cores} cores, so wall >= CPU.
s/gradient: a worker's seconds per completed gradient ({profile} profile: f(i) times its own compute)."""


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(summaries: dict, profile: str = "linear") -> str:
    """The methods side by side, each worker's achieved speed, and what the columns mean."""
    from ..runtime.reporting import text_table

    rows = [("method", "held-out start", "held-out end", "train EMA", "wall s", "updates", "upd/s", "discarded",
             "cancelled", "server CPU us/upd", "server wall us/upd", "lost workers")]
    for name, s in summaries.items():
        server = s["server"]
        rows.append((
            name, _fmt(s["initial_loss"], ".3f"), _fmt(s["final_loss"], ".3f"), _fmt(s["train_loss_ema"], ".3f"),
            f"{s['wall_time_s']:.1f}", str(s["updates"]), f"{s['updates_per_s']:.1f}", f"{s['discard_rate']:.1%}",
            str(s["totals"]["cancelled"]), _fmt(server["overhead_cpu_us_per_update"], ".0f"),
            _fmt(server["overhead_us_per_update"], ".0f"), str(len(s["faults"])),
        ))
    workers = [("method", "worker", "slowdown", "s/gradient", "jobs/s", "delivered/s", "accepted")]
    for name, s in summaries.items():
        factors = slowdowns(len(s["per_worker"]), profile)
        for w, f in zip(s["per_worker"], factors):
            workers.append((name, str(w["worker"]), f"x{f:.2g}", _fmt(w["seconds_per_gradient"], ".3f"),
                            f"{w['jobs_per_s']:.2f}", f"{w['gradients_per_s']:.2f}", str(w["accepted"])))
    n = max(s["workers"] for s in summaries.values())
    notes = TABLE_NOTES.format(threads=n, cores=os.cpu_count(), profile=profile)
    return f"{text_table(rows)}\n\n{text_table(workers)}\n\n{notes}"


def plot(summaries: dict, path: str) -> None:
    """Training-loss EMA (lines) and held-out loss (markers) against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in summaries.items():
        if s["curve"]:
            t, _, loss = zip(*s["curve"])
            line, = ax.plot(t, loss, label=f"{name} (train EMA)")
            color = line.get_color()
        else:
            color = None
        if s["evals"]:
            t, _, loss = zip(*s["evals"])
            ax.plot(t, loss, "o--", color=color, label=f"{name} (held-out)", markersize=4)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("byte-level GPT on stdlib sources: loss vs wall time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def worker_count(args: argparse.Namespace) -> int:
    """Workers of the run: ``--workers``, else one per GPU (at least 2) or 4 CPU threads;
    under ``--distributed`` one per rank but rank 0 (``WORLD_SIZE - 1``)."""
    import torch

    if args.distributed:
        return int(os.environ.get("WORLD_SIZE", "1")) - 1
    if args.workers:
        return args.workers
    return max(2, torch.cuda.device_count()) if _use_cuda(args) else 4


def _use_cuda(args: argparse.Namespace) -> bool:
    import torch

    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def check(args: argparse.Namespace) -> None:
    """Every flag checked before any work; a ValueError names the flag."""
    import torch

    method_list(args.methods)
    if args.d_model % args.heads:
        raise ValueError(f"--d-model ({args.d_model}) must be a multiple of --heads ({args.heads})")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: cannot create {args.out!r}: {exc.strerror}") from None
    if not os.access(args.out, os.W_OK):
        raise ValueError(f"--out: cannot write into {args.out!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is visible")
    if args.distributed and worker_count(args) < 1:
        raise ValueError("--distributed needs at least 2 processes (torchrun --nproc-per-node N)")
    faults = parse_faults(args.fault, worker_count(args))
    if not args.distributed and any(f.kind == "kill" for f in faults.values()):
        raise ValueError("--fault: kind 'kill' is for --distributed runs (it would kill this whole process)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.distributed:
        return run_distributed(args)
    use_cuda = _use_cuda(args)
    n = worker_count(args)
    gpus = torch.cuda.device_count() if use_cuda else 0
    devices = [f"cuda:{i % gpus}" for i in range(n)] if use_cuda else ["cpu"] * n
    faults = parse_faults(args.fault, n)
    try:
        summaries = train_methods(
            args, lambda: [local_worker(args, devices[i], i, n, faults.get(i)) for i in range(n)],
            "cuda:0" if use_cuda else "cpu")
    except ValueError as exc:  # e.g. --resume with a checkpoint of another run
        raise SystemExit(f"{PROG}: error: {exc}") from None
    report(args, summaries)
    return 0 if all(s["stop_reason"] != "interrupted" for s in summaries.values()) else 130


def run_distributed(args: argparse.Namespace) -> int:
    """Under torchrun: rank 0 serves every method in turn; rank r > 0 is worker r - 1."""
    import torch
    import torch.distributed as dist

    from ..runtime import distributed

    try:
        rank, world = distributed.init_from_env(timeout_s=max(120.0, 2 * args.hang_timeout))
    except ValueError as exc:
        raise SystemExit(f"{PROG}: error: {exc}") from None
    n = world - 1
    faults = parse_faults(args.fault, n)
    server_device = str(distributed.comm_device())
    if rank == 0:
        summaries = train_methods(args, lambda: [distributed.RemoteWorker(r) for r in range(1, world)], server_device)
        lost = {w["worker"] + 1 for s in summaries.values() for w in s["per_worker"] if w["status"] in ("dead", "dropped")}
        distributed.send_exit([r for r in range(1, world) if r not in lost])
        report(args, summaries)
        code = 0 if all(s["stop_reason"] != "interrupted" for s in summaries.values()) else 130
        if lost:
            # a process group with a dead peer may block in teardown: leave without it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        dist.destroy_process_group()
        return code
    torch.set_num_threads(args.torch_threads)
    worker = rank - 1
    fault = faults.get(worker)
    kill_at = fault.at_job if fault is not None and fault.kind == "kill" else None
    body = local_worker(args, server_device, worker, n, None if kill_at is not None else fault)
    distributed.serve(build_task(args), body, worker, args.seed, kill_at_job=kill_at)
    dist.destroy_process_group()
    return 0
