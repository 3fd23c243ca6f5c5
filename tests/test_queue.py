"""The C++ gradient queue: semantics, bad input, close/drain, staleness, threads, GIL."""
from __future__ import annotations

import _thread
import json
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringmaster_kernels.queue import GradientQueue, QueueClosed, Record, stress, wakeup_latencies_us

U64_MAX = 2**64 - 1


def filled(q: GradientQueue, items: list[tuple[int, int]]) -> list[int]:
    """Pushes (worker, version) pairs, one acquired slot each; returns the slots."""
    slots = []
    for worker, version in items:
        slot = q.acquire_slot(timeout=0)
        assert slot is not None
        assert q.push(slot, worker, version)
        slots.append(slot)
    return slots


# ---- construction and bad input ------------------------------------------------


@pytest.mark.parametrize(
    "args, exc, name",
    [
        ((3, 4, 1), ValueError, "capacity"),
        ((0, 4, 1), ValueError, "capacity"),
        ((-8, 4, 1), ValueError, "capacity"),
        ((2**41, 4, 1), ValueError, "capacity"),
        ((8.0, 4, 1), TypeError, "capacity"),
        ((True, 4, 1), TypeError, "capacity"),
        ((8, 0, 1), ValueError, "num_slots"),
        ((8, -1, 1), ValueError, "num_slots"),
        ((8, 2**31 + 1, 1), ValueError, "num_slots"),
        ((8, "4", 1), TypeError, "num_slots"),
        ((8, 4, 0), ValueError, "num_workers"),
        ((8, 4, 2**64), ValueError, "num_workers"),
    ],
)
def test_constructor_rejects_bad_arguments(args, exc, name):
    with pytest.raises(exc, match=name):
        GradientQueue(*args)


def test_constructor_keywords_properties_and_repr():
    q = GradientQueue(capacity=8, num_slots=5, num_workers=3)
    assert (q.capacity, q.num_slots, q.num_workers, q.free_slots, len(q)) == (8, 5, 3, 5, 0)
    assert q.version == 0 and not q.closed
    assert repr(q) == "GradientQueue(capacity=8, num_slots=5, num_workers=3)"
    GradientQueue(np.int64(4), np.int32(2), 1)  # anything with __index__ works


def test_bad_push_and_release_arguments_name_the_argument():
    q = GradientQueue(4, 3, 2)
    slot = q.acquire_slot()
    cases = [
        ((slot, 2, 0), ValueError, "worker"),
        ((slot, -1, 0), ValueError, "worker"),
        ((3, 0, 0), ValueError, "slot"),
        ((slot, 0, -1), ValueError, "version"),
        ((slot, 0, 2**64), ValueError, "version"),
        ((slot, 0, 1.5), TypeError, "version"),
        ((None, 0, 0), TypeError, "slot"),
    ]
    for args, exc, name in cases:
        for push in (q.push, q.try_push):
            with pytest.raises(exc, match=name):
                push(*args)
    free = next(s for s in range(3) if s != slot)
    with pytest.raises(ValueError, match="slot .* is free"):
        q.push(free, 0, 0)
    assert q.stats()["pushed"] == 0 and len(q) == 0  # nothing slipped in
    with pytest.raises(ValueError, match="slot"):
        q.release_slot(3)
    with pytest.raises(ValueError, match="slot"):
        q.release_slot(-1)
    q.release_slot(slot)
    with pytest.raises(ValueError, match="is free: it was never acquired, or was already released"):
        q.release_slot(slot)
    assert q.free_slots == 3


def test_out_of_range_sizes_report_their_real_range():
    """A negative size reports the argument's own range, not [0, 2**64 - 1]."""
    for args, name, bound in [
        ((-8, 4, 1), "capacity", r"\[1, 2\*\*40\], got -8"),
        ((8, -1, 1), "num_slots", r"\[1, 2\*\*31\], got -1"),
        ((8, 4, -3), "num_workers", r"\[1, 2\*\*20\], got -3"),
    ]:
        with pytest.raises(ValueError, match=f"{name}: must be in {bound}") as info:
            GradientQueue(*args)
        assert "18446744073709551615" not in str(info.value)
    q = GradientQueue(4, 3, 2)
    with pytest.raises(ValueError, match=r"slot: must be in \[0, 2\], got -1"):
        q.release_slot(-1)
    with pytest.raises(ValueError, match=r"worker: must be in \[0, 1\], got -1"):
        q.push(q.acquire_slot(), -1, 0)


