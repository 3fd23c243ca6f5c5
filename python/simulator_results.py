"""Regenerate the "## Simulator" section of benchmarks/RESULTS.md from the current tree.

One command, every number and figure of that section from this run:

    python python/simulator_results.py            # writes benchmarks/simulator/* and the section

It runs, in order (progress on stderr): the authors' harness check (n = 512, d = 256,
their defaults, 3 seeds); the paper-scale quadratic with ``--tune`` on seed 0 and 5
reported seeds (the tuning grids and the table); the Ringmaster variants by name at the
harness scale; the heterogeneity sweep (several seeds); the heterogeneous-data
comparison. Raw JSON goes to ``benchmarks/simulator/*.json`` beside the PNGs. Options:
``--jobs`` worker processes (default 2), ``--out`` the folder, ``--results`` the file
whose section is replaced (everything from its "## Simulator" heading to the end),
``--steps`` a subset of the steps (each writes ``OUT/STEP.json``; the section is rendered
from all of them, so steps may run as separate invocations on the same tree).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from ringmaster_kernels.runtime.metrics import DEFINITIONS, spread_text  # noqa: E402

COMMAND = "python python/simulator_results.py"


def cli(args: list[str]) -> tuple[dict, float]:
    """``ringmaster <args> --json`` in a child process (its tqdm on our stderr); (JSON, seconds)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ringmaster_kernels.cli", *args, "--json"], cwd=ROOT,
                         check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout), time.perf_counter() - t0


def params_text(p: dict) -> str:
    return ", ".join(f"{k} {v:g}" if not isinstance(v, bool) else f"{k} {v}" for k, v in p.items()
                     if k not in ("norm", "momentum"))


def method_rows(methods: dict) -> list[str]:
    rows = ["| method | values | **sustained time to target** | first hit | final ‖∇f‖² | last-quarter median | accepted | discarded |",
            "|---|---|---|---|---|---|---|---|"]
    for m, r in methods.items():
        a = r["aggregate"]
        rows.append(f"| {m} | {params_text(r['params'])} | **{spread_text(a['time_to_target'])}** | "
                    f"{spread_text(a['first_hit'])} | {spread_text(a['final'], '.3g')} | "
                    f"{spread_text(a['tail_median'], '.3g')} | {a['accepted']['median']:.0f} | {a['discarded']['median']:.0f} |")
    return rows


def grid_rows(method: str, tuning: dict) -> list[str]:
    rows = tuning["grid"]
    size_key = next((k for k in rows[0]["params"] if k in ("threshold", "batch")), None)
    lrs = sorted({r["params"]["lr"] for r in rows})
    sizes = sorted({r["params"][size_key] for r in rows}) if size_key else [None]
    cell = {(r["params"]["lr"], r["params"].get(size_key)): r for r in rows}
    best = tuning["best"]

    def text(r):
        if r is None:
            return ""
        v = f">{r['cut_off']:.0f}" if r["cut_off"] is not None else "–" if r["time_to_target"] is None \
            else f"{r['time_to_target']:.0f}"
        return f"**{v}**" if r["params"] == best else v

    letter = {"threshold": "R", "batch": "B"}.get(size_key)
    out = [f"**{method}** (chosen: {params_text(best)})", "",
           "| lr | " + " | ".join(f"{letter}={s}" for s in sizes) + " |" if size_key else "| lr | sustained time |",
           "|---|" + "---|" * len(sizes)]
    for lr in lrs:
        out.append(f"| {lr:.3g} | " + " | ".join(text(cell.get((lr, s))) for s in sizes) + " |")
    return out + [""]


