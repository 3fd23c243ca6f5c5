"""Momentum estimators and step-size rules against EMA/Nesterov, synchronous and under
Ringmaster, on the simulator's clock (issue 13's experiment).

Each *variant* is a momentum estimator with the constant rule, or EMA with another rule.
Its jobs cost ``c`` gradients (``c = 2`` for MVR: two gradients; HCM: a gradient and a
Hessian-vector product), so two views are reported:

* **equal time**: a job of worker i takes ``c_time * tau_i`` virtual seconds, ``c_time``
  the measured cost of its job relative to one gradient (the quadratic: 2 by construction,
  one matvec each); the score is the median of the metric over the last quarter of the
  horizon (the "sustained" level; ../shared/ALGORITHMS.md, "Measuring time to target");
* **equal gradient budget**: the metric at the first update after ``B`` gradient
  evaluations (``c`` per arrival, discarded ones included: a real worker computed them),
  ``B`` the same for every variant of a (problem, method, seed).

Step sizes are tuned per (variant, method) over a small grid on a tuning seed by the
equal-time score, then reported on other seeds (median and spread).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..optim import estimators
from ..optim.policies import make_policy
from .objectives import Objective, TridiagonalQuadratic
from .simulator import Trace, simulate
from .time_models import TimeModel, make_time_model


@dataclass(frozen=True)
class Variant:
    """One estimator/rule pair; ``lr`` is the grid's centre (the rule's natural scale)."""

    name: str
    estimator: str = "ema"
    rule: str = "constant"
    options: tuple[tuple[str, float], ...] = ()
    lr: float = 1.0

    @property
    def cost(self) -> int:
        """Gradient evaluations per job (MVR: two gradients; HCM: gradient + HVP)."""
        return 1 if estimators.get(self.estimator).needs is None else 2

    def group(self) -> dict[str, Any]:
        return {"momentum_estimator": self.estimator, "step_rule": self.rule, "step_options": dict(self.options)}


def variants(lr: float, smoothness: float) -> list[Variant]:
    """Every estimator (constant rule) and every rule (EMA); ``lr``: the constant-rule step,
    ``smoothness``: the problem's L (l0l1's L0 with L1 = 0, scale_calibrated's L). Each
    rule's grid centre is its natural scale: l0l1 and scale_calibrated make t a Euclidean
    step length ~ ||g|| / L, and under delays R a stable step is ~ 1 / (L R) of it;
    theorem2's t decays as (k + 1)^(-3/4) (the parameter-agnostic Ringmaster's eta = 0.5
    scale); distance_adaptive's t is already a distance, so lr multiplies it by ~1."""
    out = [Variant(name, estimator=name, lr=lr) for name in estimators.KNOWN]
    out += [
        Variant("ema+l0l1", rule="l0l1", options=(("L0", smoothness), ("L1", 0.0)), lr=0.1),
        Variant("ema+theorem2", rule="theorem2", lr=1.0),
        Variant("ema+distance_adaptive", rule="distance_adaptive", options=(("r_eps", 1e-3),), lr=1.0),
        Variant("ema+scale_calibrated", rule="scale_calibrated", options=(("L", smoothness),), lr=0.1),
    ]
    return out


def scaled(model: TimeModel, factor: float) -> TimeModel:
    """The same workers, each job ``factor`` times longer."""
    return TimeModel(model.base * factor, model.scale * factor, model.noise, model.death_time, model.pareto_shape)


def sustained(trace: Trace, horizon: float) -> float:
    """Median of the metric in effect over the last quarter of the horizon: the value
    standing at ``0.75 horizon`` and every later one (the metric is a step function of
    time: it changes only at updates)."""
    t, v = trace.curve()
    start = max(int(np.searchsorted(t, 0.75 * horizon, side="right")) - 1, 0)
    return float(np.median(v[start:])) if v.size else math.nan


def at_budget(trace: Trace, cost: int, budget: float) -> float:
    """The metric in effect when ``budget`` gradient evaluations have arrived (NaN: never)."""
    evaluations = np.cumsum(np.where(trace.death, 0, cost))
    reached = evaluations >= budget
    if not reached.any():
        return math.nan
    recorded = np.nonzero(np.isfinite(trace.metric[: int(np.argmax(reached)) + 1]))[0]
    return float(trace.metric[recorded[-1]]) if recorded.size else float(trace.initial_metric)


