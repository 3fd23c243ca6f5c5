"""The versioned gradient queue (C++ extension ``ringmaster_kernels._queue``).

Gradients never travel through the queue: they sit in a pool of ``num_slots``
preallocated slots owned by the server, and the queue carries small records
``Record(slot, worker, version)`` (a namedtuple of ints)::

    q = GradientQueue(capacity=1024, num_slots=64, num_workers=4)
    # worker i
    slot = q.acquire_slot()            # blocks (GIL released) until a slot is free
    pool[slot].copy_(grad)
    q.push(slot, i, version)
    # server
    rec = q.pop_fresh(max_delay=R)     # stale records are recycled and counted
    apply(pool[rec.slot]); q.release_slot(rec.slot); q.bump_version()

``GradientQueue(capacity: int, num_slots: int, num_workers: int)``; ``capacity``
must be a power of two in ``[1, 2**40]`` (1 works: a ring of one record), and the
ring (64 B a cell, as is the slot pool's free ring of ``num_slots`` cells) must fit
in physical memory. Methods (``timeout`` in seconds; ``None`` waits forever, ``0``
does not wait, an int beyond the float range counts as forever; every wait releases
the GIL, and no call spins with it held):

- ``acquire_slot(timeout=None) -> int | None``, ``release_slot(slot)``
- ``push(slot, worker, version, timeout=None) -> bool``, ``try_push(...) -> bool``
- ``pop(timeout=None) -> Record | None``, ``try_pop()``,
  ``pop_fresh(max_delay, timeout=None)`` (returns records with
  ``version - record.version < max_delay``), ``pop_many(max_n, timeout=None) -> list``
- ``pop_into(out, timeout=None) -> int``: the batched drain without a Python object
  per record. ``out`` is a writable C-contiguous ``(n, 3)`` buffer of native int64 or
  uint64 (``numpy.empty((256, 3), numpy.uint64)``, or a torch int64 tensor's
  ``.numpy()``); it waits like ``pop_many(n, timeout)``, writes record ``i`` as
  ``out[i] = (slot, worker, version)``, leaves later rows alone and returns the count.
  Versions >= 2**63 read back negative from an int64 buffer (``out.view(numpy.uint64)``).
- ``version`` (property), ``bump_version() -> int`` (``ValueError`` rather than wrap
  past 2**64 - 1), ``set_version(v)``
- ``close()``, ``closed``; ``stats() -> dict``; ``len(q)``, ``free_slots``

Daemon threads may be waiting in any of these when the interpreter exits.

After ``close()`` producers (``push``, ``try_push``, ``acquire_slot``) raise
:class:`QueueClosed`; consumers get the records left, then :class:`QueueClosed`.
A slot is pushed once per acquire: pushing a free slot or one whose record is
still queued, releasing a free slot or one still queued, or any value out of range,
raises ``ValueError`` naming the argument. A popped record's slot belongs to the
consumer, who releases it (or pushes it on).

``stress(...)`` and ``wakeup_latencies_us(...)`` run C++ threads against a queue,
for tests and ``ringmaster bench queue``.
"""
from __future__ import annotations

try:
    from ringmaster_kernels._queue import (
        GradientQueue,
        QueueClosed,
        Record,
        stress,
        wakeup_latencies_us,
    )
except ImportError as exc:  # only the missing extension gets the friendlier message
    if exc.name not in ("ringmaster_kernels._queue", None):
        raise
    raise ImportError(
        "ringmaster_kernels._queue is not built: run `make install` (or "
        "`python setup.py build_ext --inplace` in a source checkout). "
        f"Original error: {exc}"
    ) from exc

__all__ = ["GradientQueue", "QueueClosed", "Record", "stress", "wakeup_latencies_us"]
