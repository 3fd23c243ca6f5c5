"""Compare async methods on one task, on the real clock or the virtual one.

Every method runs the same task with the same update rule (e.g. NanoChat's recipe through
``RingmasterMuonAdamW``) from the same initial model; only the policy (the delay rule)
differs. ``clock="real"``: worker threads (:class:`LocalWorker`) with emulated unequal
speeds, each job lasting ``f(i)`` times the worker's own measured compute time, so the
ratios hold on a loaded machine. ``clock="virtual"``: the authors' protocol on one device
(:mod:`runtime.virtual`), ``tau_i = base * f(i)`` with ``base`` measured once and shared
by every method. ``f(i)`` is ``sqrt(i)``, ``i`` or 1 (``profile``).

:func:`run_methods` returns one summary per method; :func:`run_seeds` repeats it over
seeds and aggregates (median and spread per method); :func:`table` and :func:`plot` report
either; :func:`~ringmaster_kernels.runtime.metrics.time_to` gives the first time a curve
reaches a value and the sustained time (the first time after which it stays there up to the
end of the run).
"""
from __future__ import annotations

import math
import os
import textwrap
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..optim.policies import METHODS, make_policy
from . import checkpoint
from .metrics import aggregate, band, spread_text, time_to
from .reporting import text_table
from .simulator import Simulation
from .trainer import AsyncTrainer
from .virtual import PROFILES, TaskObjective, authors_time_model, master_model, profile_factors
from .worker import LocalWorker

CLOCKS = ("real", "virtual")


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names, each a key of ``METHODS`` (ValueError listing them otherwise)."""
    names = [m.strip() for m in methods if m.strip()]
    if not names:
        raise ValueError("methods: name at least one method")
    unknown = [m for m in names if m not in METHODS or m == "ringmaster_asgd"]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; known: {[m for m in METHODS if m != 'ringmaster_asgd']}")
    if len(set(names)) != len(names):
        raise ValueError(f"methods: each method once, got {names}")
    return names


def policy_options(method: str, threshold: int, batch: int | None, num_workers: int) -> dict:
    """The delay-rule settings of ``method`` (the update rule brings its own step sizes)."""
    if "threshold" in METHODS[method][2]:  # every Ringmaster variant with a fixed R
        return {"threshold": threshold}
    if method == "rennala":
        return {"batch": batch or num_workers}
    return {}


def _real(task: Any, method: str, options: dict, *, n: int, profile: str, seconds: float, seed: int, out: str,
          devices: Sequence[str], batch_size: int, accum: int, eval_every: float, log: Callable[[str], None] | None,
          torch_threads: int | None) -> dict:
    factors = profile_factors(profile, n)
    workers = [LocalWorker(devices[i % len(devices)], batch_size, accum, slowdown=float(factors[i])) for i in range(n)]
    trainer = AsyncTrainer(task, workers, method, options, server_device=devices[0], seed=seed, log=log,
                           checkpoint_path=os.path.join(out, method, "checkpoint.pt"), eval_every=eval_every,
                           torch_threads=torch_threads)
    return real_summary(method, trainer.run(max_time=seconds), trainer.exported)


def real_summary(method: str, s: dict, exported: Any = None) -> dict:
    """The comparison's view of one :meth:`AsyncTrainer.run` summary ``s``."""
    return {
        "clock": "real", "method": method, "updates": s["updates"], "discard_rate": s["discard_rate"],
        "gradients_per_worker": [w["pushed"] for w in s["per_worker"]],
        "accepted_per_worker": [w["accepted"] for w in s["per_worker"]],
        "gradients_per_s_per_worker": [w["gradients_per_s"] for w in s["per_worker"]],
        "cancelled": s["totals"]["cancelled"], "accounting_ok": s["accounting_ok"],
        "metric": s["metric"], "evals": [(t, m) for t, _, m in s["evals"]],
        "train_curve": [(t, x) for t, _, x in s["curve"]], "final_metric": s["final_loss"],
        "train_loss": s["train_loss_ema"], "exported": exported, "seconds": s["wall_time_s"],
        "server_overhead_us_per_update": s["server"]["overhead_us_per_update"],
    }