def harness(seeds=(0, 1, 2)) -> list[str]:
    from ringmaster_kernels.runtime.experiments import QuadraticExperiment

    exp = QuadraticExperiment(workers=512, dim=256, horizon=600)
    cells = {"f2": [], "f4": [], "s4": [], "disc": []}
    for s in seeds:
        tr = exp.run("ringmaster", {"lr": 0.04, "threshold": 6}, seed=s)
        f2 = tr.time_to(1e-2 * tr.initial_metric)[0]
        f4, s4 = tr.time_to(1e-4 * tr.initial_metric)
        cells["f2"].append("never" if f2 is None else f"{f2:.1f}")
        cells["f4"].append("never" if f4 is None else f"{f4:.1f}")
        cells["s4"].append("not sustained" if s4 is None else f"{s4:.1f}")
        cells["disc"].append(f"{tr.num_discarded / tr.started:.2%}")
    return ["| | first 1e-2 of ‖∇f(x0)‖² | first 1e-4 | sustained 1e-4 | started gradients discarded |",
            "|---|---|---|---|---|",
            "| authors' harness (issue #6) | about 342 | about 450 | not reported | > 98% |",
            f"| ours, seeds {' / '.join(map(str, seeds))} | " + " | ".join(" / ".join(cells[k]) for k in ("f2", "f4", "s4", "disc")) + " |"]


# the re-tune runs before the stored values are reported: TUNED is what it chose
STEPS = ("harness", "paper_quadratic", "paper_stored", "variants", "sweep", "hetero_data")


def step_argv(name: str, out_arg: str, jobs: list[str], quick: bool) -> list[str]:
    """The ``ringmaster`` command line of each step (how the section quotes it)."""
    plot = ["--plot", os.path.join(out_arg, f"{name}.png")]
    return {
        # what python/paper_quadratic.py runs: the stored values, 5 seeds
        "paper_stored": ["simulate", "quadratic", "--seeds", "5", *jobs, *plot],
        "paper_quadratic": ["simulate", "quadratic", "--tune", "--tune-grid", "local" if quick else "fine",
                            "--seeds", "5", *jobs, *plot],
        "variants": ["simulate", "quadratic", "--workers", "512", "--dim", "256", "--horizon", "600", "--seeds", "5",
                     "--method", "ringmaster", "--method", "ringmaster_nostops", "--method", "ringmaster_alg1",
                     "--lr", "0.04", "--threshold", "6", *jobs, *plot],
        "sweep": ["simulate", "sweep", "--levels", "0,1,4", "--horizon", "2000", "--seeds", "3", *plot],
        "hetero_data": ["simulate", "hetero-data", "--seeds", "5", *plot],
    }[name]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "simulator"))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated steps to run (default all: {','.join(STEPS)}); each writes OUT/STEP.json")
    ap.add_argument("--no-render", action="store_true", help="run the steps only; do not rewrite --results")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test of this program at a tiny scale (write it to another --results file)")
    args = ap.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"--steps: unknown {unknown}; known: {STEPS}")
    tiny = ["--workers", "16", "--dim", "8", "--horizon", "40", "--target", "1e-2"] if args.quick else []
    os.makedirs(args.out, exist_ok=True)
    out_arg = os.path.relpath(args.out, ROOT)  # the commands run in ROOT: print them as one would type them
    jobs = ["--jobs", str(args.jobs)]
    for name in steps:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        t0 = time.perf_counter()
        if name == "harness":
            data = {"rows": harness(seeds=(0,) if args.quick else (0, 1, 2))}
        else:
            argv = step_argv(name, out_arg, jobs, args.quick)
            print(f"[simulator_results] {name}: ringmaster {' '.join(argv)}", file=sys.stderr, flush=True)
            small = [] if not args.quick else tiny if name != "hetero_data" else tiny[:2] + ["--horizon", "100"]
            data, _ = cli(argv + small)
            data["argv"] = argv
        data["started"], data["wall_s"] = started, time.perf_counter() - t0
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(data, f)
    if not args.no_render:
        render(args.out, args.results)
    return 0


TITLES = {"harness": "authors' harness check", "paper_stored": "paper scale, stored values",
          "paper_quadratic": "paper scale, re-tuned on the sustained time", "variants": "Ringmaster variants",
          "sweep": "heterogeneity sweep", "hetero_data": "heterogeneous data"}


def section_harness(d: dict, rel: str) -> list[str]:
    return ["**Faithfulness to the authors' harness** (their defaults gamma 0.04, R 6; n = 512, d = 256, horizon 600; "
            "the authors report first touches; also `tests/test_simulator.py::test_authors_harness_facts_n512`):", "",
            *d["rows"], ""]


