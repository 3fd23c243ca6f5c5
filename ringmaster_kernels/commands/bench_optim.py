"""``ringmaster bench optim``: one Muon step on NanoChat-like hidden matrices.

Three contestants do the same math (Nesterov momentum 0.95, quintic Newton–Schulz with 5
steps, ``max(1, rows/cols)^0.5`` scale, decoupled weight decay) on the same matrices:

- ``ours``: :class:`ringmaster_kernels.optim.Gluon` (``ops.lmo_step_``: Triton on CUDA,
  the torch twin on CPU), with its default non-finite check;
- ``torch_muon``: ``torch.optim.Muon`` (a Python loop per parameter; bf16 Newton–Schulz
  on every device);
- ``compiled_twin``: ``torch.compile`` of the plain-torch twin ``reference.lmo_step_``.

Ratios are the baseline's median time over ours (> 1: ours is faster), from one run.
"""
from __future__ import annotations

import argparse

# (depth, width) as in NanoChat (model_dim = 64 * depth); "small" is a CPU-sized
# stand-in, "tiny" a smoke test.
MODELS = {"tiny": (1, 32), "small": (4, 256), "d12": (12, 768), "d20": (20, 1280)}
HYPER = dict(lr=0.02, momentum=0.95, weight_decay=0.01)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", choices=list(MODELS), default=None,
                        help="parameter sets (default: d12 d20 on CUDA, small on CPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile contestant")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids OpenMP spin-waits on a loaded machine)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def hidden_shapes(depth: int, width: int) -> list[tuple[int, int]]:
    """NanoChat's block matrices: q, k, v, attention out (d x d), MLP in (4d x d) and out (d x 4d)."""
    block = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    return block * depth


def _contestants(shapes, device, dtype, compile_twin: bool):
    """name -> (make, step): ``make()`` builds fresh params/grads/state, ``step(obj)`` runs one step."""
    import torch

    from .. import reference
    from ..optim import Gluon

    def tensors():
        gen = torch.Generator(device="cpu").manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) / s[1] ** 0.5).to(device, dtype)) for s in shapes]
        for p, s in zip(params, shapes):
            p.grad = torch.randn(s, generator=gen).to(device, dtype)
        return params

    def make_ours():
        params = tensors()
        return Gluon(params, lr=HYPER["lr"], momentum=HYPER["momentum"], nesterov=True,
                     weight_decay=HYPER["weight_decay"], ns_coefficients="quintic", norm_options={"scale": "muon"})

    def make_torch():
        return torch.optim.Muon(tensors(), lr=HYPER["lr"], momentum=HYPER["momentum"], nesterov=True,
                                weight_decay=HYPER["weight_decay"])

    def twin(params, grads, momenta):
        reference.lmo_step_(params, grads, momenta, norm="spectral", lr=HYPER["lr"], beta=HYPER["momentum"],
                            nesterov=True, weight_decay=HYPER["weight_decay"], radius=1.0,
                            scale="muon", steps=5, coefficients="quintic")

    compiled = torch.compile(twin) if compile_twin else None

    def make_twin():
        params = tensors()
        return ([p.detach() for p in params], [p.grad for p in params],
                [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params])

    out = {
        "ours": (make_ours, lambda opt: opt.step()),
        "torch_muon": (make_torch, lambda opt: opt.step()),
    }
    if compiled is not None:
        out["compiled_twin"] = (make_twin, lambda state: compiled(*state))
    return out


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


def _table(result: dict) -> str:
    lines = [f"bench optim on {result['machine']['device']} ({result['dtype']} params)"]
    for model, r in result["models"].items():
        lines.append(f"  {model}: {r['matrices']} matrices, {r['parameters'] / 1e6:.1f}M parameters")
        for name, t in r["times"].items():
            shown = f"{t['median_s'] * 1e3:10.2f} ms" if "median_s" in t else t["skipped"]
            lines.append(f"    {name:14s} {shown}")
        for name, ratio in r["ratios"].items():
            lines.append(f"    {name:28s} {ratio:6.2f}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from ._timing import emit, machine_info

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    dtype = getattr(torch, args.dtype)
    models = args.model or (["d12", "d20"] if torch.device(device).type == "cuda" else ["small"])
    result = {"machine": machine_info(), "device": device, "dtype": args.dtype, "hyper": HYPER,
              "threads": torch.get_num_threads(), "models": {}}
    for model in models:
        shapes = hidden_shapes(*MODELS[model])
        times = {
            name: _measure(make, step, device, args.warmup, args.repeats)
            for name, (make, step) in _contestants(shapes, device, dtype, not args.no_compile).items()
        }
        ours = times["ours"].get("median_s")
        ratios = {
            f"{name}/ours": t["median_s"] / ours
            for name, t in times.items() if name != "ours" and ours and "median_s" in t
        }
        result["models"][model] = {
            "depth_width": MODELS[model], "matrices": len(shapes),
            "parameters": sum(r * c for r, c in shapes), "times": times, "ratios": ratios,
        }
    emit(result, args.json, _table)
    return 0