def _virtual(task: Any, method: str, options: dict, *, n: int, profile: str, seconds: float, seed: int, out: str,
             device: str, batch_size: int, accum: int, record_every: int, base: list,
             log: Callable[[str], None] | None) -> dict:
    model, rule = master_model(task, seed, device)
    policy = make_policy(method, rule, num_workers=n, **options)
    objective = TaskObjective(task, model, policy.params, num_workers=n, batch_size=batch_size, accum_steps=accum,
                              seed=seed, device=device)
    if not base:  # measured once, on the first method, so every method runs the same time model
        base.append(objective.measure_base(policy.params))
        if log:
            log(f"[ringmaster virtual] base time per gradient: {base[0] * 1e3:.1f} ms (measured)")
    time_model = authors_time_model(base[0], profile, n)
    wall0 = time.monotonic()
    next_line = [wall0 + 5.0]

    def progress(now: float) -> None:
        if log and time.monotonic() >= next_line[0]:
            log(f"[ringmaster virtual {method}] t={now:.1f}/{seconds:g} virtual s, version={policy.version}")
            next_line[0] = time.monotonic() + 5.0

    sim = Simulation(policy, objective, time_model, horizon=seconds, seed=seed, record_every=record_every,
                     progress=progress)
    trace = sim.run()
    path = os.path.join(out, method, "virtual_state.pt")
    checkpoint.write_atomic(path, sim.state_dict())
    times, values = trace.curve()
    measured = trace.version[~np.isnan(trace.metric)]
    if policy.version > (int(measured[-1]) if measured.size else 0):
        # the last updates fell between records: measure where the run ended, at its end time
        times = np.append(times, trace.end_time)
        values = np.append(values, objective.metric(policy.params))
    exported = None
    export = getattr(task, "export", None)
    if export is not None:
        exported = export(model, policy, policy.version, float(values[-1]))
    arrivals = ~trace.death
    accepted = Counter(trace.worker[trace.accepted].tolist())
    delivered = Counter(trace.worker[arrivals].tolist())
    pushed = int(arrivals.sum())
    losses = objective.losses
    return {
        "clock": "virtual", "method": method, "updates": int(policy.version),
        "discard_rate": (pushed - trace.num_accepted) / pushed if pushed else 0.0,
        "gradients_per_worker": [delivered.get(i, 0) for i in range(n)],
        "accepted_per_worker": [accepted.get(i, 0) for i in range(n)],
        "cancelled": int(trace.cancelled.sum()), "accounting_ok": trace.accounting_ok,
        "metric": trace.metric_name, "evals": list(zip(times.tolist(), values.tolist())),
        "final_metric": float(values[-1]), "train_loss": float(np.mean(losses[-10:])) if losses else None,
        "base_seconds": base[0], "time_model": {"profile": profile, "tau": time_model.base.tolist(), "jitter": 0.05},
        "exported": exported, "state": path, "seconds": seconds, "host_seconds": time.monotonic() - wall0,
    }


