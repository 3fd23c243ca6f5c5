"""``ringmaster bench optim``: one Muon step on NanoChat-like hidden matrices.

The contestants do the same math (Nesterov momentum 0.95, quintic Newton–Schulz with 5
steps iterated in bf16, ``max(1, rows/cols)^0.5`` scale, decoupled weight decay) on the
same matrices:

- ``ours``: :class:`ringmaster_kernels.optim.Gluon` with ``ns_dtype=torch.bfloat16``
  (``ops.lmo_step_``: Triton on CUDA, the torch twin on CPU, one batched Newton–Schulz
  per shape either way), with its default non-finite check;
- ``torch_muon``: ``torch.optim.Muon`` (a Python loop per parameter; bf16 Newton–Schulz
  on every device);
- ``compiled_twin``: ``torch.compile`` of the plain-torch twin ``reference.lmo_step_``
  (bf16 Newton–Schulz).

``launches`` counts what one step of ``ours`` launches (after a warm-up step), for the
whole list and for each shape group alone: Triton kernels by name and torch operators
that run a kernel (``kernels.launches.count_launches``; with ``--backend triton`` and
``TRITON_INTERPRET=1`` it counts the Triton path on a CPU too); ``step_capturable`` is
the whole list's step with ``capturable=True`` (hence ``nonfinite="ignore"``: no guard).

One more row is not the same math: ``ours_fp32_ns``, Gluon iterating in fp32 (the CPU
default; on CUDA the default is bf16, i.e. ``ours``).

Ratios are a baseline's median time over ours (> 1: ours is faster), from one run
(``--rounds`` interleaves the contestants and takes the median of the round medians);
``torch_muon/ours_fp32_ns`` compares torch.optim.Muon with the fp32 row. ``agreement`` is
each optimizer row's relative Frobenius distance, for one step's update from the same
start, to that update in float64: rows doing the same math sit at the same distance.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING
from ._args import nonnegative_int, positive_int

if TYPE_CHECKING:  # torch loads inside run(): the CLI stays light to start
    import torch

# (depth, width) as in NanoChat (model_dim = 64 * depth); "small" is a CPU-sized
# stand-in, "tiny" a smoke test.
MODELS = {"tiny": (1, 32), "small": (4, 256), "d12": (12, 768), "d20": (20, 1280)}
HYPER = dict(lr=0.02, momentum=0.95, weight_decay=0.01)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=None,
                        help="parameter sets (default: d12 d20 on CUDA, small on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    parser.add_argument("--warmup", type=nonnegative_int, help="untimed steps per contestant (default: 3; 1 with --quick)")
    parser.add_argument("--repeats", type=positive_int, help="timed steps per contestant (default: 10; 3 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast look (seconds, not minutes, on a CPU): the tiny model unless --model, fewer steps, "
                             "no torch.compile contestant")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="measure every contestant this many times, interleaved, so load drift on a "
                             "shared machine hits all alike; report the median of round medians")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contestant")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (1 avoids OpenMP spin-waits on a loaded machine)")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                        help="backend of the 'ours' rows and of the launch count (triton on a CPU runs the "
                             "interpreter: slow, and its bf16 tl.dot is wrong, so only the counts mean anything)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def hidden_shapes(depth: int, width: int) -> list[tuple[int, int]]:
    """NanoChat's block matrices: q, k, v, attention out (d x d), MLP in (4d x d) and out (d x 4d)."""
    block = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return block * depth


