"""Ringmaster LMO on NanoChat: async methods on NanoChat's own model, data and optimizer recipe.

Every method trains NanoChat's GPT (built as base_train builds it from the arguments after
``--``) with NanoChat's param groups, schedules and RingmasterMuonAdamW as the update rule;
only the delay rule differs. Metric: validation bits per byte.

    # the paper's protocol on one device (virtual clock), tau_i proportional to i
    python python/nanochat_async.py --nanochat-dir ~/nanochat --clock virtual --profile linear \\
        --workers 8 --time 500 -- --depth=6 --max-seq-len=2048 --device-batch-size=4
    # real worker threads with emulated unequal speeds (CPU, or the machine's GPUs)
    python python/nanochat_async.py --nanochat-dir ~/nanochat --clock real --time 60 -- --depth=2 --max-seq-len=128
    # one worker per rank, rank 0 serves (Gloo on CPU, NCCL on GPU)
    torchrun --nproc-per-node 5 python/nanochat_async.py --nanochat-dir ~/nanochat --distributed -- --depth=2

NanoChat's data (parquet shards under $NANOCHAT_BASE_DIR, a trained tokenizer) must be
prepared as for base_train. Each method runs ``--seeds K`` times (default 5; seeds
``--seed`` ..); the table gives the median [min, max] over seeds, the plot the median curve
with a min-max band. Writes ``--out/summary.json`` (every run and the aggregates),
``--out/loss_vs_time.png``, checkpoints under ``--out/seed<s>/<method>/`` and NanoChat-format
checkpoints under ``$NANOCHAT_BASE_DIR/base_checkpoints/ringmaster_<clock>_<method>_d<depth>``
(the last seed's).
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_METHODS = "ringmaster,sync,rennala,delay_adaptive,async,ringmaster_pa"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nanochat-dir", required=True, help="root of a NanoChat checkout")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated async methods")
    parser.add_argument("--workers", type=int, default=8, help="number of workers n")
    parser.add_argument("--profile", default="linear", choices=("sqrt", "linear", "uniform"),
                        help="worker i (1-based) takes f(i) times the fastest: i, sqrt(i) or 1")
    parser.add_argument("--time", type=float, default=60.0, help="seconds per method (wall or virtual)")
    parser.add_argument("--clock", default="real", choices=("real", "virtual"))
    parser.add_argument("--distributed", action="store_true", help="under torchrun: one worker per rank, rank 0 serves")
    parser.add_argument("--threshold", type=int, default=2, help="Ringmaster's delay threshold R")
    parser.add_argument("--batch", type=int, help="Rennala's batch B (default: number of workers)")
    parser.add_argument("--accum", type=int, default=1, help="device batches per gradient")
    parser.add_argument("--eval-every", type=float, default=10.0, help="real clock: seconds between val bpb evaluations")
    parser.add_argument("--record-every", type=int, default=5, help="virtual clock: updates between val bpb evaluations")
    parser.add_argument("--base", type=float,
                        help="virtual clock: seconds per gradient of the fastest worker (default: measured on this device)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (model init, data order, time jitter)")
    parser.add_argument("--seeds", type=int, default=5,
                        help="runs per method, seeds --seed .. --seed + K - 1: median [min, max] in the table, "
                             "median curve with a min-max band in the plot")
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads (process-wide)")
    parser.add_argument("--out", default="runs/nanochat_async", help="directory for summary.json, the plot, checkpoints")
    parser.add_argument("--plot", help="PNG path (default: <out>/loss_vs_time.png)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then base_train's model/data arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    for name in ("workers", "accum", "record_every", "torch_threads", "threshold"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    for name in ("time", "eval_every"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(args, name)}")
    if args.base is not None and not (math.isfinite(args.base) and args.base > 0):
        parser.error(f"--base must be a finite number of seconds > 0, got {args.base}")
    if args.distributed and args.clock != "real":
        parser.error("--distributed runs real workers: use it with --clock real")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    return args, rest


def main(argv: list[str]) -> int:
    args, rest = parse(argv)
    import torch

    from ringmaster_kernels.integrations.nanochat_task import NanoChatTask
    from ringmaster_kernels.runtime import task_experiment as te

    try:
        methods = te.check_methods(args.methods.split(","))
        plot_path = args.plot or os.path.join(args.out, "loss_vs_time.png")
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
        cuda = torch.cuda.is_available()
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if cuda else ["cpu"]
        task = NanoChatTask(args.nanochat_dir, rest, accum_steps=args.accum, device=devices[0],
                            tag_prefix=f"ringmaster_{args.clock}")
    except ValueError as exc:
        raise SystemExit(f"nanochat_async: {exc}") from None
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    a = task.args
    if args.distributed:
        return run_distributed(args, task, methods, plot_path, log)
    result = te.run_seeds(
        task, methods, seeds=seeds_of(args), clock=args.clock, num_workers=args.workers, profile=args.profile,
        seconds=args.time, out=args.out, threshold=args.threshold, batch=args.batch, batch_size=a.device_batch_size,
        accum=args.accum, devices=devices, eval_every=args.eval_every, record_every=args.record_every, log=log,
        torch_threads=args.torch_threads, base_seconds=args.base)
    return report(args, rest, result, plot_path)


def seeds_of(args: argparse.Namespace) -> list[int]:
    return list(range(args.seed, args.seed + args.seeds))


def report(args: argparse.Namespace, rest: list[str], result: dict, plot_path: str) -> int:
    from ringmaster_kernels.runtime import task_experiment as te
    from ringmaster_kernels.runtime.reporting import json_ready

    title = f"NanoChat ({' '.join(rest) or 'base_train defaults'}): {args.workers} workers, {args.profile}, {args.clock} clock"
    te.plot(result, plot_path, title)
    out = {"args": vars(args), "base_train_args": rest, **json_ready(result), "plot": plot_path}
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(out, fh, indent=1, allow_nan=False, default=str)
    if args.json:
        print(json.dumps(out, allow_nan=False, default=str))
    else:
        print(te.table(result))
        print(f"summary: {os.path.join(args.out, 'summary.json')}  plot: {plot_path}")
    return 0


def run_distributed(args: argparse.Namespace, task, methods: list[str], plot_path: str, log) -> int:
    """Rank 0 serves every method in turn; rank r > 0 is worker r - 1 (emulated speed f(r))."""
    import torch.distributed as dist

    from ringmaster_kernels.runtime import distributed, task_experiment as te
    from ringmaster_kernels.runtime.trainer import AsyncTrainer
    from ringmaster_kernels.runtime.virtual import profile_factors
    from ringmaster_kernels.runtime.worker import LocalWorker

    rank, world = distributed.init_from_env()
    if world < 2:
        raise SystemExit("nanochat_async: --distributed needs at least 2 processes (torchrun --nproc-per-node N)")
    n = world - 1
    device = str(distributed.comm_device())
    if rank > 0:
        factor = float(profile_factors(args.profile, n)[rank - 1])
        body = LocalWorker(device, task.args.device_batch_size, args.accum, slowdown=factor)
        distributed.serve(task, body, rank - 1, args.seed, num_workers=n)
        dist.destroy_process_group()
        return 0
    args.workers = n
    runs = []
    for seed in seeds_of(args):  # the server's seed (model init); each rank's data stream goes on
        summaries = {}
        for method in methods:
            trainer = AsyncTrainer(task, [distributed.RemoteWorker(r) for r in range(1, world)], method,
                                   te.policy_options(method, args.threshold, args.batch, n), server_device=device,
                                   seed=seed, log=log, eval_every=args.eval_every,
                                   checkpoint_path=os.path.join(args.out, f"seed{seed}", method, "checkpoint.pt"))
            summaries[method] = te.real_summary(method, trainer.run(max_time=args.time), trainer.exported)
        te.add_time_to_reference(summaries)
        runs.append(summaries)
    distributed.send_exit(list(range(1, world)))
    result = {"seeds": seeds_of(args), "runs": runs, "aggregate": te.aggregate_runs(runs)}
    code = report(args, [], result, plot_path)
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