def test_releasing_a_never_acquired_slot_does_not_claim_a_double_release():
    q = GradientQueue(4, 3, 1)
    with pytest.raises(ValueError, match="slot 2 is free: it was never acquired") as info:
        q.release_slot(2)
    assert "double release" not in str(info.value)
    assert q.free_slots == 3


def test_capacity_is_bounded_by_physical_memory_with_a_message():
    """A ring (64 B a cell) larger than the machine's memory is a ValueError naming
    the argument and the sizes, not a bare MemoryError or the OOM killer."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    capacity = 1 << (memory // 64).bit_length()  # the smallest power of two over memory
    assert capacity <= 2**40
    with pytest.raises(ValueError, match=r"capacity: a ring of 2\*\*\d+ cells of 64 B needs \d+ MiB, more than"):
        GradientQueue(capacity, 1, 1)
    if 2**31 * 64 > memory:  # the slot pool's free ring holds num_slots cells as well
        with pytest.raises(ValueError, match="num_slots: a ring of 2\\*\\*31 cells"):
            GradientQueue(2, 2**31, 1)


def test_bump_version_refuses_to_wrap():
    q = GradientQueue(2, 1, 1)
    q.set_version(U64_MAX - 1)
    assert q.bump_version() == U64_MAX
    with pytest.raises(ValueError, match="version: is 2\\*\\*64 - 1 and bump_version\\(\\) would wrap"):
        q.bump_version()
    assert q.version == U64_MAX
    q.set_version(0)
    assert q.bump_version() == 1


def test_timeout_beyond_the_float_range():
    """An int timeout too large for a float waits forever, like float('inf'); a
    negative one is a ValueError naming timeout (it was an unnamed OverflowError)."""
    q = GradientQueue(2, 2, 1)
    filled(q, [(0, 7)])
    assert q.pop(timeout=10**400).version == 7
    filled(q, [(0, 8)])
    assert q.pop(timeout=math.inf).version == 8
    for call in (q.pop, q.acquire_slot, lambda timeout: q.pop_many(2, timeout=timeout)):
        with pytest.raises(ValueError, match="timeout"):
            call(timeout=-(10**400))


def test_slot_misuse_is_caught_by_the_slot_state():
    """Pushing a slot whose record is still queued, or releasing it, is a ValueError;
    once popped, the slot belongs to the consumer, who may release or re-push it."""
    q = GradientQueue(2, 4, 1)
    slot = q.acquire_slot()
    assert q.push(slot, 0, 1)
    for push in (q.push, q.try_push):
        with pytest.raises(ValueError, match=f"slot {slot} is already queued"):
            push(slot, 0, 2)
    with pytest.raises(ValueError, match=f"slot {slot} is still queued"):
        q.release_slot(slot)
    assert len(q) == 1 and q.free_slots == 3  # the misuses changed nothing
    assert q.pop() == (slot, 0, 1)
    assert q.push(slot, 0, 3)  # a consumer may hand a popped slot on
    assert q.pop() == (slot, 0, 3)
    q.release_slot(slot)
    assert q.free_slots == 4
    # A push that fails (full ring, or closed) leaves the slot with its owner.
    filled(q, [(0, 4), (0, 5)])
    spare = q.acquire_slot()
    assert not q.try_push(spare, 0, 6) and not q.push(spare, 0, 6, timeout=0.01)
    q.close()
    with pytest.raises(QueueClosed):
        q.push(spare, 0, 6)
    q.release_slot(spare)
    assert q.free_slots == 2


@pytest.mark.parametrize("num_slots", [1, 2, 15, 16, 17, 64, 65, 1023, 1024, 1025, 4097])
def test_every_slot_has_a_state_of_its_own(num_slots):
    """The state bytes are spread over cache lines (slot s on line s mod lines): with
    every other slot queued and the rest in use, each slot still reports its own
    state, across the layout's edges (16 lines minimum, 64 slots a line)."""
    q = GradientQueue(capacity=1 << (num_slots - 1).bit_length(), num_slots=num_slots, num_workers=1)
    slots = [q.acquire_slot(timeout=0) for _ in range(num_slots)]
    assert sorted(slots) == list(range(num_slots))
    queued, held = slots[::2], slots[1::2]
    for s in queued:
        assert q.try_push(s, 0, s)
    for s in held:
        q.release_slot(s)
    for s in held:
        with pytest.raises(ValueError, match=f"slot {s} is free"):
            q.release_slot(s)
    for s in queued:
        with pytest.raises(ValueError, match=f"slot {s} is still queued"):
            q.release_slot(s)
    assert [r.slot for r in q.pop_many(num_slots, timeout=0)] == queued
    for s in queued:
        q.release_slot(s)
    assert q.free_slots == num_slots and len(q) == 0


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda q: q.pop(timeout=-1), ValueError, "timeout"),
        (lambda q: q.pop(timeout=math.nan), ValueError, "timeout"),
        (lambda q: q.pop(timeout="1"), TypeError, "timeout"),
        (lambda q: q.acquire_slot(timeout=-0.5), ValueError, "timeout"),
        (lambda q: q.pop_fresh(0), ValueError, "max_delay"),
        (lambda q: q.pop_fresh(-1), ValueError, "max_delay"),
        (lambda q: q.pop_many(0), ValueError, "max_n"),
        (lambda q: q.pop_many(2**30), ValueError, "max_n"),
        (lambda q: q.pop_into(np.empty((2, 3), np.uint64), timeout=-1), ValueError, "timeout"),
        (lambda q: q.pop_into(), TypeError, "out"),
        (lambda q: q.set_version(-1), ValueError, "version"),
        (lambda q: q.pop(timeot=1), TypeError, "timeot"),
        (lambda q: q.push(0, 0), TypeError, "version"),
        (lambda q: q.push(0, 0, 0, 1, 2), TypeError, "at most"),
        (lambda q: q.push(0, 0, 0, slot=0), TypeError, "multiple values"),
    ],
)
def test_bad_call_arguments(call, exc, name):
    with pytest.raises(exc, match=name):
        call(GradientQueue(4, 2, 1))


