"""pytest-benchmark view of the gradient queue, beside its same-run baselines.

    python -m pytest benchmarks/bench_queue.py --benchmark-group-by=group

Compare rows within a group (ours vs queue.SimpleQueue); `ringmaster bench queue
--json` gives the same figures, interleaved, as one JSON object.
"""
from __future__ import annotations

import queue

import numpy as np
import pytest

from ringmaster_kernels.commands.bench_queue import push_pop_loop, put_get_loop
from ringmaster_kernels.queue import GradientQueue, stress

N = 10_000


@pytest.fixture
def q() -> GradientQueue:
    return GradientQueue(capacity=1024, num_slots=1, num_workers=1)


@pytest.mark.benchmark(group="python push+pop pairs")
def test_gradient_queue_push_pop(benchmark, q):
    benchmark(push_pop_loop(q, q.acquire_slot(), N))
    assert q.stats()["popped"] == q.stats()["pushed"] > 0


@pytest.mark.benchmark(group="python push+pop pairs")
def test_simplequeue_put_get(benchmark):
    benchmark(put_get_loop(queue.SimpleQueue(), 0, N))


@pytest.mark.benchmark(group="python drain of 1024 records")
@pytest.mark.parametrize("form", ["pop_into", "pop_many"])
def test_gradient_queue_drain(benchmark, form):
    q = GradientQueue(capacity=1024, num_slots=1024, num_workers=1)
    out = np.empty((256, 3), np.uint64)
    drain_once = (lambda: q.pop_into(out, 0)) if form == "pop_into" else (lambda: q.pop_many(256, 0))

    def fill() -> tuple[tuple, dict]:
        for s in range(q.num_slots - q.free_slots):  # the last drain's slots, all held
            q.release_slot(s)
        for i in range(q.capacity):
            q.try_push(q.acquire_slot(0), 0, i)
        return (), {}

    rounds = []  # --benchmark-disable runs one round, not 50: count what ran

    def drain() -> None:
        rounds.append(1)
        while drain_once():
            pass

    benchmark.pedantic(drain, setup=fill, rounds=50)
    assert len(q) == 0 and q.stats()["popped"] == len(rounds) * q.capacity


@pytest.mark.benchmark(group="python drain of 1024 records")
def test_simplequeue_drain(benchmark):
    sq = queue.SimpleQueue()

    def fill() -> tuple[tuple, dict]:
        for i in range(1024):
            sq.put((i, 0, i))
        return (), {}

    def drain() -> None:
        get = sq.get_nowait
        for _ in range(1024):
            get()

    benchmark.pedantic(drain, setup=fill, rounds=50)
    assert sq.empty()


@pytest.mark.benchmark(group="c++ threads, 1M records")
@pytest.mark.parametrize("producers", [1, 4])
def test_cpp_threads(benchmark, producers):
    result = benchmark.pedantic(stress, args=(producers, 1_000_000 // producers, 1, 1024, 1024), rounds=3)
    assert result["ok"], result
