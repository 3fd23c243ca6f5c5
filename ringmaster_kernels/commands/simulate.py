"""``ringmaster simulate quadratic|sweep|hetero-data``: the paper's quadratic in virtual time.

``quadratic`` runs every method on ``--seeds K`` seeds (``--seed``, ``--seed + 1``, ...) and
prints, per method, the median and the [min, max] over seeds of the sustained time to
target (the first time after which ||grad f||^2 stays below the target to the horizon),
the first hit, the final value and the median over the last quarter; ``--json`` gives the
per-seed records and the aggregates; ``--plot`` draws the median curve with a min-max
band. Step sizes come from values tuned at this exact scale (any other scale is refused
with a message naming the scale they came from), from ``--lr``/``--threshold``/``--batch``,
or from ``--tune``, which searches the paper's grid (``--tune-grid fine``: then half-steps
around its best; ``--tune-grid local``: a 12-point grid around the stored values, the cheap
budget) on ``--tune-seed``, never one of the reported seeds. ``sweep`` reports Ringmaster's speed-up (sustained metric, median and IQR over
seeds) over synchronous LMO and over the best other baseline at each heterogeneity level.
Progress goes to stderr (tqdm). Both take faults: ``--outlier WORKER:FACTOR`` (a
straggler) and ``--die WORKER@TIME`` (a worker lost in virtual time), each repeatable,
applied at every heterogeneity level. ``hetero-data`` (``commands/_hetero.py``): every
worker its own f_i; which methods reach a stationary point of f = mean f_i.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from ..optim.policies import METHODS
from ..runtime.reporting import json_ready
from ._args import (float_list, nonnegative_float, nonnegative_int, output_file, positive_float, positive_int,
                    unit_interval)

METHOD_NAMES = tuple(METHODS)
TIME_MODELS = ("paper", "constant", "sqrt", "linear", "uniform")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True)
    quad = sub.add_parser("quadratic", help="all methods on the paper's quadratic")
    _common(quad, workers=6174, dim=1729, horizon=2000.0)
    quad.add_argument("--heterogeneity", type=nonnegative_float, default=1.0, help="S: 0 homogeneous, 1 the paper's times")
    quad.add_argument("--method", action="append", choices=METHOD_NAMES,
                      help="run only this method (repeatable), with --lr/--threshold/--batch/--no-stops overrides")
    quad.add_argument("--lr", type=positive_float, help="step size (eta / gamma) for the chosen methods")
    quad.add_argument("--threshold", type=positive_int, help="Ringmaster's delay threshold R")
    quad.add_argument("--batch", type=positive_int, help="Rennala's batch size B")
    quad.add_argument("--stops", action=argparse.BooleanOptionalAction, default=None,
                      help="Ringmaster's stops (cancel jobs whose delay reached R) on or off (default: on)")
    quad.add_argument("--tune", action="store_true", help="grid-search every method on --tune-seed first")
    quad.add_argument("--tune-grid", choices=("paper", "fine", "local"), default="paper",
                      help="the tuning budget: the paper's grid (step sizes over powers of 5); fine: that, then "
                           "half-steps (x 5^±1/2) and neighbouring R/B around its best; local: 12 points around "
                           "the stored values")
    quad.add_argument("--jobs", type=nonnegative_int, default=1,
                      help="worker processes for independent runs (0: one per CPU core; each pays a torch import)")
    from . import _hetero

    _hetero.add_arguments(sub)
    swp = sub.add_parser("sweep", help="Ringmaster's speed-up vs heterogeneity")
    _common(swp, workers=64, dim=64, horizon=20000.0)
    swp.add_argument("--levels", type=float_list, default=(0, 0.25, 0.5, 1, 2, 4),
                     help="comma-separated heterogeneity levels S (0 = homogeneous)")
    swp.add_argument("--no-retune", action="store_true",
                     help="use the stored S = 1 values as they are (only at the scale they were tuned at)")


def _common(p: argparse.ArgumentParser, *, workers: int, dim: int, horizon: float) -> None:
    p.add_argument("--workers", type=positive_int, default=workers, help="n")
    p.add_argument("--dim", type=positive_int, default=dim, help="d")
    p.add_argument("--horizon", type=positive_float, default=horizon, help="virtual time to simulate")
    p.add_argument("--time-model", default="paper", choices=TIME_MODELS)
    p.add_argument("--noise", type=nonnegative_float, default=0.01, help="gradient noise std")
    p.add_argument("--target", type=positive_float, default=1e-4, help="target as a fraction of ||grad f(x0)||^2")
    p.add_argument("--norm", default="l2", help="norm ball of the LMO (l2 = the authors' Muon on a vector)")
    p.add_argument("--radius", type=positive_float, help="LMO radius (default: Muon's 1 x d gain for l2, else 1)")
    p.add_argument("--momentum", type=unit_interval, default=0.95, help="beta, in [0, 1)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov look-ahead in the LMO-momentum update (the _alg1 methods never use it)")
    p.add_argument("--seed", type=nonnegative_int, default=1, help="first reported seed")
    p.add_argument("--seeds", type=positive_int, default=1, help="K: report seeds --seed .. --seed + K - 1")
    p.add_argument("--tune-seed", type=nonnegative_int, default=0, help="seed tuning runs on (not a reported one)")
    p.add_argument("--outlier", action="append", default=[], type=_outlier, metavar="WORKER:FACTOR",
                   help="worker WORKER (0-based) computes FACTOR (> 0) times slower; repeatable")
    p.add_argument("--die", action="append", default=[], type=_death, metavar="WORKER@TIME",
                   help="worker WORKER (0-based) is lost at virtual time TIME (>= 0) and the method "
                        "stops waiting for it (policy.remove_worker); repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=output_file, help="write a PNG here")


def _fault(text: str, sep: str, value_name: str, valid, wanted: str) -> tuple[int, float]:
    """``"WORKER<sep>VALUE"`` as ``(worker, value)``; argparse reports the error with the flag."""
    form = f"WORKER{sep}{value_name}"
    worker, found, value = text.partition(sep)
    try:
        parsed = int(worker), float(value)
    except ValueError:
        parsed = None
    if not found or parsed is None:
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
    if parsed[0] < 0:
        raise argparse.ArgumentTypeError(f"WORKER must be >= 0, got {text!r}")
    if not valid(parsed[1]):
        raise argparse.ArgumentTypeError(f"{value_name} must be {wanted}, got {text!r}")
    return parsed


def _outlier(text: str) -> tuple[int, float]:
    return _fault(text, ":", "FACTOR", lambda f: math.isfinite(f) and f > 0, "a finite number > 0")


def _death(text: str) -> tuple[int, float]:
    return _fault(text, "@", "TIME", lambda t: math.isfinite(t) and t >= 0, "a finite number >= 0")


def _check_faults(args: argparse.Namespace) -> None:
    """Worker ids against ``--workers``, and no worker given twice per flag (ValueError naming the flag)."""
    for flag, faults in (("--outlier", args.outlier), ("--die", args.die)):
        seen = set()
        for worker, _ in faults:
            if worker >= args.workers:
                raise ValueError(f"{flag}: worker {worker} is not in [0, {args.workers}) (--workers {args.workers})")
            if worker in seen:
                raise ValueError(f"{flag}: worker {worker} is given twice")
            seen.add(worker)


def run(args: argparse.Namespace) -> int:
    from ..runtime import experiments as ex

    if args.experiment == "hetero-data":
        from . import _hetero

        return _hetero.run(args)
    try:
        _check_faults(args)
        if not (0.0 <= args.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {args.momentum}")
        exp = ex.QuadraticExperiment(
            workers=args.workers, dim=args.dim, horizon=args.horizon,
            heterogeneity=getattr(args, "heterogeneity", 1.0), time_model=args.time_model,
            noise=args.noise, target=args.target, norm=args.norm, radius=args.radius, momentum=args.momentum,
            nesterov=args.nesterov, outliers=tuple(args.outlier), deaths=tuple(args.die),
        )
        exp.validate()
        seeds = tuple(range(args.seed, args.seed + args.seeds))
        if args.tune_seed in seeds:
            raise ValueError(f"tune-seed {args.tune_seed} is a reported seed ({seeds[0]}..{seeds[-1]}): "
                             "tuning and reporting must use disjoint seeds")
        if args.experiment == "quadratic":
            if args.jobs < 0:
                raise ValueError(f"jobs must be >= 0, got {args.jobs}")
            methods, params, overrides = _plan(args, ex, exp)
            # build every policy once: bad values raise here, before any simulation
            for m in methods:
                if m in params:
                    exp.build(m, params[m])
            return _quadratic(args, ex, exp, methods, params, overrides, seeds)
        levels = tuple(float(v) for v in args.levels)
        for level in levels:
            ex.replace(exp, heterogeneity=level).validate()
        if args.no_retune:
            for level in levels:  # the stored values only where they were tuned
                ex.SWEEP_TUNED.for_experiment(ex.replace(exp, heterogeneity=level), ("ringmaster",) + ex.BASELINES)
        return _sweep(args, ex, exp, levels, seeds)
    except ValueError as exc:
        print(f"ringmaster simulate: error: {exc}", file=sys.stderr)
        return 2


def _check_overrides(overrides: dict) -> None:
    """Fail fast on a bad flag value, before the scale guard and any run."""
    lr = overrides.get("lr")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    for key in ("threshold", "batch"):
        if key in overrides and overrides[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {overrides[key]}")


def _plan(args, ex, exp):
    """Methods to run and their parameters: flags, else the values stored for this exact
    scale (the guard raises naming the stored scale), else ``--tune`` fills them later."""
    overrides = {k: getattr(args, k) for k in ("lr", "threshold", "batch", "stops") if getattr(args, k) is not None}
    _check_overrides(overrides)
    methods = tuple(args.method) if args.method else ex.METHOD_ORDER
    for key in overrides:
        if not any(key in METHODS[m][2] for m in methods):
            raise ValueError(f"--{key} applies to none of the methods {methods}")
    tuned_keys = {"lr", "threshold", "batch"}
    if args.tune and tuned_keys & set(overrides):
        raise ValueError(f"--tune chooses {sorted(tuned_keys & set(overrides))}; do not also pass them")
    params = {}
    for m in methods:
        given = {k: v for k, v in overrides.items() if k in METHODS[m][2]}
        needed = tuned_keys & set(METHODS[m][2])
        if args.tune:
            continue  # filled by tuning
        if needed <= set(given):
            params[m] = given
        else:
            params[m] = {**ex.TUNED.for_experiment(exp, (m,))[m], **given}
    return methods, params, overrides


def _runner(n_procs: int, label: str):
    """Run ``(function, args)`` jobs: tqdm on stderr, worker processes if n_procs > 1."""
    import os

    from tqdm import tqdm

    def run_jobs(jobs):
        procs = min(len(jobs), n_procs or os.cpu_count() or 1)
        if procs <= 1:
            out = []
            with tqdm(total=len(jobs), desc=label, unit="run", file=sys.stderr) as bar:
                for fn, fn_args in jobs:
                    bar.set_postfix_str(str(fn_args[1])[:40])
                    out.append(fn(*fn_args))
                    bar.update(1)
            return out
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent has used torch's thread pools, which do not survive fork
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(fn, *fn_args) for fn, fn_args in jobs]
            with tqdm(total=len(jobs), desc=label, unit="run", file=sys.stderr) as bar:
                for _ in as_completed(futures):
                    bar.update(1)
            return [f.result() for f in futures]

    return run_jobs


def _run_one(exp, method, params, seed):
    """One reported run: its record and its curve (small enough to cross a pickle)."""
    trace = exp.run(method, params, seed=seed)
    times, values = trace.curve()
    return {**exp.summary(trace), "wall_s": trace.wall_s}, (times, values)


def _tune_one(exp, method, grid, anchors, seed, refine=False):
    from ..runtime import experiments as ex

    return ex.tune(exp, (method,), seed=seed, grids={method: grid}, anchors=anchors, refine=refine)[method]


def _quadratic(args, ex, exp, methods, params, overrides, seeds) -> int:
    import time

    from ..runtime.metrics import DEFINITIONS, aggregate
    from ._sim_report import grid_table, method_table, plot_bands

    tuning = None
    if args.tune:
        if args.tune_grid == "local":
            centres = ex.TUNED.params  # a local grid around values from another scale is still a tuning
            grids = {m: ex.local_grid(centres.get(m) or ex.AUTHOR_DEFAULTS.get(m) or ex.TUNED.params["ringmaster"])
                     for m in methods}
        else:
            grids = {m: ex.grid_for(m) for m in methods}
        # no anchors: the order of the runs, hence which rows are cut off, does not depend on
        # the stored values, so a re-run reproduces the grid tables cell for cell
        # flags that are not tuned (--no-stops) hold in every tuning run too
        fixed = {m: {k: v for k, v in overrides.items() if k in METHODS[m][2]} for m in methods}
        refine = args.tune_grid == "fine"
        jobs = [(_tune_one, (exp, m, [{**p, **fixed[m]} for p in grids[m]], None, args.tune_seed, refine))
                for m in methods]
        tuning = dict(zip(methods, _runner(args.jobs, "tune")(jobs)))
        for m in methods:
            params[m] = tuning[m]["best"]
    t0 = time.perf_counter()
    jobs = [(_run_one, (exp, m, params[m], s)) for m in methods for s in seeds]
    results = _runner(args.jobs, "simulate")(jobs)
    wall = time.perf_counter() - t0
    out = {"target": args.target, "seeds": list(seeds), "report_wall_s": wall, "tune_seed": args.tune_seed if args.tune else None,
           "metrics": DEFINITIONS, "scale": ex.scale_of(exp), "methods": {}}
    curves = {}
    for i, m in enumerate(methods):
        runs = results[i * len(seeds):(i + 1) * len(seeds)]
        records = [r for r, _ in runs]
        curves[m] = [c for _, c in runs]
        keys = ("time_to_target", "first_hit", "final", "tail_median", "accepted", "discarded")
        out["methods"][m] = {"params": {**params[m], "norm": exp.norm, "momentum": exp.momentum},
                             "aggregate": aggregate(records, keys), "seeds": records}
    if args.plot:
        initial = curves[methods[0]][0][1][0]
        plot_bands(args.plot, curves, params, exp.target * initial, exp.horizon,
                   f"quadratic: n={exp.workers}, d={exp.dim}, S={exp.heterogeneity:g}", r"$\|\nabla f(x)\|^2$")
    if args.json:
        if tuning is not None:
            out["tuning"] = tuning
        print(json.dumps(json_ready(out), allow_nan=False))
    else:
        print(f"quadratic: n={exp.workers} d={exp.dim} horizon={exp.horizon:g} S={exp.heterogeneity:g} "
              f"seeds={seeds[0]}..{seeds[-1]} target={args.target:g} x ||grad f(x0)||^2{_faults_text(exp)}   "
              f"wall {wall:.1f} s")
        if tuning is not None:
            for m, t in tuning.items():
                print(grid_table(m, t))
        print(method_table({m: {**rec, "params": params[m]} for m, rec in out["methods"].items()}))
    return 0


def _faults_text(exp) -> str:
    """The faults as the flags that set them (empty without faults), for the table headers."""
    flags = [f"--outlier {w}:{f:g}" for w, f in exp.outliers] + [f"--die {w}@{t:g}" for w, t in exp.deaths]
    return "  faults: " + " ".join(flags) if flags else ""


def _sweep(args, ex, exp, levels, seeds) -> int:
    from tqdm import tqdm

    from ._sim_report import params_text, plot_sweep

    anchors = ex.SWEEP_TUNED.params
    order = ("ringmaster",) + ex.BASELINES
    per_level = len(seeds) * len(order) + (0 if args.no_retune else sum(len(ex.local_grid(anchors[m])) for m in order))
    with tqdm(total=len(levels) * per_level, desc="sweep", unit="run", file=sys.stderr) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)
        rows = ex.sweep(exp, levels, anchors, seeds=seeds, tune_seed=args.tune_seed,
                        retune=not args.no_retune, progress=progress)
    keys = ("heterogeneity", "speedup_vs_sync", "speedup_vs_best_baseline", "methods", "params")
    out = {"seeds": list(seeds), "metric": "time_to_target (sustained)", "levels": [{k: r[k] for k in keys} for r in rows]}
    if args.plot:
        plot_sweep(args.plot, rows, f"n={exp.workers}, d={exp.dim}, target {exp.target:g}, {len(seeds)} seeds")
    if args.json:
        print(json.dumps(json_ready(out), allow_nan=False))
        return 0
    print(f"sweep: n={exp.workers} d={exp.dim} target={exp.target:g} seeds={seeds[0]}..{seeds[-1]}"
          f"{_faults_text(exp)}   sustained time to target, median [min, max] over seeds")
    from ..runtime.metrics import spread_text

    print(f"{'S':>6}" + "".join(f"{n:>30}" for n in order) + f"{'vs sync':>22}{'vs best':>22}")
    for r in rows:
        def cell(method: str) -> str:
            cut = sum(rec["cut_off"] is not None for rec in r["methods"][method]["seeds"])
            text = spread_text(r["methods"][method]["aggregate"]["time_to_target"])
            return f"{text} ({cut} cut)" if cut else text

        cells = "".join(f"{cell(n):>30}" for n in order)

        def up(stats: dict) -> str:
            text = spread_text(stats, ".2f")
            return f"{'>=' if stats['bounds'] else ''}{text}"

        print(f"{r['heterogeneity']:>6g}{cells}{up(r['speedup_vs_sync']):>22}{up(r['speedup_vs_best_baseline']):>22}")
    print("'-': not reached within the horizon; (c cut): c seeds of a baseline after sync were cut off once they "
          "could no longer beat the best baseline of their seed; '>=': some seeds give only a lower bound (the "
          "other method never got there); k/K: seeds with a value")
    for r in rows:
        print(f"S={r['heterogeneity']:g} params: " + "; ".join(f"{m} {params_text(p)}" for m, p in r["params"].items()))
    return 0