def _tensors(shapes, device, dtype):
    """Parameters with gradients, the same on every call."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) / s[1] ** 0.5).to(device, dtype)) for s in shapes]
    for p, s in zip(params, shapes):
        p.grad = torch.randn(s, generator=gen).to(device, dtype)
    return params


def _gluon(shapes, device, dtype, ns_dtype, backend="auto", **options):
    from ..optim import Gluon

    return Gluon(_tensors(shapes, device, dtype), lr=HYPER["lr"], momentum=HYPER["momentum"], nesterov=True,
                 weight_decay=HYPER["weight_decay"], ns_coefficients="quintic", ns_dtype=ns_dtype,
                 norm_options={"scale": "muon"}, backend=backend, **options)


def _optimizers(shapes, device, dtype, backend="auto"):
    """name -> make(): a fresh optimizer over fresh ``_tensors``, for the optimizer rows."""
    import torch

    def gluon(ns_dtype):
        return lambda: _gluon(shapes, device, dtype, ns_dtype, backend)

    def torch_muon():
        return torch.optim.Muon(_tensors(shapes, device, dtype), lr=HYPER["lr"], momentum=HYPER["momentum"],
                                nesterov=True, weight_decay=HYPER["weight_decay"])

    return {"ours": gluon(torch.bfloat16), "torch_muon": torch_muon, "ours_fp32_ns": gluon(torch.float32)}


def _contestants(shapes, device, dtype, compile_twin: bool, backend="auto"):
    """name -> (make, step): ``make()`` builds fresh params/grads/state, ``step(obj)`` runs one step."""
    import torch

    from .. import reference

    out = {name: (make, lambda opt: opt.step()) for name, make in _optimizers(shapes, device, dtype, backend).items()}
    if compile_twin:
        def twin(params, grads, momenta):
            reference.lmo_step_(params, grads, momenta, norm="spectral", lr=HYPER["lr"], beta=HYPER["momentum"],
                                nesterov=True, weight_decay=HYPER["weight_decay"], radius=1.0,
                                scale="muon", steps=5, coefficients="quintic", compute_dtype=torch.bfloat16)

        compiled = torch.compile(twin)

        def make_twin():
            params = _tensors(shapes, device, dtype)
            return ([p.detach() for p in params], [p.grad for p in params],
                    [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params])

        out["compiled_twin"] = (make_twin, lambda state: compiled(*state))
    return out


def launch_counts(shapes, device, dtype, backend: str = "auto") -> dict:
    """Launches of one warm step of ``ours``: ``{"step": ..., "step_capturable": ...,
    "per_shape_group": {"RxC": ...}}``.

    Each entry is ``count_launches().summary()``. The iteration dtype is the device's
    default: what is launched does not depend on it.
    """
    from ..kernels.launches import count_launches

    def one_step(subset, **options):
        opt = _gluon(subset, device, dtype, None, backend, **options)
        opt.step()  # the first step allocates state and autotunes
        with count_launches() as counts:
            opt.step()
        return counts.summary()

    groups = sorted(set(shapes))
    return {"step": one_step(shapes), "step_capturable": one_step(shapes, capturable=True, nonfinite="ignore"),
            "per_shape_group": {f"{r}x{c}": one_step([s for s in shapes if s == (r, c)]) for r, c in groups}}


def _first_update(opt) -> torch.Tensor:
    """One step's update of every parameter, flattened, in fp64 on the CPU."""
    import torch

    params = opt.param_groups[0]["params"]
    before = [p.detach().double().cpu().clone() for p in params]  # clone: fp64 CPU params would alias
    opt.step()
    return torch.cat([(p.detach().double().cpu() - b).flatten() for p, b in zip(params, before)])


def _agreement(shapes, device, dtype, backend="auto") -> dict[str, float]:
    """Relative distance of each optimizer row's first update from the float64 one (the CPU
    twin iterating in fp64): rows doing the same math land at the same distance."""
    import torch

    exact = _first_update(_gluon(shapes, "cpu", torch.float64, torch.float64, backend="torch"))
    return {name: float((_first_update(make()) - exact).norm() / exact.norm())
            for name, make in _optimizers(shapes, device, dtype, backend).items()}