# ---- single-thread semantics ---------------------------------------------------


def test_records_come_out_fifo_with_their_fields():
    q = GradientQueue(8, 8, 3)
    items = [(2, 7), (0, 2**40), (1, U64_MAX), (2, 0), (0, 1)]
    slots = filled(q, items)
    assert len(q) == 5
    for slot, (worker, version) in zip(slots, items):
        rec = q.pop(timeout=0)
        assert isinstance(rec, Record)
        assert (rec.slot, rec.worker, rec.version) == (slot, worker, version)
        assert tuple(rec) == (slot, worker, version) and rec[2] == version
    assert q.try_pop() is None and q.pop(timeout=0.01) is None and q.pop_many(4, timeout=0) == []


def test_record_is_a_picklable_tuple():
    q = GradientQueue(2, 1, 1)
    filled(q, [(0, 5)])
    rec = q.pop()
    assert rec == (0, 0, 5) and isinstance(rec, tuple)
    assert pickle.loads(pickle.dumps(rec)) == rec
    slot, worker, version = rec
    assert Record(slot=slot, worker=worker, version=version) == rec
    assert Record._fields == ("slot", "worker", "version")


def test_slot_pool_exhaustion_and_reuse():
    q = GradientQueue(4, 3, 1)
    slots = {q.acquire_slot(timeout=0) for _ in range(3)}
    assert slots == {0, 1, 2} and q.free_slots == 0
    assert q.acquire_slot(timeout=0) is None
    assert q.acquire_slot(timeout=0.01) is None
    q.release_slot(1)
    assert q.acquire_slot(timeout=0) == 1


def test_full_ring_edges():
    q = GradientQueue(4, 8, 1)
    filled(q, [(0, v) for v in range(4)])
    slot = q.acquire_slot()
    assert not q.try_push(slot, 0, 4)
    assert not q.push(slot, 0, 4, timeout=0.01)
    assert q.pop().version == 0
    assert q.try_push(slot, 0, 4)
    assert [r.version for r in q.pop_many(10)] == [1, 2, 3, 4]
    # The ring wraps many times without losing order.
    for v in range(100):
        assert q.try_push(slot, 0, v) and q.try_pop().version == v


