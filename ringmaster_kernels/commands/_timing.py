"""Timing shared by the ``ringmaster bench`` commands: one way to time, for every op."""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    warmup: int = 3,
    repeats: int = 10,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Median wall time of ``fn()`` in seconds, synchronizing CUDA around each call.

    Runs ``warmup`` untimed calls, then at least ``repeats`` timed ones (more until
    ``min_time_s`` has passed). Returns ``{"median_s", "min_s", "repeats"}``.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "repeats": len(samples)}


def emit(result: dict, as_json: bool, table: Callable[[dict], str] | None = None) -> None:
    """Print a benchmark result as one JSON object or as a human table."""
    if as_json or table is None:
        print(json.dumps(result, indent=None if as_json else 2, sort_keys=False))
    else:
        print(table(result))


def machine_info() -> dict[str, str]:
    """Where a figure was measured: device name, torch and triton versions."""
    import platform

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = "missing"
    info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return info
