"""``ringmaster simulate hetero-data``: which methods reach a stationary point of the global
f = mean f_i when every worker has its own f_i, and which stall at a frequency-weighted bias point."""
from __future__ import annotations

import argparse
import json
import sys

from ._args import nonnegative_float, nonnegative_int, output_file, positive_float, positive_int

METHODS = ("asgd", "ringmaster_asgd", "rescaled_asgd", "ringleader", "malenia")


def add_arguments(sub) -> None:
    p = sub.add_parser("hetero-data", help="heterogeneous data: global ||grad f|| vs the bias point, table + PNG")
    p.add_argument("--workers", type=positive_int, default=8, help="n")
    p.add_argument("--dim", type=positive_int, default=4, help="d (>= 2)")
    p.add_argument("--zeta", type=nonnegative_float, default=1.0, help="size of the per-worker shift of b_i")
    p.add_argument("--noise", type=nonnegative_float, default=0.01, help="gradient noise std")
    p.add_argument("--horizon", type=positive_float, default=2000.0, help="virtual time to simulate")
    p.add_argument("--time-model", default="paper", choices=("paper", "constant", "sqrt", "linear", "uniform"))
    p.add_argument("--lr", type=positive_float, default=0.2,
                   help="gamma, the same for every method (not tuned: the question is where they go, not how fast)")
    p.add_argument("--threshold", type=positive_int, default=4, help="R of ringmaster_asgd")
    p.add_argument("--known-times", action="store_true",
                   help="rescaled_asgd uses the time model's mean times (default: running mean of measured times)")
    p.add_argument("--method", action="append", choices=METHODS, help="run only this method (repeatable)")
    p.add_argument("--seed", type=nonnegative_int, default=1, help="first seed")
    p.add_argument("--seeds", type=positive_int, default=3, help="K: seeds --seed .. --seed + K - 1")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=output_file, help="write a PNG here")


def verdict(tail: float, previous: float, bias: float, own_bias: float) -> str:
    """``stationary point of f`` when the last quarter's median ||grad f|| is under a quarter
    of the frequency bias level (well past it, still falling or at its noise floor); else
    ``not settled`` when it differs from the previous quarter's by more than 1.5x; else
    ``bias point`` when within 1.5x of the run's own accepted-frequency bias level;
    ``neither`` otherwise."""
    if tail < 0.25 * bias:
        return "stationary point of f"
    if not previous / 1.5 <= tail <= 1.5 * previous:
        return "not settled"
    if own_bias / 1.5 <= tail <= 1.5 * own_bias:
        return "bias point"
    return "neither"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..runtime.hetero import compare
    from ..runtime.metrics import spread_text
    from ..runtime.reporting import json_ready

    try:
        if args.dim < 2:
            raise ValueError(f"dim must be >= 2, got {args.dim}")
        names = tuple(args.method) if args.method else METHODS
        options = {m: {"lr": args.lr} for m in names}
        if "ringmaster_asgd" in options:
            options["ringmaster_asgd"]["threshold"] = args.threshold
        if "rescaled_asgd" in options and args.known_times:
            options["rescaled_asgd"]["known_times"] = True
        seeds = tuple(range(args.seed, args.seed + args.seeds))
        with tqdm(total=len(names) * len(seeds), desc="hetero-data", unit="run", file=sys.stderr) as bar:
            def progress(label: str) -> None:
                bar.set_postfix_str(label)
                bar.update(1)
            res = compare(options, workers=args.workers, dim=args.dim, zeta=args.zeta, noise=args.noise,
                          horizon=args.horizon, time_model=args.time_model, seeds=seeds, progress=progress)
    except ValueError as exc:
        print(f"ringmaster simulate: error: {exc}", file=sys.stderr)
        return 2
    bias = res["bias_grad_norm"]
    for rec in res["methods"].values():
        agg = rec["aggregate"]
        rec["verdict"] = verdict(agg["tail_median"]["median"], agg["previous_quarter_median"]["median"], bias,
                                 agg["accepted_bias_grad_norm"]["median"])
    if args.plot:
        _plot(args.plot, res, args)
    if args.json:
        out = {"bias_grad_norm": bias, "seeds": list(seeds),
               "methods": {m: {k: v for k, v in r.items() if k != "curves"} for m, r in res["methods"].items()}}
        print(json.dumps(json_ready(out), allow_nan=False))
        return 0
    print(f"hetero-data: n={args.workers} d={args.dim} zeta={args.zeta:g} horizon={args.horizon:g} "
          f"time model {args.time_model} lr={args.lr:g} seeds={seeds[0]}..{seeds[-1]}; metric ||grad f|| of the "
          f"global f = mean f_i; at the frequency-weighted bias point (w_i = 1/E tau_i) it is {bias:.4g}")
    print(f"{'method':<18}{'final ||grad f||':>30}{'last-quarter median':>30}{'own bias level':>30}  verdict")
    for m, rec in res["methods"].items():
        agg = rec["aggregate"]
        print(f"{m:<18}{spread_text(agg['final'], '.3g'):>30}{spread_text(agg['tail_median'], '.3g'):>30}"
              f"{spread_text(agg['accepted_bias_grad_norm'], '.3g'):>30}  {rec['verdict']}")
    print("cells: median [min, max] over seeds; own bias level: ||grad f|| at the stationary point of the "
          "run's accepted-gradient frequencies (where a method that applies each accepted gradient alike would go)")
    return 0


def _plot(path: str, res: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runtime.metrics import band

    fig, ax = plt.subplots(figsize=(8, 5))
    for m, rec in res["methods"].items():
        grid, med, lo, hi = band(rec["curves"], args.horizon)
        (line,) = ax.semilogy(grid, med, label=f"{m}: {rec['verdict']}")
        ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(res["bias_grad_norm"], color="gray", ls="--", lw=0.8, label="frequency-weighted bias point")
    ax.set_xlabel("virtual time")
    ax.set_ylabel(r"$\|\nabla f(x)\|$ (global f)")
    ax.set_title(f"heterogeneous quadratic: n={args.workers}, d={args.dim}, zeta={args.zeta:g}, lr={args.lr:g}\n"
                 f"median over {args.seeds} seeds, band: min-max", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
