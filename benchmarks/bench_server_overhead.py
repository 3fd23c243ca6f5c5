"""Server overhead per update of the async runtime: queue + policy decision + bookkeeping.

The update math is made negligible (one 8-float parameter, raw gradient step, no
momentum) and what remains of it is subtracted anyway: the trainer clocks the time from
the policy's first touch of the gradient to its return ("math") and the parameter
publication ("publish"), and reports ``busy - math - publish``, in the server thread's
CPU time (the cost) and in wall time (which also holds waits for the GIL and, on a
shared machine, for other processes). Workers are threads that compute a trivial
gradient and push at once, so the server is never idle for long.

Two settings:
  * ``idle_workers``: the workers' own Python work is tiny: the server's intrinsic cost;
  * ``gpt_workers``: worker threads run a tiny GPT's forward/backward in Python, as in
    ``ringmaster train``: the server then also waits for the GIL those threads hold.

Usage: ``python benchmarks/bench_server_overhead.py [--json] [--seconds 3] [--workers 1,2,4] [--quick]``
(the default takes about 3 minutes; ``--quick`` about 20 s, one short run per setting).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ringmaster_kernels.cli import show_defaults  # noqa: E402
from ringmaster_kernels.commands._args import positive_float, positive_int  # noqa: E402
from ringmaster_kernels.commands._timing import emit, machine_info  # noqa: E402
from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker  # noqa: E402

TARGET_US = 200.0


class TinyTask:
    """An 8-weight linear model: gradients cost microseconds, the update is one add."""

    def build_model(self) -> nn.Module:
        return nn.Linear(8, 1, bias=False)

    def group_of(self, name: str) -> dict:
        return {"norm": None}

    def sample(self, batch_size, generator, device):
        return torch.randn(batch_size, 8, generator=generator)

    def loss(self, model, batch):
        return model(batch).square().mean()

    def evaluate(self, model) -> float:
        return float(model.weight.detach().square().sum())


def gpt_task():
    """A tiny GPT whose update is a raw gradient step (no LMO), so the math stays small."""
    from ringmaster_kernels.runtime.data import ByteData, stdlib_corpus
    from ringmaster_kernels.runtime.model import GPTConfig, GPTTask

    class RawStepGPT(GPTTask):
        def group_of(self, name: str) -> dict:
            return {"norm": None}

    cfg = GPTConfig(d_model=32, n_layer=1, n_head=2, seq_len=32)
    return RawStepGPT(cfg, ByteData(stdlib_corpus(300_000), cfg.seq_len), val_batches=1)


def measure(task, workers: int, method: str, options: dict, seconds: float) -> dict:
    trainer = AsyncTrainer(task, [LocalWorker(batch_size=1) for _ in range(workers)], method, options, torch_threads=1)
    s = trainer.run(max_time=seconds)
    server = s["server"]
    return {"method": method, "workers": workers, "updates": s["updates"], "records": server["records"],
            "updates_per_s": s["updates_per_s"], "overhead_us_per_update": server["overhead_us_per_update"],
            "overhead_cpu_us_per_update": server["overhead_cpu_us_per_update"],
            "overhead_us_per_record": server["overhead_us_per_record"],
            "math_us_per_update": 1e3 * server["math_ms_per_update"] if server["math_ms_per_update"] else None,
            "publish_us_per_update": server["publish_us_per_update"], "accounting_ok": s["accounting_ok"]}


def worker_counts(text: str) -> list[int]:
    """``--workers``: comma-separated ints >= 1."""
    return [positive_int(w) for w in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive_float, help="run length per setting (default: 3; 1 with --quick)")
    parser.add_argument("--workers", type=worker_counts, help="comma-separated worker-thread counts "
                                                              "(default: 1,2,4; 1,4 with --quick)")
    parser.add_argument("--repeats", type=positive_int,
                        help="runs per setting, the median is reported (default: 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a fast look: shorter runs, fewer settings")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    show_defaults(parser)
    args = parser.parse_args(argv)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    counts = args.workers or ([1, 4] if args.quick else [1, 2, 4])
    repeats = args.repeats or (1 if args.quick else 3)
    methods = [("async", {"lr": 1e-3, "momentum": 0.0}),
               ("ringmaster", {"lr": 1e-3, "momentum": 0.0, "threshold": 2}),
               ("sync", {"lr": 1e-3, "momentum": 0.0})]
    rows = []
    # stderr, shown on a terminal only
    progress = tqdm(total=2 * len(counts) * len(methods) * repeats, desc="server overhead", unit="run", leave=False, disable=None)
    for setting, task in (("idle_workers", TinyTask()), ("gpt_workers", gpt_task())):
        for n in counts:
            for method, options in methods:
                runs = []
                for _ in range(repeats):
                    progress.set_postfix_str(f"{setting} {method} x{n}")
                    runs.append(measure(task, n, method, options, seconds))
                    progress.update()
                runs.sort(key=lambda r: r["overhead_cpu_us_per_update"] or 0.0)
                row = dict(runs[len(runs) // 2], setting=setting)
                row["overhead_us_per_update_all"] = [r["overhead_us_per_update"] for r in runs]
                rows.append(row)
    progress.close()
    cpu = [r["overhead_cpu_us_per_update"] for r in rows]
    wall = [r["overhead_us_per_update"] for r in rows]
    result = {"benchmark": "server_overhead", "machine": machine_info(), "target_us": TARGET_US,
              "median_cpu_us_per_update": statistics.median(cpu), "max_cpu_us_per_update": max(cpu),
              "median_wall_us_per_update": statistics.median(wall), "max_wall_us_per_update": max(wall),
              "rows": rows}

    def table(res: dict) -> str:
        lines = [f"server overhead per update (target < {TARGET_US:.0f} us); {res['machine']['cpu']}, torch {res['machine']['torch']}",
                 f"{'setting':13s} {'method':10s} {'workers':>7s} {'updates/s':>9s} {'cpu us/upd':>10s} {'wall us/upd':>11s} "
                 f"{'wall us/rec':>11s} {'math us':>8s} {'publish us':>10s}"]
        for r in res["rows"]:
            lines.append(f"{r['setting']:13s} {r['method']:10s} {r['workers']:7d} {r['updates_per_s']:9.0f} "
                         f"{r['overhead_cpu_us_per_update']:10.1f} {r['overhead_us_per_update']:11.1f} {r['overhead_us_per_record']:11.1f} "
                         f"{r['math_us_per_update'] or 0:8.1f} {r['publish_us_per_update']:10.1f}")
        return "\n".join(lines)

    emit(result, args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
