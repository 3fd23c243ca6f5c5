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
must be a power of two. Methods (``timeout`` in seconds; ``None`` waits forever,
``0`` does not wait; every wait releases the GIL):

- ``acquire_slot(timeout=None) -> int | None``, ``release_slot(slot)``
- ``push(slot, worker, version, timeout=None) -> bool``, ``try_push(...) -> bool``
- ``pop(timeout=None) -> Record | None``, ``try_pop()``,
  ``pop_fresh(max_delay, timeout=None)`` (returns records with
  ``version - record.version < max_delay``), ``pop_many(max_n, timeout=None) -> list``
- ``version`` (property), ``bump_version() -> int``, ``set_version(v)``
- ``close()``, ``closed``; ``stats() -> dict``; ``len(q)``, ``free_slots``

After ``close()`` producers (``push``, ``try_push``, ``acquire_slot``) raise
:class:`QueueClosed`; consumers get the records left, then :class:`QueueClosed`.
A slot must be acquired before it is pushed; releasing a free slot, or any value
out of range, raises ``ValueError`` naming the argument.

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