def run_methods(task: Any, methods: Sequence[str], *, clock: str, num_workers: int, profile: str, seconds: float,
                out: str, seed: int = 0, threshold: int = 2, batch: int | None = None, batch_size: int = 4,
                accum: int = 1, devices: Sequence[str] = ("cpu",), eval_every: float = 10.0, record_every: int = 5,
                log: Callable[[str], None] | None = None, torch_threads: int | None = 1,
                base_seconds: float | None = None) -> dict[str, dict]:
    """Run every method on ``task``; returns method -> summary (see the module doc).

    Real clock: ``seconds`` of wall time per method, held-out metric every ``eval_every``
    seconds. Virtual clock: ``seconds`` of virtual time, metric every ``record_every``
    updates. Checkpoints (and the task's export, if any) go under ``out/<method>/``.
    """
    names = check_methods(methods)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {num_workers!r}")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"time must be a finite number of seconds > 0, got {seconds!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"threshold must be an int >= 1, got {threshold!r}")
    if base_seconds is not None and not (math.isfinite(base_seconds) and base_seconds > 0):
        raise ValueError(f"base must be a finite number of seconds > 0, got {base_seconds!r}")
    os.makedirs(out, exist_ok=True)
    base: list[float] = [] if base_seconds is None else [float(base_seconds)]
    summaries = {}
    for method in names:
        options = policy_options(method, threshold, batch, num_workers)
        if log:
            log(f"[ringmaster] {method} ({clock} clock): {num_workers} workers, profile {profile}, {seconds:g} s")
        if clock == "real":
            summaries[method] = _real(task, method, options, n=num_workers, profile=profile, seconds=seconds, seed=seed,
                                      out=out, devices=devices, batch_size=batch_size, accum=accum,
                                      eval_every=eval_every, log=log, torch_threads=torch_threads)
        else:
            threads = torch.get_num_threads()
            if torch_threads:
                torch.set_num_threads(torch_threads)
            try:
                summaries[method] = _virtual(task, method, options, n=num_workers, profile=profile, seconds=seconds,
                                             seed=seed, out=out, device=devices[0], batch_size=batch_size,
                                             accum=accum, record_every=record_every, base=base, log=log)
            finally:
                torch.set_num_threads(threads)
    add_time_to_reference(summaries)
    return summaries


def run_seeds(task: Any, methods: Sequence[str], *, seeds: Sequence[int], out: str, clock: str,
              base_seconds: float | None = None, **options: Any) -> dict[str, Any]:
    """:func:`run_methods` once per seed (outputs under ``out/seed<s>/``); returns
    ``{"seeds", "runs": [one run_methods result per seed], "aggregate": aggregate_runs(runs)}``.
    On the virtual clock every seed uses the base time measured by the first (or
    ``base_seconds``), so all runs share one time model."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) and x >= 0 for x in seeds):
        raise ValueError(f"seeds must be distinct ints >= 0, at least one, got {seeds!r}")
    runs = []
    for seed in seeds:
        runs.append(run_methods(task, methods, clock=clock, seed=seed, out=os.path.join(out, f"seed{seed}"),
                                base_seconds=base_seconds, **options))
        if clock == "virtual" and base_seconds is None:
            base_seconds = next(iter(runs[0].values()))["base_seconds"]
    return {"seeds": seeds, "runs": runs, "aggregate": aggregate_runs(runs)}


def aggregate_runs(runs: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """Per method, over seeds (one :func:`run_methods` result each): median, quartiles and
    range of the start and final metric, updates, discard rate and, when the runs include
    the reference method, the first and sustained time to that seed's reference final."""
    out = {}
    for method in runs[0]:
        records = []
        for run in runs:
            s = run[method]
            record = {"start_metric": s["evals"][0][1], "final_metric": s["final_metric"],
                      "updates": s["updates"], "discard_rate": s["discard_rate"]}
            if s.get("target") is not None:
                record.update(first_hit_s=s["target"]["first_hit_s"], sustained_s=s["target"]["sustained_s"])
            records.append(record)
        out[method] = aggregate(records, keys=tuple(records[0]))
    return out


def add_time_to_reference(summaries: dict[str, dict], reference: str = "sync") -> None:
    """Per method: when its metric curve first reached, and when it stayed at or below, the
    reference method's final value (keys ``first_hit_of_<ref>_final``, ``sustained_...``)."""
    if reference not in summaries:
        return
    target = summaries[reference]["final_metric"]
    for s in summaries.values():
        times, values = zip(*s["evals"]) if s["evals"] else ((), ())
        first, sustained = time_to(times, values, target)
        s["target"] = {"reference": reference, "value": target, "first_hit_s": first, "sustained_s": sustained}