def section_stored(paper: dict, rel: str, tuned: dict | None = None) -> list[str]:
    """What ``python/paper_quadratic.py`` runs (the stored values); when they are the values
    the re-tune step chose and every figure agrees with its table, only the wall time."""
    head = (f"**Paper scale, stored values**: `ringmaster {' '.join(paper['argv'])}`, what `python "
            f"python/paper_quadratic.py` runs at `experiments.TUNED` ({paper['wall_s'] / 60:.1f} min wall, "
            f"{paper['report_wall_s'] / 60:.1f} of them simulating; seeds {paper['seeds'][0]}..{paper['seeds'][-1]})")
    if tuned is not None and all(
            m in tuned["methods"] and r["params"] == tuned["methods"][m]["params"]
            and r["aggregate"] == tuned["methods"][m]["aggregate"] for m, r in paper["methods"].items()):
        return [head + ": the values the re-tune above chose; its table, figure for figure (same seeds, same "
                f"code), and [plot]({rel}/paper_stored.png).", ""]
    return [head + " (they differ from what the re-tune above chose):", "",
            *method_rows(paper["methods"]), "",
            f"![paper quadratic, stored values]({rel}/paper_stored.png)", ""]


def section_paper(paper: dict, rel: str) -> list[str]:
    L = [f"**Paper scale** (n = 6174, d = 1729, horizon 2000, S = 1, target 1e-4 of ‖∇f(x0)‖²): "
         f"`ringmaster {' '.join(paper['argv'])}` ({paper['wall_s'] / 60:.1f} min wall, tuning included), "
         f"tuned on the sustained time on seed {paper['tune_seed']}, reported on seeds "
         f"{paper['seeds'][0]}..{paper['seeds'][-1]}:", "",
         *method_rows(paper["methods"]), "",
         f"![paper quadratic]({rel}/paper_quadratic.png)", "",
         "**Tuning grids** (sustained time to target on seed 0; step sizes over powers of 5, then, with "
         "`--tune-grid fine`, half-steps (x 5^±1/2) and the neighbouring R or B around the first stage's best: "
         "the sparse rows; '–' not reached within the horizon; '>T' cut off "
         "at T: its metric was above the target at a time T >= the best sustained time so far, so its own "
         "sustained time is later than T and it cannot win; chosen value in bold; ties and unreached rows are "
         "ranked by the last-quarter median):", ""]
    for m, t in paper["tuning"].items():
        L += grid_rows(m, t)
    return L


def section_variants(variants: dict, rel: str) -> list[str]:
    return [f"**Ringmaster variants by name** at the harness scale (n = 512, d = 256, horizon 600, the authors' "
            f"lr 0.04, R 6, not tuned): `ringmaster {' '.join(variants['argv'])}`. `ringmaster` has stops (the "
            "authors' code), `ringmaster_nostops` discards on arrival instead, `ringmaster_alg1` is the paper's "
            "analysed Algorithm 1 (no stops, no Nesterov):", "",
            *method_rows(variants["methods"]), "",
            f"![variants]({rel}/variants.png)", ""]


def section_sweep(sweep: dict, rel: str) -> list[str]:
    L = [f"**Heterogeneity sweep** (`ringmaster {' '.join(sweep['argv'])}`: n = 64, d = 64, time model `paper` with "
         "`tau_i = 1 + S (sqrt(i-1) + |N(0, i)|)`, target 1e-4; at every level each method re-tuned on seed 0 "
         "over a local grid around the stored S = 1 anchors, then reported on the seeds). Speed-ups are on the "
         "sustained time, per seed, then median [min, max]; '>=' marks levels where some seeds give only a "
         "lower bound (the other method never sustained the target within the horizon: its time is taken as "
         "the horizon, or its cut time); '(c cut)': baselines cut off once they could no longer beat the best "
         "baseline of their seed.", "",
         "| S | " + " | ".join(("ringmaster", "sync", "async", "delay_adaptive", "rennala")) + " | vs sync | vs best baseline |",
         "|---|---|---|---|---|---|---|---|"]
    for r in sweep["levels"]:
        cells = []
        for m in ("ringmaster", "sync", "async", "delay_adaptive", "rennala"):
            cut = sum(rec["cut_off"] is not None for rec in r["methods"][m]["seeds"])
            text = spread_text(r["methods"][m]["aggregate"]["time_to_target"])
            cells.append(f"{text} ({cut} cut)" if cut else text)
        ups = [("≥ " if r[k]["bounds"] else "") + spread_text(r[k], ".2f") for k in ("speedup_vs_sync", "speedup_vs_best_baseline")]
        L.append(f"| {r['heterogeneity']:g} | " + " | ".join(cells + ups) + " |")
    return L + ["", f"![sweep]({rel}/sweep.png)", ""]


