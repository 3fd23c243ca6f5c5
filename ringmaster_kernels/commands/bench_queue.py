"""``ringmaster bench queue``: gradient-queue throughput and wake-up latency.

All figures come from one run, with the Python baselines (``queue.SimpleQueue``,
``queue.Queue``) measured in the same process, so ratios are comparable:

- ``cpp_1p1c_records_per_s``, ``cpp_4p1c_records_per_s``: C++ threads, each record
  a full worker/server cycle (acquire_slot, push, pop, release_slot), every record
  checked for loss, duplication and order.
- ``py_push_pop_pairs_per_s``: one Python thread, ``push`` then ``pop``.
- ``py_slot_cycle_per_s``: one Python thread, acquire_slot, push, pop, release_slot.
- ``py_pop_many_records_per_s``: records per second drained from a full ring by the
  batched fast path, ``pop_into(out)`` with ``out`` a ``(batch, 3)`` uint64 array
  (filling the ring and releasing the slots afterwards are not timed).
- ``py_pop_many_list_records_per_s``: the same drain with ``pop_many(batch)``, which
  builds one ``Record`` per record.
- ``simplequeue_pairs_per_s``, ``queue_pairs_per_s``: ``put`` then ``get``.
- ``wakeup_latency_us_median``: a C++ consumer asleep in ``pop``; push to wake.
- ``py_wakeup_latency_us_median``: the same with a Python thread asleep in ``pop``.
"""
from __future__ import annotations

import argparse
from typing import Callable
from ._args import positive_int


def push_pop_loop(q, slot: int, n: int) -> Callable[[], None]:
    """The timed Python loop: ``n`` times ``q.push(slot, 0, i)`` then ``q.pop()`` (q a GradientQueue)."""
    def loop() -> None:
        push, pop = q.push, q.pop  # bound once: attribute lookups would dominate a tight loop
        for i in range(n):
            push(slot, 0, i)
            pop()

    return loop


def put_get_loop(sq, slot: int, n: int) -> Callable[[], None]:
    """The baseline of ``push_pop_loop``: the same record as a tuple through ``sq.put`` / ``sq.get``."""
    def loop() -> None:
        put, get = sq.put, sq.get
        for i in range(n):
            put((slot, 0, i))
            get()

    return loop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--records", type=positive_int, default=2_000_000, help="records per C++ run (split over producers)")
    parser.add_argument("--pairs", type=positive_int, default=200_000, help="operations per Python timing loop")
    parser.add_argument("--batch", type=positive_int, default=256, help="records per pop_into / pop_many call")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds per figure (median reported)")
    parser.add_argument("--wakeups", type=positive_int, default=200, help="samples for the wake-up latency")