def test_pop_many_takes_what_is_ready_up_to_max_n():
    q = GradientQueue(16, 16, 2)
    filled(q, [(v % 2, v) for v in range(10)])
    first = q.pop_many(4)
    assert [r.version for r in first] == [0, 1, 2, 3]
    rest = q.pop_many(100, timeout=0)
    assert [r.version for r in rest] == list(range(4, 10))
    assert q.stats()["per_worker"] == [{"pushed": 5, "popped": 5, "discarded": 0}] * 2


def test_version_counter():
    q = GradientQueue(2, 1, 1)
    assert q.bump_version() == 1 and q.bump_version() == 2 and q.version == 2
    q.set_version(U64_MAX)
    assert q.version == U64_MAX
    q.set_version(7)
    assert q.version == 7


def test_stats_account_for_every_record():
    q = GradientQueue(8, 8, 3)
    filled(q, [(0, 0), (1, 0), (1, 0), (2, 5), (0, 5)])
    q.set_version(5)
    assert q.pop_fresh(3) == Record(3, 2, 5)  # three stale ones discarded on the way
    s = q.stats()
    assert (s["pushed"], s["popped"], s["discarded"], s["queued"]) == (5, 1, 3, 1)
    assert s["pushed"] == s["popped"] + s["discarded"] + s["queued"]
    assert s["free_slots"] == 8 - 5 + 3 and s["version"] == 5
    assert s["per_worker"] == [
        {"pushed": 2, "popped": 0, "discarded": 1},
        {"pushed": 2, "popped": 0, "discarded": 2},
        {"pushed": 1, "popped": 1, "discarded": 0},
    ]


# ---- staleness -----------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("push"), st.integers(0, 2), st.integers(0, 6)),  # worker, versions back
    st.tuples(st.just("bump"), st.integers(1, 3)),
    st.tuples(st.just("set"), st.integers(0, 20)),
    st.tuples(st.just("pop_fresh"), st.integers(1, 5)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=60))
def test_pop_fresh_classifies_exactly_against_a_model(ops):
    """Records with known versions against a moving version counter: every record
    is returned iff version - record.version < max_delay at the time it is met."""
    q = GradientQueue(64, 64, 3)
    model: deque[tuple[int, int, int]] = deque()
    version, discarded, returned = 0, [0, 0, 0], [0, 0, 0]
    for op in ops:
        if op[0] == "push":
            _, worker, back = op
            slot = q.acquire_slot(timeout=0)
            rec_version = max(0, version - back)
            assert q.try_push(slot, worker, rec_version)
            model.append((slot, worker, rec_version))
        elif op[0] == "bump":
            for _ in range(op[1]):
                version += 1
                assert q.bump_version() == version
        elif op[0] == "set":
            version = op[1]  # may go backwards: records from the "future" have delay 0
            q.set_version(version)
        else:
            max_delay = op[1]
            expected = None
            while model:
                slot, worker, v = model.popleft()
                if max(0, version - v) < max_delay:
                    expected = (slot, worker, v)
                    returned[worker] += 1
                    break
                discarded[worker] += 1
            got = q.pop_fresh(max_delay, timeout=0)
            assert (None if got is None else tuple(got)) == expected
            if got is not None:
                q.release_slot(got.slot)
    stats = q.stats()
    assert [w["discarded"] for w in stats["per_worker"]] == discarded
    assert [w["popped"] for w in stats["per_worker"]] == returned
    assert stats["queued"] == len(model) and stats["free_slots"] == 64 - len(model)


# ---- pop_into: the batched drain into a caller's buffer ----------------------------

POISON = 0xDEAD_BEEF_DEAD_BEEF


def poisoned(rows: int, dtype=np.uint64) -> np.ndarray:
    return np.full((rows, 3), POISON, np.uint64).view(dtype)