def _measure(make, step, device, warmup, repeats):
    import torch

    from ._timing import time_fn

    try:
        obj = make()
        with torch.no_grad():
            return time_fn(lambda: step(obj), device=device, warmup=warmup, repeats=repeats)
    except torch.OutOfMemoryError as exc:  # d20 may not fit on a smaller card
        return {"skipped": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        if torch.device(device).type == "cuda":  # hand this contestant's memory to the next
            obj = None
            torch.cuda.empty_cache()


def _combine(results: list[dict]) -> dict:
    """One contestant's rounds: median of the round medians, overall min, total repeats."""
    import statistics

    done = [r for r in results if "median_s" in r]
    if len(done) < len(results):
        return next(r for r in results if "median_s" not in r)
    return {"median_s": statistics.median(r["median_s"] for r in done), "min_s": min(r["min_s"] for r in done),
            "repeats": sum(r["repeats"] for r in done), "round_medians_s": [r["median_s"] for r in done]}


def _table(result: dict) -> str:
    lines = [f"bench optim on {result['machine']['device']} ({result['dtype']} params, {result['threads']} threads)"]
    for model, r in result["models"].items():
        lines.append(f"  {model}: {r['matrices']} matrices, {r['parameters'] / 1e6:.1f}M parameters")
        for name, t in r["times"].items():
            shown = f"{t['median_s'] * 1e3:10.2f} ms (min {t['min_s'] * 1e3:.2f})" if "median_s" in t else t["skipped"]
            lines.append(f"    {name:14s} {shown}")
        for name, ratio in r["ratios"].items():
            lines.append(f"    {name:28s} {ratio:6.2f}x")
        for name, rel in r["agreement"].items():
            lines.append(f"    {name + ' vs float64':28s} {rel:.2e} relative")
        launches = r["launches"]
        lines.append(f"    launches per step: {launches['step']['triton']} Triton, {launches['step']['torch']} torch ops"
                     f" (capturable: {launches['step_capturable']['triton']} Triton, "
                     f"{launches['step_capturable']['torch']} torch ops)")
        for group, c in launches["per_shape_group"].items():
            lines.append(f"      {group:>12s}: {c['triton']} Triton, {c['torch']} torch ops")
    return "\n".join(lines)


def check(args: argparse.Namespace) -> None:
    """Flags that argparse's types cannot check alone."""
    import torch

    if args.device is not None and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available")


def run(args: argparse.Namespace) -> int:
    import torch

    from ._timing import emit, machine_info

    from tqdm import tqdm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats or (3 if args.quick else 10)
    dtype = getattr(torch, args.dtype)
    models = args.model or (["tiny"] if args.quick else ["d12", "d20"] if torch.device(device).type == "cuda" else ["small"])
    result = {"machine": machine_info(), "device": device, "dtype": args.dtype, "backend": args.backend, "hyper": HYPER,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "models": {}}
    compile_twin = not (args.no_compile or args.quick)
    # stderr, shown on a terminal only: the default run takes minutes on a CPU
    progress = tqdm(total=0, desc="bench optim", unit="contestant", leave=False, disable=None)
    for model in models:
        shapes = hidden_shapes(*MODELS[model])
        contestants = _contestants(shapes, device, dtype, compile_twin, args.backend)
        progress.total += len(contestants) * args.rounds
        progress.refresh()
        rounds = []
        for _ in range(args.rounds):
            rounds.append({})
            for name, (make, step) in contestants.items():
                progress.set_postfix_str(f"{model} {name}")
                rounds[-1][name] = _measure(make, step, device, warmup, repeats)
                progress.update()
        times = {name: _combine([r[name] for r in rounds]) for name in contestants}
        pairs = [(name, "ours") for name in times if name != "ours"] + [("torch_muon", "ours_fp32_ns")]
        ratios = {
            f"{base}/{mine}": times[base]["median_s"] / times[mine]["median_s"]
            for base, mine in pairs if "median_s" in times[base] and "median_s" in times[mine]
        }
        try:
            agreement = _agreement(shapes, device, dtype, args.backend)
        except torch.OutOfMemoryError:
            agreement = {}
        result["models"][model] = {
            "depth_width": MODELS[model], "matrices": len(shapes),
            "parameters": sum(r * c for r, c in shapes), "times": times, "ratios": ratios,
            "agreement": agreement, "launches": launch_counts(shapes, device, dtype, args.backend),
        }
    progress.close()
    emit(result, args.json, _table)
    return 0
