"""``ringmaster train``: a tiny byte-level GPT trained by real asynchronous workers.

The text is the Python standard library's own sources (nothing to download). Workers
are one thread per GPU when there are GPUs (at least two threads on a single GPU), else
CPU threads whose speeds are emulated (worker ``i`` takes at least ``tau * f(i)``
seconds per gradient), so the server sees the staleness of a heterogeneous cluster.
Each method named by ``--methods`` (default: Ringmaster LMO vs synchronous) trains for
``--time`` seconds from the same initial model; the command ends with a table (loss
reached, wall time, updates, discard rate), ``--out/summary.json`` and
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
from ._args import nonnegative_float, nonnegative_int, positive_float, positive_int

DEFAULT_METHODS = "ringmaster,sync"
PROFILES = ("linear", "sqrt", "constant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated async methods to compare (default: {DEFAULT_METHODS})")
    parser.add_argument("--workers", type=int, help="number of workers (default: all GPUs, at least 2; else 4 CPU threads)")
    parser.add_argument("--time", type=positive_float, default=60.0, help="wall seconds per method")
    parser.add_argument("--max-updates", type=int, help="also stop a method after this many updates")
    parser.add_argument("--out", default="runs/train", help="directory for summary.json, the plot and checkpoints")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    model = parser.add_argument_group("model and data")
    model.add_argument("--d-model", type=int, default=64)
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--seq-len", type=int, default=64)
    model.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    model.add_argument("--accum", type=int, default=1, help="micro-batches per gradient")
    model.add_argument("--corpus-bytes", type=int, default=4_000_000, help="bytes of stdlib source to read")
    method = parser.add_argument_group("method")
    method.add_argument("--lr", type=nonnegative_float, default=0.02, help="step size eta of every method")
    method.add_argument("--threshold", type=positive_int, default=4, help="Ringmaster's delay threshold R")
    method.add_argument("--momentum", type=float, default=0.9, help="beta")
    method.add_argument("--batch", type=positive_int, help="Rennala's batch B (default: number of workers)")
    hetero = parser.add_argument_group("emulated heterogeneity (CPU threads)")
    hetero.add_argument("--profile", default="linear", choices=PROFILES,
                        help="worker i (1-based) takes at least tau*i (linear), tau*sqrt(i) or tau seconds")
    hetero.add_argument("--tau", type=nonnegative_float, default=0.05,
                        help="emulated seconds per gradient of the fastest worker (0: no emulation)")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    runtime.add_argument("--torch-threads", type=int, default=1, help="intra-op threads (process-wide)")
    runtime.add_argument("--seed", type=nonnegative_int, default=0)
    runtime.add_argument("--hang-timeout", type=positive_float, default=60.0, help="drop a worker silent this long (s)")
    runtime.add_argument("--checkpoint-every", type=int, help="updates between checkpoints (always one at the end)")
    runtime.add_argument("--resume", action="store_true", help="continue each method from its checkpoint under --out")
    runtime.add_argument("--fault", action="append", default=[], metavar="WORKER:KIND@JOB",
                         help="inject a fault (raise, hang, nan; kill for remote workers), e.g. 2:raise@5")
    runtime.add_argument("--log-every", type=positive_float, default=5.0, help="seconds between progress lines (stderr)")
    runtime.add_argument("--eval-every", type=positive_float, default=10.0, help="seconds between held-out evaluations")
    runtime.add_argument("--distributed", action="store_true",
                         help="run under torchrun: rank 0 serves, other ranks are workers")


def compute_times(n: int, profile: str, tau: float) -> list[float | None]:
    """Emulated seconds per gradient of each worker (``None``: no emulation)."""
    if tau <= 0:
        return [None] * n
    factor = {"linear": lambda i: float(i), "sqrt": math.sqrt, "constant": lambda i: 1.0}[profile]
    return [tau * factor(i) for i in range(1, n + 1)]


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
        worker, fault = Fault.parse(spec)
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
    print(table(summaries))
    print(f"summary: {os.path.join(args.out, 'summary.json')}  plot: {plot_path}")


def table(summaries: dict) -> str:
    rows = [("method", "loss start", "loss reached", "wall s", "updates", "upd/s", "discard rate", "cancelled",
             "server us/upd cpu|wall", "lost workers")]
    for name, s in summaries.items():
        server = s["server"]
        overhead = "-" if server["overhead_us_per_update"] is None else \
            f"{server['overhead_cpu_us_per_update']:.0f} | {server['overhead_us_per_update']:.0f}"
        rows.append((
            name, f"{s['initial_loss']:.3f}", f"{s['final_loss']:.3f}", f"{s['wall_time_s']:.1f}", str(s["updates"]),
            f"{s['updates_per_s']:.1f}", f"{s['discard_rate']:.1%}", str(s["totals"]["cancelled"]),
            overhead, str(len(s["faults"])),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


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


def run(args: argparse.Namespace) -> int:
    import torch

    for name in ("workers", "max_updates", "checkpoint_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"ringmaster train: --{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        method_list(args.methods)
        os.makedirs(args.out, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"ringmaster train: {exc}") from None
    from ..runtime.trainer import LocalWorker

    if args.distributed:
        return run_distributed(args)

    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("ringmaster train: --device cuda but no CUDA device is visible")
    gpus = torch.cuda.device_count() if use_cuda else 0
    n = args.workers or (max(2, gpus) if use_cuda else 4)
    devices = [f"cuda:{i % gpus}" for i in range(n)] if use_cuda else ["cpu"] * n
    times = compute_times(n, args.profile, args.tau)
    try:
        faults = parse_faults(args.fault, n)

        def make_workers():
            return [LocalWorker(devices[i], args.batch_size, args.accum, times[i], fault=faults.get(i)) for i in range(n)]

        summaries = train_methods(args, make_workers, "cuda:0" if use_cuda else "cpu")
    except ValueError as exc:
        raise SystemExit(f"ringmaster train: {exc}") from None
    report(args, summaries)
    return 0 if all(s["stop_reason"] != "interrupted" for s in summaries.values()) else 130


def run_distributed(args: argparse.Namespace) -> int:
    """Under torchrun: rank 0 serves every method in turn; rank r > 0 is worker r - 1."""
    import torch
    import torch.distributed as dist

    from ..runtime import distributed
    from ..runtime.trainer import LocalWorker

    try:
        rank, world = distributed.init_from_env(timeout_s=max(120.0, 2 * args.hang_timeout))
    except ValueError as exc:
        raise SystemExit(f"ringmaster train: {exc}") from None
    if world < 2:
        raise SystemExit("ringmaster train: --distributed needs at least 2 processes (torchrun --nproc-per-node N)")
    n = world - 1
    try:
        faults = parse_faults(args.fault, n)
    except ValueError as exc:
        raise SystemExit(f"ringmaster train: {exc}") from None
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
    body = LocalWorker(server_device, args.batch_size, args.accum, compute_times(n, args.profile, args.tau)[worker],
                       fault=None if kill_at is not None else fault)
    distributed.serve(build_task(args), body, worker, args.seed, kill_at_job=kill_at)
    dist.destroy_process_group()
    return 0