def test_pop_into_writes_exact_records_in_fifo_order():
    q = GradientQueue(16, 16, 3)
    items = [(2, 7), (0, 2**40), (1, U64_MAX), (2, 0), (0, 2**63), (1, 1), (0, 12345)]
    slots = filled(q, items)
    expected = [[s, w, v] for s, (w, v) in zip(slots, items)]
    out = poisoned(4)
    assert q.pop_into(out) == 4
    assert out.tolist() == expected[:4]
    out = poisoned(40)  # more rows than the ring holds
    assert q.pop_into(out, timeout=0) == 3  # what was ready, no more
    assert out[:3].tolist() == expected[4:]
    assert (out[3:] == POISON).all()  # rows past the count are not touched
    assert q.pop_into(out, timeout=0) == 0 and q.pop_into(out, timeout=0.01) == 0
    assert (out[3:] == POISON).all()
    assert q.stats()["per_worker"] == [
        {"pushed": 3, "popped": 3, "discarded": 0},
        {"pushed": 2, "popped": 2, "discarded": 0},
        {"pushed": 2, "popped": 2, "discarded": 0},
    ]
    for slot in slots:  # the popped slots now belong to the consumer
        q.release_slot(slot)
    assert q.free_slots == 16


def test_pop_into_int64_buffers_and_views():
    """int64 buffers (torch's default) hold versions >= 2**63 as their two's
    complement; a row slice of a larger array and a torch tensor's .numpy() work."""
    q = GradientQueue(8, 8, 2)
    slots = filled(q, [(1, U64_MAX), (0, 2**63), (1, 5), (0, 6), (1, 7)])
    out = poisoned(2, np.int64)
    assert q.pop_into(out) == 2
    assert out[:, :2].tolist() == [[slots[0], 1], [slots[1], 0]]
    assert out[:, 2].tolist() == [-1, -(2**63)]
    assert out.view(np.uint64)[:, 2].tolist() == [U64_MAX, 2**63]
    big = poisoned(6)
    assert q.pop_into(big[2:4]) == 2  # C-contiguous rows of a larger array
    assert big[2:4].tolist() == [[slots[2], 1, 5], [slots[3], 0, 6]]
    assert (big[:2] == POISON).all() and (big[4:] == POISON).all()
    tensor = torch_int64(3)
    assert q.pop_into(tensor.numpy()) == 1  # shares the tensor's memory
    assert tensor.tolist() == [[slots[4], 1, 7], [0, 0, 0], [0, 0, 0]]


def torch_int64(rows: int):
    import torch

    return torch.zeros(rows, 3, dtype=torch.int64)


def read_only(rows: int) -> np.ndarray:
    a = np.zeros((rows, 3), np.uint64)
    a.setflags(write=False)
    return a


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: np.zeros((4, 3), np.float64), TypeError, "out: must hold native int64 or uint64"),
        (lambda: np.zeros((4, 3), np.int32), TypeError, "out: must hold native int64"),
        (lambda: np.zeros((4, 3), np.uint32), TypeError, "out: must hold native int64"),
        (lambda: np.zeros((4, 3), ">i8" if sys.byteorder == "little" else "<i8"), TypeError, "out: must hold native"),
        (lambda: bytearray(96), TypeError, "out: must hold native int64"),
        (lambda: [[0, 0, 0]], TypeError, "out: must support the buffer protocol"),
        (lambda: None, TypeError, "out: must support the buffer protocol"),
        (lambda: torch_int64(4), TypeError, r"out: .*\.numpy\(\)"),
        (lambda: np.zeros((4, 2), np.uint64), ValueError, r"out: must have shape \(n, 3\) .* got \(4, 2\)"),
        (lambda: np.zeros(12, np.uint64), ValueError, r"out: must have shape \(n, 3\) .* got \(12\)"),
        (lambda: np.zeros((2, 2, 3), np.uint64), ValueError, r"out: must have shape \(n, 3\)"),
        (lambda: np.zeros((0, 3), np.uint64), ValueError, r"got \(0, 3\)"),
        (lambda: read_only(4), ValueError, "out: must be writable"),
        (lambda: np.zeros((8, 3), np.uint64)[::2], ValueError, "out: must be C-contiguous"),
        (lambda: np.zeros((4, 3), np.uint64, order="F"), ValueError, "out: must be C-contiguous"),
        (lambda: np.zeros((3, 4), np.uint64)[:, :3], ValueError, "out: must be C-contiguous"),
    ],
)
def test_pop_into_rejects_bad_buffers_before_popping(make, exc, match):
    q = GradientQueue(4, 4, 1)
    filled(q, [(0, 1), (0, 2)])
    with pytest.raises(exc, match=match):
        q.pop_into(make())
    assert len(q) == 2 and q.stats()["popped"] == 0  # nothing was taken