def run(args: argparse.Namespace) -> int:
    import os
    import queue as stdlib_queue
    import statistics
    import threading
    import time
    from functools import partial

    import numpy as np

    from ringmaster_kernels.commands._timing import emit, machine_info, time_fn
    from ringmaster_kernels.queue import GradientQueue, stress, wakeup_latencies_us

    n, repeats = args.pairs, args.repeats

    def cpp_rate(producers: int) -> float:
        per_producer = max(1, args.records // producers)

        def once() -> None:
            result = stress(producers, per_producer, 1, 1024, 1024)
            if not result["ok"]:
                raise RuntimeError(f"queue stress run failed: {result}")

        return per_producer * producers / time_fn(once, warmup=1, repeats=repeats)["median_s"]

    q = GradientQueue(capacity=max(1024, 1 << (args.batch - 1).bit_length()), num_slots=1, num_workers=1)
    slot = q.acquire_slot()

    def slot_cycle() -> None:
        push, pop, acquire, release = q.push, q.pop, q.acquire_slot, q.release_slot
        q.release_slot(slot)
        for i in range(n):
            s = acquire()
            push(s, 0, i)
            release(pop().slot)
        q.acquire_slot()  # the only slot, so this is `slot` again

    # The drains get a queue of their own with a slot per cell: each record names
    # a distinct acquired slot, as in real use (a slot is pushed once per acquire).
    dq = GradientQueue(capacity=q.capacity, num_slots=q.capacity, num_workers=1)
    rounds = max(1, n // dq.capacity)
    drained = rounds * dq.capacity

    def drain_seconds(drain_once) -> float:
        """Fills the ring (untimed), times `drain_once()` until it comes back empty,
        returns the slots (untimed); ~n records in all."""
        try_push, acquire, release = dq.try_push, dq.acquire_slot, dq.release_slot
        total = 0.0
        for _ in range(rounds):
            for i in range(dq.capacity):
                try_push(acquire(0), 0, i)
            t0 = time.perf_counter()
            while drain_once():
                pass
            total += time.perf_counter() - t0
            for s in range(dq.capacity):
                release(s)
        return total

    out = np.empty((args.batch, 3), dtype=np.uint64)

    # Interleaved rounds (each loop once per round, in turn), so that load on a
    # shared machine hits ours and the baselines alike: a rate is count / median
    # round time, a ratio the median of the per-round ratios.
    def one_round(loop: Callable[[], None]) -> Callable[[], float]:
        return lambda: time_fn(loop, warmup=0, repeats=1)["median_s"]

    timed = {
        "py_push_pop": (one_round(push_pop_loop(q, slot, n)), n),
        "py_slot_cycle": (one_round(slot_cycle), n),
        "py_pop_many": (partial(drain_seconds, partial(dq.pop_into, out, 0)), drained),
        "py_pop_many_list": (partial(drain_seconds, partial(dq.pop_many, args.batch, 0)), drained),
        "simplequeue": (one_round(put_get_loop(stdlib_queue.SimpleQueue(), slot, n)), n),
        "queue": (one_round(put_get_loop(stdlib_queue.Queue(), slot, n)), n),
    }
    for timer, _ in timed.values():  # warm-up round
        timer()
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, (timer, _) in timed.items():
            seconds[name].append(timer())
    rates = {name: count / statistics.median(seconds[name]) for name, (_, count) in timed.items()}

    def rate_ratios(ours: str, baseline: str) -> list[float]:
        """Per round: our rate / the baseline's rate."""
        (_, count), (_, base_count) = timed[ours], timed[baseline]
        return [(count / t) / (base_count / b) for t, b in zip(seconds[ours], seconds[baseline])]

    def py_wakeup_us() -> float:
        wq = GradientQueue(capacity=2, num_slots=1, num_workers=1)
        lat: list[float] = []

        def consumer() -> None:
            for _ in range(args.wakeups):
                rec = wq.pop()
                lat.append((time.perf_counter_ns() - rec.version) / 1e3)
                wq.release_slot(rec.slot)

        t = threading.Thread(target=consumer)
        t.start()
        for _ in range(args.wakeups):
            s = wq.acquire_slot()
            time.sleep(0.002)  # let the consumer get past its spin, into the sleep
            wq.push(s, 0, time.perf_counter_ns())
        t.join()
        return statistics.median(lat)

    result: dict = {"benchmark": "queue"}
    result["cpp_1p1c_records_per_s"] = cpp_rate(1)
    result["cpp_4p1c_records_per_s"] = cpp_rate(4)
    result["py_push_pop_pairs_per_s"] = rates["py_push_pop"]
    result["py_slot_cycle_per_s"] = rates["py_slot_cycle"]
    result["py_pop_many_records_per_s"] = rates["py_pop_many"]
    result["py_pop_many_list_records_per_s"] = rates["py_pop_many_list"]
    result["simplequeue_pairs_per_s"] = rates["simplequeue"]
    result["queue_pairs_per_s"] = rates["queue"]
    result["wakeup_latency_us_median"] = statistics.median(wakeup_latencies_us(args.wakeups, 0.002))
    result["py_wakeup_latency_us_median"] = py_wakeup_us()
    # Targets: push+pop time <= 2x SimpleQueue's put+get; batched drain rate >= 3x its pair rate.
    result["py_push_pop_time_vs_simplequeue"] = statistics.median(1 / r for r in rate_ratios("py_push_pop", "simplequeue"))
    result["py_pop_many_vs_simplequeue_pairs"] = statistics.median(rate_ratios("py_pop_many", "simplequeue"))
    result["py_pop_many_list_vs_simplequeue_pairs"] = statistics.median(rate_ratios("py_pop_many_list", "simplequeue"))
    result["pop_many_batch"] = args.batch
    result["repeats"] = repeats
    result["loadavg_1min"] = os.getloadavg()[0]
    result["cpus"] = os.cpu_count()
    result.update(machine_info())

    def table(r: dict) -> str:
        return "\n".join(f"{k:40s} {v:,.3f}" if isinstance(v, float) else f"{k:40s} {v}" for k, v in r.items())

    emit(result, args.json, table)
    return 0