def section_hetero(hetero: dict, rel: str) -> list[str]:
    L = [f"**Heterogeneous data** (`ringmaster {' '.join(hetero['argv'])}`: worker i minimises its own "
         "f_i(x) = 1/2 x^T A x - b_i^T x, b_i = b + zeta s_i v; the metric is ‖∇f‖ of the global f = mean f_i; "
         "one step size for all, not tuned). ‖∇f‖ at the frequency-weighted bias point (w_i = 1/E tau_i, where "
         f"ASGD goes): **{hetero['bias_grad_norm']:.4g}**.", "",
         "| method | final ‖∇f‖ | last-quarter median | own bias level | verdict |", "|---|---|---|---|---|"]
    for m, r in hetero["methods"].items():
        a = r["aggregate"]
        L.append(f"| {m} | {spread_text(a['final'], '.3g')} | {spread_text(a['tail_median'], '.3g')} | "
                 f"{spread_text(a['accepted_bias_grad_norm'], '.3g')} | {r['verdict']} |")
    return L + ["", "Own bias level: ‖∇f‖ at the stationary point of the run's accepted-gradient frequencies (where a "
                "method applying every accepted gradient with one step would go; Ringmaster ASGD's stops favour fast "
                "workers further than ASGD). Verdict: 'stationary point of f' when the last-quarter median is under a "
                "quarter of the bias level; else 'not settled' when it differs from the previous quarter's median by "
                "more than 1.5x; else 'bias point' when within 1.5x of its own bias level.", "",
                f"![heterogeneous data]({rel}/hetero_data.png)", ""]


SECTIONS = {"harness": section_harness, "paper_stored": section_stored, "paper_quadratic": section_paper, "variants": section_variants,
            "sweep": section_sweep, "hetero_data": section_hetero}


def render(out: str, results: str) -> None:
    """Replace the section of ``results`` with what the step JSONs in ``out`` hold; a step
    with no JSON gets a line saying it was not regenerated and how to run it."""
    rel = os.path.relpath(out, os.path.dirname(os.path.abspath(results)))
    data = {}
    for name in STEPS:
        path = os.path.join(out, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                data[name] = json.load(f)
    if not data:
        raise SystemExit(f"no step results in {out}/: run the steps first")
    started = min(d["started"] for d in data.values())
    L = ["## Simulator", "",
         f"Regenerated by `{COMMAND}` (steps started from {started}; raw JSON in `{rel}/`); every number and "
         f"figure below comes from those runs of the tree. Machine: {platform.machine()}, {os.cpu_count()} cores "
         f"shared with other jobs, Python {platform.python_version()}, no GPU. Virtual times and counts depend only "
         "on the seeds and the code; host seconds depend on the load.", "",
         "How times to target are measured (`ringmaster_kernels/runtime/metrics.py`): " +
         "; ".join(f"**{k}** = {v}" for k, v in DEFINITIONS.items()) +
         ". The target is a fraction of ‖∇f(x0)‖²; the metric is recorded after every update, so the sustained "
         "time is exact. Cells are the median [min, max] over the reported seeds, with k/K when only k of K seeds "
         "reached it ('-': not reached). Tuning is on seed 0, reporting on other seeds.", ""]
    for name in STEPS:
        if name == "paper_stored" and name in data:
            L += section_stored(data[name], rel, data.get("paper_quadratic"))
        elif name in data:
            L += SECTIONS[name](data[name], rel)
        else:
            L += [f"**{TITLES[name]}**: not regenerated in this run (`{COMMAND} --steps {name}`).", ""]
    L += ["Wall time per step: " + ", ".join(f"{k} {d['wall_s']:.0f} s" for k, d in data.items()) + ".", ""]

    with open(results) as f:
        text = f.read()
    head = text.split("\n## Simulator\n")[0].rstrip("\n")
    with open(results, "w") as f:
        f.write(head + "\n\n" + "\n".join(L))
    print(f"[simulator_results] wrote {results} from {out}/", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