drain_op = st.one_of(
    st.tuples(st.just("push"), st.integers(0, 2), st.integers(0, U64_MAX)),  # worker, version
    st.tuples(st.just("pop_into"), st.integers(1, 9), st.sampled_from([np.uint64, np.int64])),
    st.tuples(st.just("pop_many"), st.integers(1, 9)),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(drain_op, max_size=50))
def test_pop_into_and_pop_many_agree_with_a_fifo_model(ops):
    q = GradientQueue(16, 16, 3)
    model: deque[tuple[int, int, int]] = deque()
    for op in ops:
        if op[0] == "push":
            slot = q.acquire_slot(timeout=0)
            if slot is None:  # every slot is queued: the model says the ring is full too
                assert len(model) == 16
                continue
            assert q.try_push(slot, op[1], op[2])
            model.append((slot, op[1], op[2]))
            continue
        want = [model.popleft() for _ in range(min(op[1], len(model)))]
        if op[0] == "pop_many":
            got = [tuple(r) for r in q.pop_many(op[1], timeout=0)]
        else:
            out = poisoned(op[1], op[2])
            n = q.pop_into(out, timeout=0)
            got = [tuple(row) for row in out[:n].view(np.uint64).tolist()]
            assert (out[n:].view(np.uint64) == POISON).all()
        assert got == want
        for slot, _, _ in got:
            q.release_slot(slot)
    s = q.stats()
    assert s["queued"] == len(model) and s["free_slots"] == 16 - len(model)
    assert s["pushed"] == s["popped"] + len(model)


# ---- close / drain ---------------------------------------------------------------


def test_close_rejects_producers_and_drains_consumers():
    q = GradientQueue(8, 8, 1)
    slots = filled(q, [(0, 1), (0, 2), (0, 3), (0, 4)])
    spare = q.acquire_slot()
    q.close()
    q.close()  # idempotent
    assert q.closed
    assert issubclass(QueueClosed, RuntimeError)
    for produce in (lambda: q.push(spare, 0, 9), lambda: q.try_push(spare, 0, 9), q.acquire_slot):
        with pytest.raises(QueueClosed):
            produce()
    out = np.zeros((1, 3), np.uint64)
    assert q.pop().version == 1
    assert [r.version for r in q.pop_many(2)] == [2, 3]
    assert q.pop_into(out) == 1 and out[0, 2] == 4
    consumers = (q.pop, q.try_pop, lambda: q.pop_many(3), lambda: q.pop_fresh(1), lambda: q.pop(timeout=0),
                 lambda: q.pop_into(out), lambda: q.pop_into(out, timeout=0))
    for consume in consumers:
        with pytest.raises(QueueClosed):
            consume()
    for slot in slots + [spare]:
        q.release_slot(slot)  # a draining server can still recycle slots
    assert q.free_slots == 8


def run_blocked(target) -> tuple[threading.Thread, list]:
    """Starts target() in a thread; returns the thread and [result or exception]."""
    out: list = []

    def body():
        try:
            out.append(target())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("blocked", ["pop", "pop_fresh", "pop_many", "pop_into", "acquire_slot", "push_full"])
def test_close_wakes_every_kind_of_waiter(blocked):
    q = GradientQueue(2, 4, 1)
    if blocked == "acquire_slot":
        [q.acquire_slot() for _ in range(4)]
        call = q.acquire_slot
    elif blocked == "push_full":
        filled(q, [(0, 0), (0, 1)])
        slot = q.acquire_slot()
        call = lambda: q.push(slot, 0, 2)  # noqa: E731
    else:
        call = {
            "pop": q.pop,
            "pop_fresh": lambda: q.pop_fresh(1),
            "pop_many": lambda: q.pop_many(8),
            "pop_into": lambda: q.pop_into(np.empty((8, 3), np.int64)),
        }[blocked]
    t, out = run_blocked(call)
    time.sleep(0.05)
    assert t.is_alive() and not out  # really blocked
    q.close()
    t.join(5)
    assert not t.is_alive()
    assert len(out) == 1 and isinstance(out[0], QueueClosed)


