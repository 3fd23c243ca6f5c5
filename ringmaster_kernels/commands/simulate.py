"""``ringmaster simulate quadratic|sweep``: the paper's quadratic experiment in virtual time.

``quadratic`` runs every method (tuned values, or ``--method``/``--lr``/... overrides) and
prints a table or, with ``--json``, ``{"target", "methods": {NAME: {...}}}``; ``--plot``
writes ||grad f||^2 vs virtual time. ``--tune`` runs the paper's grid on ``--tune-seed``
and reports the chosen values on ``--seed``. ``sweep`` runs a heterogeneity sweep and
reports Ringmaster's time-to-target speed-up over synchronous LMO and over the best other
baseline at each level. Progress goes to stderr (tqdm). Both take faults: ``--outlier
WORKER:FACTOR`` (a straggler) and ``--die WORKER@TIME`` (a worker lost in virtual time),
each repeatable, applied at every heterogeneity level.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from ..runtime.reporting import json_ready
from ._args import (float_list, nonnegative_float, nonnegative_int, output_file, positive_float, positive_int,
                    unit_interval)

METHOD_NAMES = ("ringmaster", "ringmaster_pa", "sync", "async", "delay_adaptive", "rennala")
TIME_MODELS = ("paper", "constant", "sqrt", "linear", "uniform")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True)
    quad = sub.add_parser("quadratic", help="all methods on the paper's quadratic")
    _common(quad, workers=6174, dim=1729, horizon=2000.0)
    quad.add_argument("--heterogeneity", type=nonnegative_float, default=1.0, help="S: 0 homogeneous, 1 the paper's times")
    quad.add_argument("--method", action="append", choices=METHOD_NAMES + ("ringmaster_asgd",),
                      help="run only this method (repeatable), with --lr/--threshold/--batch overrides")
    quad.add_argument("--lr", type=positive_float, help="step size (eta / gamma) for the chosen methods")
    quad.add_argument("--threshold", type=positive_int, help="Ringmaster's delay threshold R")
    quad.add_argument("--batch", type=positive_int, help="Rennala's batch size B")
    quad.add_argument("--tune", action="store_true", help="grid-search every method on --tune-seed first")
    quad.add_argument("--tune-seed", type=nonnegative_int, default=0)
    quad.add_argument("--jobs", type=nonnegative_int, default=1,
                      help="worker processes for independent runs (0: one per CPU core; each pays a torch import)")
    swp = sub.add_parser("sweep", help="Ringmaster's speed-up vs heterogeneity")
    _common(swp, workers=64, dim=64, horizon=20000.0)
    swp.add_argument("--levels", type=float_list, default=(0, 0.25, 0.5, 1, 2, 4),
                     help="comma-separated heterogeneity levels S (0 = homogeneous)")
    swp.add_argument("--no-retune", action="store_true",
                     help="use the S = 1 tuned values at every level instead of re-tuning around them")


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
    p.add_argument("--seed", type=nonnegative_int, default=1, help="seed of the reported run")
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

    try:
        _check_faults(args)
        exp = ex.QuadraticExperiment(
            workers=args.workers, dim=args.dim, horizon=args.horizon,
            heterogeneity=getattr(args, "heterogeneity", 1.0), time_model=args.time_model,
            noise=args.noise, target=args.target, norm=args.norm, radius=args.radius, momentum=args.momentum,
            outliers=tuple(args.outlier), deaths=tuple(args.die),
        )
        exp.validate()
        if args.experiment == "quadratic":
            methods, params, overridden = _plan(args, ex)
            # build every policy once: bad values raise here, before any simulation
            for m in methods:
                exp.build(m, params[m])
            return _quadratic(args, ex, exp, methods, params, overridden)
        levels = tuple(float(v) for v in args.levels)
        for level in levels:
            ex.replace(exp, heterogeneity=level).validate()
        return _sweep(args, ex, exp, levels)
    except ValueError as exc:
        print(f"ringmaster simulate: error: {exc}", file=sys.stderr)
        return 2


def _plan(args, ex):
    """Methods to run and their parameters: tuned values, overridden by flags."""
    overrides = {k: getattr(args, k) for k in ("lr", "threshold", "batch") if getattr(args, k) is not None}
    methods = tuple(args.method) if args.method else ex.METHOD_ORDER
    params = {}
    for m in methods:
        allowed = ex.METHODS[m][2]
        params[m] = {**ex.TUNED[m], **{k: v for k, v in overrides.items() if k in allowed}}
    for key in overrides:
        if not any(key in ex.METHODS[m][2] for m in methods):
            raise ValueError(f"--{key} applies to none of the methods {methods}")
    overridden = bool(args.method or overrides or args.norm != "l2" or args.momentum != 0.95 or args.radius is not None)
    return methods, params, overridden


def _runner(n_procs: int, label: str):
    """Run ``(method, params, seed)`` jobs: tqdm on stderr, worker processes if n_procs > 1."""
    import os

    from tqdm import tqdm

    def run_jobs(exp, jobs):
        procs = min(len(jobs), n_procs or os.cpu_count() or 1)
        if procs <= 1:
            traces = []
            for method, params, seed in jobs:
                with tqdm(total=math.ceil(exp.horizon), desc=f"{label} {method}", unit="t", file=sys.stderr, leave=False) as bar:
                    def progress(t: float, bar=bar) -> None:
                        bar.update(int(t) - bar.n)
                    traces.append(exp.run(method, params, seed=seed, progress=progress))
            return traces
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: the parent has used torch's thread pools, which do not survive fork
        with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, exp, m, p, s) for m, p, s in jobs]
            with tqdm(total=len(jobs), desc=label, unit="run", file=sys.stderr) as bar:
                for _ in as_completed(futures):
                    bar.update(1)
            return [f.result() for f in futures]

    return run_jobs


def _run_one(exp, method, params, seed):
    return exp.run(method, params, seed=seed)


def _quadratic(args, ex, exp, methods, params, overridden) -> int:
    import time

    tuning = None
    if args.tune:
        from tqdm import tqdm

        total = sum(len(ex.grid_for(m)) for m in methods)
        with tqdm(total=total, desc="tune", unit="run", file=sys.stderr) as bar:
            def progress(label: str) -> None:
                bar.set_postfix_str(label)
                bar.update(1)
            tuning = ex.tune(exp, methods, seed=args.tune_seed, progress=progress)
        for m in methods:
            params[m] = tuning[m]["best"]
        overridden = True
    t0 = time.perf_counter()
    traces = _runner(args.jobs, "simulate")(exp, [(m, params[m], args.seed) for m in methods])
    wall = time.perf_counter() - t0
    result = {"target": args.target, "methods": {}}
    for m, tr in zip(methods, traces):
        rec = exp.summary(tr)
        if overridden:
            rec["params"] = {**params[m], "norm": args.norm, "momentum": args.momentum}
        result["methods"][m] = rec
    if args.plot:
        _plot_curves(args.plot, methods, traces, params, exp)
    if args.json:
        if tuning is not None:
            result["tuning"] = tuning
        print(json.dumps(json_ready(result), allow_nan=False))
    else:
        print(f"quadratic: n={exp.workers} d={exp.dim} horizon={exp.horizon:g} S={exp.heterogeneity:g} "
              f"seed={args.seed} target={args.target:g} x ||grad f(x0)||^2{_faults_text(exp)}   wall {wall:.1f} s")
        if tuning is not None:
            for m, t in tuning.items():
                _print_grid(m, t, args.tune_seed)
        print(f"{'method':<16}{'params':<30}{'final ||g||^2':>14}{'t_target':>10}{'accepted':>10}{'discarded':>11}{'wall s':>8}")
        for m, tr in zip(methods, traces):
            r = result["methods"][m]
            ttt = "-" if r["time_to_target"] is None else f"{r['time_to_target']:.1f}"
            p = ", ".join(f"{k}={v:g}" for k, v in params[m].items())
            print(f"{m:<16}{p:<30}{r['final_grad_norm_sq']:>14.3e}{ttt:>10}{r['accepted']:>10}{r['discarded']:>11}{tr.wall_s:>8.1f}")
    return 0


def _faults_text(exp) -> str:
    """The faults as the flags that set them (empty without faults), for the table headers."""
    flags = [f"--outlier {w}:{f:g}" for w, f in exp.outliers] + [f"--die {w}@{t:g}" for w, t in exp.deaths]
    return "  faults: " + " ".join(flags) if flags else ""


def _print_grid(method: str, tuning: dict, seed: int) -> None:
    """The grid as a table of times to target (rows: step size; columns: R or B), then the choice."""
    rows = tuning["grid"]
    size_key = next((k for k in rows[0]["params"] if k != "lr"), None)
    lrs = sorted({r["params"]["lr"] for r in rows})
    sizes = sorted({r["params"][size_key] for r in rows}) if size_key else [None]
    cell = {(r["params"]["lr"], r["params"].get(size_key)): r["time_to_target"] for r in rows}
    print(f"tuning {method} on seed {seed}: time to target ('-': not reached)")
    letter = {"threshold": "R", "batch": "B"}.get(size_key, "")
    print(f"{'lr':>10}" + "".join(f"{f'{letter}={s}' if size_key else 'time':>9}" for s in sizes))
    for lr in lrs:
        print(f"{lr:>10.3g}" + "".join(f"{'-' if cell[(lr, s)] is None else format(cell[(lr, s)], '.0f'):>9}" for s in sizes))
    print(f"chosen {method}: {tuning['best']}")


def _plot_curves(path, methods, traces, params, exp) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, tr in zip(methods, traces):
        t, v = tr.curve()
        stride = max(1, t.size // 4000)  # a figure cannot show more points; keep the last one
        idx = list(range(0, t.size, stride)) + [t.size - 1]
        label = m + " (" + ", ".join(f"{k}={v:g}" for k, v in params[m].items()) + ")"
        ax.semilogy(t[idx], v[idx], label=label)
    ax.axhline(exp.target * traces[0].initial_metric, color="gray", lw=0.8, ls="--", label="target")
    ax.set_xlabel("virtual time")
    ax.set_ylabel(r"$\|\nabla f(x)\|^2$")
    ax.set_title(f"quadratic: n={exp.workers}, d={exp.dim}, S={exp.heterogeneity:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep(args, ex, exp, levels) -> int:
    from tqdm import tqdm

    per_level = 5 + (0 if args.no_retune else sum(len(ex.local_grid(ex.SWEEP_TUNED[m])) for m in ex.BASELINES + ("ringmaster",)))
    with tqdm(total=len(levels) * per_level, desc="sweep", unit="run", file=sys.stderr) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)
        rows = ex.sweep(exp, levels, ex.SWEEP_TUNED, seed=args.seed,
                        retune=not args.no_retune, progress=progress)
    out = {"levels": [{k: r[k] for k in ("heterogeneity", "speedup_vs_sync", "speedup_vs_best_baseline")} for r in rows]}
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["heterogeneity"] for r in rows]
        for key, label in (("speedup_vs_sync", "vs synchronous LMO"), ("speedup_vs_best_baseline", "vs best other baseline")):
            ax.plot(xs, [math.nan if r[key] is None else r[key] for r in rows], marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("heterogeneity S")
        ax.set_ylabel("Ringmaster time-to-target speed-up")
        ax.set_title(f"n={exp.workers}, d={exp.dim}, target {exp.target:g}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
    if args.json:
        print(json.dumps(json_ready(out), allow_nan=False))
    else:
        print(f"sweep: n={exp.workers} d={exp.dim} target={exp.target:g} seed={args.seed}{_faults_text(exp)}")
        names = ("ringmaster",) + ex.BASELINES
        print(f"{'S':>6}" + "".join(f"{n:>16}" for n in names) + f"{'vs sync':>10}{'vs best':>10}")
        for r in rows:
            cells = "".join(f"{'-' if r['time_to_target'][n] is None else format(r['time_to_target'][n], '.1f'):>16}" for n in names)
            f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            print(f"{r['heterogeneity']:>6g}{cells}{f(r['speedup_vs_sync']):>10}{f(r['speedup_vs_best_baseline']):>10}")
        print("'-': not reached within the horizon, or (baselines after sync) within the best baseline time")
        for r in rows:
            print(f"S={r['heterogeneity']:g} params: " + "; ".join(
                f"{m} " + ",".join(f"{k}={v:g}" for k, v in p.items()) for m, p in r["params"].items()))
    return 0
