"""Time to target, measured honestly, and its aggregation over seeds.

A noisy curve touches a target long before it stays there, so every report here gives
the *sustained* time (the first time after which the metric stays at or below the target
to the end of the run) as ``time_to_target``, and beside it the first touch
(``first_hit``), the ``final`` value and the ``tail_median`` (median over the last
quarter of the horizon). Curves are step functions: the metric holds its value from one
measurement to the next (the simulator measures it after every update, so this is exact).

Shared by the simulator experiments (``runtime/experiments.py``) and the task
comparisons (``runtime/task_experiment.py``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# What each metric key means, for JSON outputs and table footers.
DEFINITIONS: dict[str, str] = {
    "time_to_target": "sustained: first time after which the metric stays <= target up to the horizon",
    "first_hit": "first time the metric is <= target (it may leave again)",
    "final": "metric at the end of the run",
    "tail_median": "median of the metric over the last quarter of the horizon",
}
METRIC_KEYS = tuple(DEFINITIONS)


def _arrays(times: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.shape != v.shape or t.ndim != 1:
        raise ValueError(f"times and values must be 1-D of equal length, got {t.shape} and {v.shape}")
    return t, v


def time_to(times: Sequence[float], values: Sequence[float], target: float) -> tuple[float | None, float | None]:
    """``(first, sustained)``: the first time ``value <= target``, and the first time after
    which every later value is ``<= target`` (``None`` when never). NaN counts as above."""
    t, v = _arrays(times, values)
    below = v <= target
    if not below.any():
        return None, None
    first = float(t[np.argmax(below)])
    above = np.nonzero(~below)[0]
    if above.size == 0:
        return first, float(t[0])
    last_above = above[-1]
    return first, (float(t[last_above + 1]) if last_above + 1 < t.size else None)


def tail_median(times: Sequence[float], values: Sequence[float], horizon: float) -> float:
    """Median of the step curve's values over ``[3/4 horizon, horizon]``: the value in
    effect when the window opens, and every value measured inside it."""
    t, v = _arrays(times, values)
    start = 0.75 * horizon
    inside = t > start
    opening = np.nonzero(~inside)[0]
    window = v[inside] if not opening.size else np.concatenate([v[opening[-1]:opening[-1] + 1], v[inside]])
    return float(np.median(window)) if window.size else math.nan


def curve_metrics(times: Sequence[float], values: Sequence[float], target: float, horizon: float) -> dict[str, Any]:
    """The four metrics of one curve (keys :data:`METRIC_KEYS`; times ``None`` when never)."""
    first, sustained = time_to(times, values, target)
    return {"time_to_target": sustained, "first_hit": first, "final": float(np.asarray(values)[-1]),
            "tail_median": tail_median(times, values, horizon)}


def cannot_beat(best: float, target: float):
    """Predicate ``(time, value) -> bool`` for stopping a run early: a measured value above
    ``target`` at a time ``>= best`` proves the run's sustained time is later than that
    time, so it cannot beat (nor tie) ``best``. Runs stopped by it are *cut off*, not
    "not reached": their sustained time is only known to exceed the cut time."""
    return lambda time, value: time >= best and not value <= target


def aggregate(records: Sequence[dict[str, Any]], keys: Sequence[str] = METRIC_KEYS) -> dict[str, dict[str, Any]]:
    """Per key, over seeds: ``median``, ``q25``, ``q75``, ``min``, ``max`` and ``reached``
    (how many seeds have a value). A time that was never reached counts as +inf, so the
    median is ``None`` (not reached) when half the seeds or more never got there."""
    if not records:
        raise ValueError("records: need at least one seed's record")
    out = {}
    for key in keys:
        raw = [r[key] for r in records]
        vals = np.array([math.inf if x is None else float(x) for x in raw])
        # "nearest" picks sample values, so a never-reached (+inf) seed never meets an interpolation
        q = np.quantile(vals, [0.0, 0.25, 0.5, 0.75, 1.0], method="nearest")
        q[2] = np.median(vals)

        def finite(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        out[key] = {"median": finite(q[2]), "q25": finite(q[1]), "q75": finite(q[3]), "min": finite(q[0]),
                    "max": finite(q[4]), "reached": int(sum(x is not None for x in raw)), "seeds": len(raw)}
    return out


def resample(times: Sequence[float], values: Sequence[float], grid: np.ndarray) -> np.ndarray:
    """The step curve's value at each time of ``grid`` (the last measurement at or before it)."""
    t, v = _arrays(times, values)
    return v[np.clip(np.searchsorted(t, grid, side="right") - 1, 0, t.size - 1)]


def band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], horizon: float,
         points: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(grid, median, low, high)`` of several seeds' curves on a common time grid
    (``low``/``high``: the pointwise min and max over seeds)."""
    grid = np.linspace(0.0, horizon, points)
    stack = np.stack([resample(t, v, grid) for t, v in curves])
    return grid, np.median(stack, axis=0), stack.min(axis=0), stack.max(axis=0)


def spread_text(stats: dict[str, Any], fmt: str = ".1f") -> str:
    """``"median [min, max] k/K"`` for a table cell; ``-`` for a value never reached."""
    def cell(x: float | None) -> str:
        return "-" if x is None else format(x, fmt)

    text = f"{cell(stats['median'])} [{cell(stats['min'])}, {cell(stats['max'])}]"
    return text if stats["reached"] == stats["seeds"] else f"{text} {stats['reached']}/{stats['seeds']}"