@pytest.mark.parametrize("consumer", ["pop", "pop_into"])
def test_blocked_pop_wakes_on_push_and_releases_the_gil(consumer):
    q = GradientQueue(4, 4, 1)
    buf = np.zeros((2, 3), np.uint64)
    t, out = run_blocked(q.pop if consumer == "pop" else lambda: q.pop_into(buf))
    ticks = 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # pure-Python work: needs the GIL
        ticks += 1
    assert t.is_alive() and not out
    assert ticks > 10_000
    [slot] = filled(q, [(0, 42)])
    t.join(5)
    assert out == ([(slot, 0, 42)] if consumer == "pop" else [1])
    if consumer == "pop_into":
        assert buf.tolist() == [[slot, 0, 42], [0, 0, 0]]


def test_ctrl_c_interrupts_an_endless_wait(python_sigint):
    q = GradientQueue(2, 1, 1)
    threading.Timer(0.2, _thread.interrupt_main).start()
    # the wait has no timeout of its own; the test's bound only turns a missed Ctrl-C into a failure
    with pytest.raises(KeyboardInterrupt):
        q.pop(timeout=30.0)


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; a hang fails the test instead of the suite."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_one_cell_ring_holds_one_record_and_never_overwrites():
    """capacity=1 with several slots: a second push finds the ring full. (It used to
    be accepted over the first record, and every pop then spun with the GIL held,
    deaf to its timeout and to Ctrl-C; hence the subprocess.)"""
    code = """
from ringmaster_kernels.queue import GradientQueue
q = GradientQueue(1, 2, 1)
a, b = q.acquire_slot(), q.acquire_slot()
assert q.try_push(a, 0, 1)
assert not q.try_push(b, 0, 2) and not q.push(b, 0, 2, timeout=0.01)
assert len(q) == 1 and q.pop(timeout=1) == (a, 0, 1)
assert q.pop(timeout=0.01) is None
for v in range(2, 50):  # many laps of the one cell
    assert q.try_push(b, 0, v) and not q.try_push(a, 0, -1 + 2 * v)
    assert q.pop_many(4, timeout=1) == [(b, 0, v)]
s = q.stats()
assert (s["pushed"], s["popped"], s["queued"]) == (49, 49, 0), s
print("ok")
"""
    result = _run_python(code, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(producers=2, capacity=1, num_slots=8),
        dict(producers=3, consumers=2, capacity=1, num_slots=4, batch=4),
        dict(producers=2, capacity=1, num_slots=8, max_delay=2),
    ],
)
def test_cpp_stress_through_a_one_cell_ring(kwargs):
    """The C++ threads' view of the same defect: stress(capacity=1, num_slots=8)
    never returned. In a subprocess, so that a regression fails instead of hanging."""
    code = (
        "from ringmaster_kernels.queue import stress\n"
        f"r = stress(records_per_producer=20000, **{kwargs!r})\n"
        "assert r['ok'], r\nprint('ok')\n"
    )
    result = _run_python(code, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


_BLOCKED_AT_EXIT = """
import sys, threading, time
from ringmaster_kernels.queue import GradientQueue
mode, threads = sys.argv[1], int(sys.argv[2])
q = GradientQueue(2, 2 + threads, 1)
def make_call():
    if mode == "acquire_slot":
        return lambda: q.acquire_slot(timeout=0.001)
    if mode == "push":
        # one slot per thread: two threads pushing one slot at once is (rightly) an error
        slot = q.acquire_slot()
        return lambda: q.push(slot, 0, 2, timeout=0.001)  # the ring is full: waits, then False
    return {"pop": lambda: q.pop(timeout=0.001), "pop_many": lambda: q.pop_many(4, timeout=0.001),
            "forever": q.pop}[mode]
if mode == "push":
    q.push(q.acquire_slot(), 0, 0); q.push(q.acquire_slot(), 0, 1)
calls = [make_call() for _ in range(threads)]
if mode == "acquire_slot":
    while q.acquire_slot(timeout=0) is not None:
        pass
def loop(call):
    while True:
        call()
for call in calls:
    threading.Thread(target=loop, args=(call,), daemon=True).start()
time.sleep(0.05)
"""


@pytest.mark.parametrize(
    "mode, threads", [("pop", 1), ("pop", 16), ("pop_many", 4), ("acquire_slot", 4), ("push", 4), ("forever", 4)]
)
def test_daemon_threads_waiting_in_the_queue_do_not_abort_interpreter_exit(mode, threads):
    """Daemon threads that take the GIL back while the interpreter shuts down are
    ended by pthread_exit; its forced unwind used to meet a noexcept frame and
    abort the process (rc 134, "terminate called without an active exception").
    Short timeouts keep the threads retaking the GIL, so exit always races them."""
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", _BLOCKED_AT_EXIT, mode, str(threads)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr


# ---- threads ---------------------------------------------------------------------


@pytest.mark.parametrize("consumer", ["pop", "pop_many", "pop_into"])
def test_python_threads_lose_and_duplicate_nothing(consumer):
    producers, per_producer = 4, 2_000
    q = GradientQueue(capacity=16, num_slots=8, num_workers=producers)

    def produce(worker: int) -> None:
        for i in range(per_producer):
            q.push(q.acquire_slot(), worker, i)

    seen: list[list[int]] = [[] for _ in range(producers)]
    buf = np.full((5, 3), -1, np.int64)

    def next_batch() -> list:
        if consumer == "pop":
            return [q.pop()]
        if consumer == "pop_many":
            return q.pop_many(5)
        return [Record(*row) for row in buf[: q.pop_into(buf)].tolist()]

    def consume() -> None:
        try:
            while True:
                for rec in next_batch():
                    seen[rec.worker].append(rec.version)
                    q.release_slot(rec.slot)
        except QueueClosed:
            pass

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(producers)]
    server = threading.Thread(target=consume)
    server.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    q.close()
    server.join(60)
    assert seen == [list(range(per_producer))] * producers  # all there, once, in order
    s = q.stats()
    assert s["pushed"] == s["popped"] == producers * per_producer and s["free_slots"] == 8