def evaluations(trace: Trace, cost: int) -> int:
    return int(cost * np.count_nonzero(~trace.death))


@dataclass
class Problem:
    """What a run needs: a fresh objective and initial groups, a time model, the horizon."""

    name: str
    make: Callable[[int], tuple[Objective, list[dict[str, Any]]]]  # seed -> (objective, groups)
    time_model: TimeModel
    horizon: float
    time_cost: Callable[[Variant], float]  # c_time per variant
    record_every: int = 1  # updates between metric records (a held-out loss is not free)


def run(problem: Problem, variant: Variant, method: str, lr: float, seed: int, *, threshold: int,
        momentum: float) -> Trace:
    objective, groups = problem.make(seed)
    groups = [{**g, **variant.group()} for g in groups]
    options = {"threshold": threshold} if method == "ringmaster" else {}
    policy = make_policy(method, groups, num_workers=problem.time_model.num_workers, lr=lr, momentum=momentum,
                         nesterov=False, **options)
    return simulate(policy, objective, scaled(problem.time_model, problem.time_cost(variant)),
                    horizon=problem.horizon, seed=seed, record_every=problem.record_every)


def experiment(problem: Problem, variant_list: Sequence[Variant], methods: Sequence[str], *, seeds: Sequence[int],
               tune_seed: int, grid: Sequence[float], threshold: int, momentum: float,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Tune (unless ``grid`` has one factor), then run every (variant, method) on ``seeds``;
    one row per pair."""
    rows = []
    for method in methods:
        traces: dict[str, list[Trace]] = {}
        chosen: dict[str, float] = {}
        edge: dict[str, bool] = {}
        for v in variant_list:
            if len(grid) == 1:  # nothing to tune
                chosen[v.name] = v.lr * grid[0]
                traces[v.name] = [run(problem, v, method, chosen[v.name], s, threshold=threshold, momentum=momentum)
                                  for s in seeds]
                log(f"{problem.name} {method} {v.name}: lr {chosen[v.name]:g} (not tuned)")
                continue
            scores = []
            for f in grid:
                score = sustained(run(problem, v, method, v.lr * f, tune_seed, threshold=threshold, momentum=momentum),
                                  problem.horizon)
                scores.append(math.inf if not math.isfinite(score) else score)
            best = int(np.argmin(scores))
            chosen[v.name] = v.lr * grid[best]
            edge[v.name] = best in (0, len(grid) - 1)  # the optimum may lie beyond the grid
            traces[v.name] = [run(problem, v, method, chosen[v.name], s, threshold=threshold, momentum=momentum)
                              for s in seeds]
            log(f"{problem.name} {method} {v.name}: lr {chosen[v.name]:g}")
        # one budget per seed: 90% of what the cheapest-to-run variant evaluated by the horizon
        budgets = [0.9 * min(evaluations(traces[v.name][i], v.cost) for v in variant_list) for i in range(len(seeds))]
        for v in variant_list:
            time_scores = [sustained(t, problem.horizon) for t in traces[v.name]]
            budget_scores = [at_budget(t, v.cost, b) for t, b in zip(traces[v.name], budgets)]
            rows.append({
                "problem": problem.name, "method": method, "variant": v.name, "lr": chosen[v.name],
                "grid_edge": edge.get(v.name, False),
                "cost": v.cost, "time_cost": problem.time_cost(v),
                "equal_time": _spread(time_scores), "equal_budget": _spread(budget_scores),
                "budget": float(np.median(budgets)),
                "accepted": float(np.median([t.num_accepted for t in traces[v.name]])),
                "curves": [[c.tolist() for c in t.curve()] for t in traces[v.name][:1]],
            })
    return rows


def _spread(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    ok = a[np.isfinite(a)]
    if not ok.size:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": float(np.median(ok)), "min": float(ok.min()), "max": float(ok.max()), "n": int(ok.size)}


def quadratic_problem(dim: int, workers: int, horizon: float) -> Problem:
    """The paper's stochastic quadratic (noise 0.01, l2 LMO, ``paper`` worker times)."""
    def make(seed: int):
        obj = TridiagonalQuadratic(dim, noise=0.01)
        return obj, [{"params": obj.initial_params(), "norm": "l2"}]

    return Problem(f"quadratic d={dim} n={workers}", make, make_time_model("paper", workers), horizon,
                   lambda v: float(v.cost))


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per (problem, method) the variants, equal-time and equal-budget medians
    [min, max] over the seeds; ``*``: the tuned lr is at an end of its grid."""
    def cell(s: dict[str, float]) -> str:
        if not s["n"]:
            return "not reached"
        return f"{s['median']:.3g} [{s['min']:.2g}, {s['max']:.2g}]"

    lines = ["| problem | method | variant | lr | job cost (grads / time) | equal time | equal budget | accepted gradients |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "*" if r.get("grid_edge") else ""
        lines.append(f"| {r['problem']} | {r['method']} | {r['variant']} | {r['lr']:g}{mark} | {r['cost']} / "
                     f"{r['time_cost']:.2f} | {cell(r['equal_time'])} | {cell(r['equal_budget'])} | {r.get('accepted', r.get('updates')):.0f} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str) -> str:
    """One panel per (problem, method): metric vs virtual time, first reported seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["problem"], r["method"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    colors = plt.get_cmap("tab20").colors  # eleven variants: the default cycle has ten colours
    for ax, (prob, method) in zip(axes[0], panels):
        mine = [r for r in rows if (r["problem"], r["method"]) == (prob, method)]
        for c, r in enumerate(mine):
            t, v = r["curves"][0]
            ax.plot(t, v, label=r["variant"], lw=1, ls="-" if r["cost"] == 1 else "--", color=colors[2 * c % 20 + c // 10])
        ax.set_yscale("log")
        ax.set_xlabel("virtual time (each job costs its gradients)")
        ax.set_ylabel("metric")
        ax.set_title(f"{prob}, {method}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1729)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--horizon", type=float, default=2000.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--methods", default="sync,ringmaster")
    parser.add_argument("--threshold", type=int, default=6)
    parser.add_argument("--momentum", type=float, default=0.95)
    parser.add_argument("--gpt", action="store_true", help="also the byte-level GPT of `ringmaster train` (virtual clock)")
    parser.add_argument("--no-quadratic", action="store_true", help="skip the quadratic")
    parser.add_argument("--gpt-updates", type=int, default=150, help="horizon of the GPT runs, in fastest-worker gradients")
    parser.add_argument("--gpt-grid", default="1",
                        help="GPT step-size factors around each variant's centre, tuned on --tune-seed "
                             "(default 1: not tuned, `ringmaster train`'s lr)")
    parser.add_argument("--out", default="runs/estimators")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        gpt_grid = tuple(float(f) for f in args.gpt_grid.split(","))
    except ValueError as exc:
        parser.error(f"--seeds takes integers and --gpt-grid numbers, comma-separated: {exc}")
    if args.tune_seed in seeds:
        parser.error(f"--tune-seed {args.tune_seed} is one of --seeds {args.seeds}: tune on another seed")
    if not all(math.isfinite(f) and f > 0 for f in gpt_grid):
        parser.error(f"--gpt-grid factors must be finite and > 0, got {args.gpt_grid}")
    methods = args.methods.split(",")
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = []
    if not args.no_quadratic:
        problem = quadratic_problem(args.dim, args.workers, args.horizon)
        # A = tridiag(-1, 2, -1) / 4 has largest eigenvalue < 1: L = 1
        rows += experiment(problem, variants(0.04, 1.0), methods, seeds=seeds, tune_seed=args.tune_seed,
                           grid=(0.125, 0.25, 0.5, 1.0, 2.0, 4.0), threshold=args.threshold, momentum=args.momentum)
    if args.gpt:
        from .estimator_gpt import gpt_problem, gpt_variants

        gpt = gpt_problem(args.gpt_updates)
        # `ringmaster train`'s R = 2 and beta = 0.9 for every variant; lr tuned over --gpt-grid
        rows += experiment(gpt, gpt_variants(), methods, seeds=seeds, tune_seed=args.tune_seed,
                           grid=gpt_grid, threshold=2, momentum=0.9)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "wall_s": time.perf_counter() - start}, f)
    print(table(rows))
    print(f"plot: {plot(rows, os.path.join(args.out, 'estimators.png'))}; wall {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
