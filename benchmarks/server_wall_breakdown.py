"""Where the server's wall time per record goes in the demo (``ringmaster train``'s run).

The demo's table shows the server's cost per update in its thread's CPU time and in wall
time, and wall is much larger on a small CPU. This splits the wall time of every record
the server handles (pop to answer, update math included) three ways, from the kernel's
per-thread scheduler counters (``/proc/self/task/<tid>/schedstat``, Linux only):

- ``on_cpu``: the server thread ran;
- ``runqueue``: it was runnable but waited for a core (worker threads, other processes);
- ``blocked``: the rest: it slept, i.e. waited for the GIL (the server never blocks
  otherwise between pop and answer).

Reading the counters costs a few microseconds per record, which lands in ``on_cpu``.
Run it with the workers at the server's priority (the default) and at a lower one to
see what the priority buys, and what it costs the workers on a loaded machine:

    python benchmarks/server_wall_breakdown.py --seconds 30
    python benchmarks/server_wall_breakdown.py --seconds 30 --niceness 10
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringmaster_kernels.cli import build_parser, show_defaults  # noqa: E402
from ringmaster_kernels.commands._args import positive_float  # noqa: E402
from ringmaster_kernels.commands.train import build_task, local_worker, policy_options  # noqa: E402
from ringmaster_kernels.runtime import server as server_module  # noqa: E402
from ringmaster_kernels.runtime.trainer import AsyncTrainer  # noqa: E402


def schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting) of the calling thread."""
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as fh:
        on_cpu, waiting, _ = fh.read().split()
    return int(on_cpu) * 1e-9, int(waiting) * 1e-9


def measure(method: str, seconds: float, niceness: int) -> dict:
    """One demo-sized run of ``method``; the split of the server's per-record wall time."""
    args = build_parser().parse_args(["train", "--methods", method])  # the demo's defaults
    totals = {"records": 0, "wall": 0.0, "on_cpu": 0.0, "runqueue": 0.0}
    handle = server_module.Server.handle

    def timed_handle(self, record) -> None:
        wall, (cpu, queued) = time.perf_counter(), schedstat()
        handle(self, record)
        cpu_after, queued_after = schedstat()
        totals["records"] += 1
        totals["wall"] += time.perf_counter() - wall
        totals["on_cpu"] += cpu_after - cpu
        totals["runqueue"] += queued_after - queued

    n = 4
    workers = [local_worker(args, "cpu", i, n) for i in range(n)]
    trainer = AsyncTrainer(build_task(args), workers, method, policy_options(args, method, n),
                           torch_threads=1, worker_niceness=niceness)
    server_module.Server.handle = timed_handle
    try:
        summary = trainer.run(max_time=seconds)
    finally:
        server_module.Server.handle = handle
    records = max(totals["records"], 1)
    per_record = {k: 1e6 * totals[k] / records for k in ("wall", "on_cpu", "runqueue")}
    per_record["blocked"] = per_record["wall"] - per_record["on_cpu"] - per_record["runqueue"]
    server = summary["server"]
    return {"method": method, "niceness": niceness, "load_average": os.getloadavg(), "records": totals["records"],
            "updates": summary["updates"], "us_per_record": per_record,
            "overhead_cpu_us_per_update": server["overhead_cpu_us_per_update"],
            "overhead_wall_us_per_update": server["overhead_us_per_update"],
            "math_ms_per_update": server["math_ms_per_update"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive_float, default=30.0, help="run length")
    parser.add_argument("--methods", default="ringmaster,sync", help="comma-separated methods")
    parser.add_argument("--niceness", type=int, choices=range(20), default=0, metavar="0..19",
                        help="the worker threads' niceness relative to the server")
    parser.add_argument("--json", action="store_true", help="print one JSON object per method")
    show_defaults(parser)
    args = parser.parse_args(argv)
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/schedstat"):
        parser.error("needs Linux's /proc/<pid>/task/<tid>/schedstat")
    for method in args.methods.split(","):
        row = measure(method, args.seconds, args.niceness)
        if args.json:
            print(json.dumps(row))
            continue
        r = row["us_per_record"]
        print(f"{method} (workers at nice +{args.niceness}, load {row['load_average'][0]:.1f}): {row['records']} records, "
              f"{row['updates']} updates; per record: wall {r['wall']:.0f} us = on CPU {r['on_cpu']:.0f} "
              f"+ waiting for a core {r['runqueue']:.0f} + blocked (GIL) {r['blocked']:.0f}; "
              f"overhead per update: CPU {row['overhead_cpu_us_per_update']:.0f} us, "
              f"wall {row['overhead_wall_us_per_update']:.0f} us; update math {row['math_ms_per_update']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