def test_cpp_stress_8_producers_million_records_each():
    result = stress(producers=8, records_per_producer=1_000_000)
    assert result["ok"], result
    assert result["expected"] == result["received"] == 8_000_000
    assert result["lost"] == result["duplicated"] == result["out_of_order"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(producers=4, consumers=3, batch=16, capacity=64, num_slots=32),
        dict(producers=3, max_delay=2, capacity=32, num_slots=16),
        dict(producers=2, capacity=1, num_slots=1),
    ],
)
def test_cpp_stress_other_modes(kwargs):
    result = stress(records_per_producer=100_000, **kwargs)
    assert result["ok"], result
    assert result["received"] + result["discarded"] == result["expected"]
    if "max_delay" in kwargs:
        assert result["discarded"] > 0  # the moving version really made records stale


def test_stress_rejects_bad_configuration():
    with pytest.raises(ValueError, match="consumers"):
        stress(records_per_producer=10, consumers=2, max_delay=3)
    with pytest.raises(ValueError, match="capacity"):
        stress(records_per_producer=10, capacity=3)
    with pytest.raises(ValueError, match="producers"):
        stress(producers=-1)
    with pytest.raises(ValueError, match="records_per_producer"):
        stress(producers=8, records_per_producer=2**28)


def test_wakeup_latencies_are_measured():
    lat = wakeup_latencies_us(samples=10, idle_s=0.001)
    assert len(lat) == 10 and all(x > 0 and math.isfinite(x) for x in lat)
    with pytest.raises(ValueError, match="samples"):
        wakeup_latencies_us(samples=0)


# ---- packaging and the bench command ----------------------------------------------


def test_missing_extension_says_how_to_build_it():
    code = (
        "import sys; sys.modules['ringmaster_kernels._queue'] = None\n"
        "try:\n    import ringmaster_kernels.queue\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ringmaster_kernels._queue is not built" in out and "make install" in out


def test_bench_queue_prints_one_json_object(capsys):
    from ringmaster_kernels.cli import main

    argv = ["bench", "queue", "--json", "--records", "20000", "--pairs", "2000", "--repeats", "1", "--wakeups", "5"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for key in (
        "cpp_1p1c_records_per_s",
        "cpp_4p1c_records_per_s",
        "py_push_pop_pairs_per_s",
        "py_pop_many_records_per_s",
        "py_pop_many_list_records_per_s",
        "py_pop_many_vs_simplequeue_pairs",
        "py_pop_many_list_vs_simplequeue_pairs",
        "simplequeue_pairs_per_s",
        "queue_pairs_per_s",
        "wakeup_latency_us_median",
        "device",
    ):
        assert key in result
    assert all(result[k] > 0 for k in result if k.endswith("_per_s"))