def table(result: dict[str, Any]) -> str:
    """One row per method, from a :func:`run_methods` result (a single run) or a
    :func:`run_seeds` one (cells are median [min, max] over seeds, k/K where only k seeds
    reached a time): metric at start and end, first and sustained time to the sync final
    metric, then (single run) training loss, updates, discard rate, gradients per worker."""
    if "aggregate" in result:
        return _seeds_table(result)
    summaries = result
    first = next(iter(summaries.values()))
    metric = first["metric"]
    rows = [("method", f"{metric} start", f"{metric} final", "t->sync final (first|sustained)", "train loss",
             "updates", "discarded", "grads per worker")]

    def seconds(x: float | None) -> str:
        return "never" if x is None else f"{x:.1f}"

    for name, s in summaries.items():
        target = s.get("target")
        reach = "-" if target is None else f"{seconds(target['first_hit_s'])} | {seconds(target['sustained_s'])}"
        rows.append((name, f"{s['evals'][0][1]:.4f}", f"{s['final_metric']:.4f}", reach,
                     "-" if s["train_loss"] is None else f"{s['train_loss']:.3f}", str(s["updates"]),
                     f"{s['discard_rate']:.1%}", " ".join(str(g) for g in s["gradients_per_worker"])))
    return text_table(rows)


def _seeds_table(result: dict[str, Any]) -> str:
    runs, agg = result["runs"], result["aggregate"]
    metric = next(iter(runs[0].values()))["metric"]
    rows = [("method", f"{metric} start", f"{metric} final", "t->sync final first", "t->sync final sustained",
             "updates", "discarded")]
    for name, a in agg.items():
        times = [spread_text(a[k]) if k in a else "-" for k in ("first_hit_s", "sustained_s")]
        rows.append((name, spread_text(a["start_metric"], ".4f"), spread_text(a["final_metric"], ".4f"), *times,
                     spread_text(a["updates"], ".0f"), spread_text(a["discard_rate"], ".1%")))
    return (f"{text_table(rows)}\nmedian [min, max] over seeds {result['seeds']}; times in seconds of the run's "
            "clock; '-': never, k/K: reached on k of K seeds")


def plot(result: dict[str, Any], path: str, title: str) -> str:
    """The metric against time per method (the paper's figure style), as a PNG at ``path``:
    one run's curves, or for a :func:`run_seeds` result the median curve over seeds with
    a min-max band."""
    if "runs" in result:
        return _plot_seeds(result, path, title)
    summaries = result
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    clock = "virtual" if next(iter(summaries.values()))["clock"] == "virtual" else "wall"
    for name, s in summaries.items():
        if s["evals"]:
            t, v = zip(*s["evals"])
            ax.plot(t, v, marker="o" if len(t) < 40 else None, markersize=3, label=name)
    target = next((s["target"] for s in summaries.values() if s.get("target")), None)
    if target is not None:
        ax.axhline(target["value"], color="gray", linestyle=":", linewidth=1, label=f"{target['reference']} final")
    ax.set_xlabel(f"{clock} time (s)")
    ax.set_ylabel(next(iter(summaries.values()))["metric"])
    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_seeds(result: dict[str, Any], path: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    first = next(iter(runs[0].values()))
    horizon = max(s["evals"][-1][0] for run in runs for s in run.values() if s["evals"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in runs[0]:
        curves = [tuple(zip(*run[name]["evals"])) for run in runs if run[name]["evals"]]
        grid, median, low, high = band(curves, horizon)
        (line,) = ax.plot(grid, median, label=name)
        ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(f"{'virtual' if first['clock'] == 'virtual' else 'wall'} time (s)")
    ax.set_ylabel(first["metric"])
    ax.set_title(textwrap.fill(f"{title}; median over {len(runs)} seeds, band: min-max", 80), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
