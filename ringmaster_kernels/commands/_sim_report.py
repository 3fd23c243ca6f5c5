"""Tables and figures of ``ringmaster simulate``: several seeds per method, the sustained
time to target first, every cell saying what it is."""
from __future__ import annotations

import math
from typing import Any, Sequence

from ..runtime.metrics import DEFINITIONS, band, spread_text


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
                     for k, v in params.items())


def method_table(methods: dict[str, dict[str, Any]]) -> str:
    """One row per method: median [min, max] over seeds of each metric (k/K: seeds that
    reached it when not all did), then counts (medians)."""
    head = f"{'method':<22}{'params':<28}{'t_target (sustained)':>26}{'first hit':>24}{'final':>24}{'tail median':>24}" \
           f"{'accepted':>10}{'discarded':>11}"
    lines = [head]
    for name, rec in methods.items():
        agg = rec["aggregate"]
        cells = [spread_text(agg["time_to_target"]), spread_text(agg["first_hit"]),
                 spread_text(agg["final"], ".3g"), spread_text(agg["tail_median"], ".3g")]
        lines.append(f"{name:<22}{params_text(rec['params']):<28}" + "".join(f"{c:>26}" if i == 0 else f"{c:>24}"
                     for i, c in enumerate(cells)) + f"{agg['accepted']['median']:>10.0f}{agg['discarded']['median']:>11.0f}")
    lines.append("cells: median [min, max] over the seeds (k/K: seeds that reached it); '-': not reached")
    lines += [f"  {k}: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(lines)


def grid_table(method: str, tuning: dict[str, Any]) -> str:
    """The tuning grid (rows: step size; columns: R or B) of sustained times to target:
    a number when reached, '-' when not reached within the horizon, '>T' when the run was
    cut off at T because it could no longer beat the best time so far."""
    rows = tuning["grid"]
    size_key = next((k for k in rows[0]["params"] if k in ("threshold", "batch")), None)
    lrs = sorted({r["params"]["lr"] for r in rows})
    sizes = sorted({r["params"][size_key] for r in rows}) if size_key else [None]
    cell = {(r["params"]["lr"], r["params"].get(size_key)): r for r in rows}

    def text(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        if r["cut_off"] is not None:
            return f">{r['cut_off']:.0f}"
        return "-" if r["time_to_target"] is None else f"{r['time_to_target']:.0f}"

    letter = {"threshold": "R", "batch": "B"}.get(size_key, "")
    out = [f"tuning {method} on seed {tuning['seed']}: sustained time to target "
           "('-': not reached; '>T': cut off at T, when it could no longer beat the best)",
           f"{'lr':>10}" + "".join(f"{f'{letter}={s}' if size_key else 'time':>9}" for s in sizes)]
    for lr in lrs:
        out.append(f"{lr:>10.3g}" + "".join(f"{text(cell.get((lr, s))):>9}" for s in sizes))
    out.append(f"chosen {method}: {tuning['best']}")
    return "\n".join(out)


def plot_bands(path: str, curves: dict[str, list[tuple[Sequence[float], Sequence[float]]]],
               params: dict[str, dict[str, Any]], target: float, horizon: float, title: str, ylabel: str) -> None:
    """Median curve per method with a min-max band over seeds; the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in curves.items():
        grid, median, low, high = band(runs, horizon)
        (line,) = ax.semilogy(grid, median, label=f"{name} ({params_text(params[name])})")
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(target, color="gray", lw=0.8, ls="--", label="target")
    seeds = len(next(iter(curves.values())))
    ax.set_xlabel("virtual time")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\nmedian over {seeds} seeds, band: min-max", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: str, rows: list[dict[str, Any]], title: str) -> None:
    """Median speed-up (sustained metric) per level with an IQR band; a level where the
    median is missing gets an 'x' on the axis, a lower bound an upward triangle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["heterogeneity"] for r in rows]
    for key, label in (("speedup_vs_sync", "vs synchronous LMO"), ("speedup_vs_best_baseline", "vs best other baseline")):
        med = [math.nan if r[key]["median"] is None else r[key]["median"] for r in rows]
        lo = [math.nan if r[key]["q25"] is None else r[key]["q25"] for r in rows]
        hi = [math.nan if r[key]["q75"] is None else r[key]["q75"] for r in rows]
        (line,) = ax.plot(xs, med, marker="o", label=label)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        for x, m, r in zip(xs, med, rows):
            if math.isnan(m):
                ax.plot([x], [0], marker="x", color=line.get_color(), ms=9, clip_on=False)
            elif r[key]["bounds"]:
                ax.plot([x], [m], marker="^", color=line.get_color(), ms=9)
    ax.plot([], [], "kx", label="missing (Ringmaster did not reach the target)")
    ax.plot([], [], "k^", label="lower bound (other never reached / cut off)")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("heterogeneity S")
    ax.set_ylabel("speed-up, sustained time to target")
    ax.set_title(f"{title}\nmedian over seeds, band: IQR", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
