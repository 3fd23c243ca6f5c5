"""``ringmaster bench ns``: batched Newton–Schulz, Triton path vs the torch twin.

Times, per (shape, batch): the twin eagerly, the twin under ``torch.compile`` and the
Triton kernels (CUDA only: the CPU interpreter is a correctness tool, not a speed
measure). Reports each median time, the ratio compiled-twin / Triton, and the achieved
TFLOP/s against two FLOP counts: dense (every matmul in full) and symmetric (the two
Gram products count half, as the symmetric kernel computes them).
"""
from __future__ import annotations

import argparse
from ._args import nonnegative_int, positive_float, positive_int

# NanoChat d12 / d20 / d24 hidden matrices, and two large single matrices.
NANOCHAT_SHAPES = [(768, 768), (768, 3072), (1280, 1280), (1280, 5120), (1536, 1536), (1536, 6144)]
LARGE_SHAPES = [(4096, 4096), (8192, 8192)]
NANOCHAT_BATCHES = [1, 8, 24]
# Without a GPU only the twin can be timed, at a few GFLOP/s: a short default run.
CPU_QUICK = [((768, 768), 1), ((768, 3072), 1)]


def _shape(text: str) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape must look like 768x3072, got {text!r}") from exc
    if m <= 0 or n <= 0:
        raise argparse.ArgumentTypeError(f"shape sides must be positive, got {text!r}")
    return m, n


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--shapes", type=lambda s: [_shape(v) for v in s.split(",")], default=None,
                        help="comma-separated MxN list (default: NanoChat shapes x batches 1,8,24 plus "
                             "4096x4096 and 8192x8192 single on CUDA; 768x768 and 768x3072, batch 1, on CPU)")
    parser.add_argument("--batches", type=_int_list, default=None, help="comma-separated batch sizes for --shapes")
    parser.add_argument("--full", action="store_true", help="the full CUDA shape list even on CPU (slow)")
    parser.add_argument("--steps", type=positive_int, default=5, help="Newton-Schulz iterations")
    parser.add_argument("--coefficients", default="polar_express", choices=["polar_express", "quintic"])
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="input and compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--warmup", type=nonnegative_int, default=None, help="untimed calls (default 3 CUDA / 1 CPU)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed calls (default 20 CUDA / 3 CPU)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd twin")
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="the device's peak for this dtype; adds time / symmetric-FLOP floor")


def _cases(args, on_cuda: bool) -> list[tuple[tuple[int, int], int]]:
    if args.shapes is not None:
        return [(s, b) for s in args.shapes for b in (args.batches or [1])]
    if on_cuda or args.full:
        return [(s, b) for s in NANOCHAT_SHAPES for b in NANOCHAT_BATCHES] + [(s, 1) for s in LARGE_SHAPES]
    return list(CPU_QUICK)


def flop_counts(m: int, n: int, batch: int, steps: int) -> tuple[float, float]:
    """(dense, symmetric) FLOPs of ``steps`` iterations on ``batch`` (m, n) matrices.

    On the wide orientation r x c (r <= c): X X^T is 2 r^2 c, A A is 2 r^3, B X is
    2 r^2 c; a symmetric kernel does half of the first two.
    """
    r, c = min(m, n), max(m, n)
    dense = 4 * r * r * c + 2 * r**3
    symmetric = 3 * r * r * c + r**3
    return float(dense * steps * batch), float(symmetric * steps * batch)


def _table(result: dict) -> str:
    lines = [f"machine: {result['machine']}", f"config: {result['config']}"]
    # TFLOP/s columns are for Triton when timed, else the compiled twin, else eager.
    lines.append(f"{'shape':>11} {'batch':>5} {'eager ms':>10} {'compiled ms':>11} {'triton ms':>10} "
                 f"{'cmp/tri':>7} {'TF/s dense':>10} {'TF/s sym':>9}")

    def ms(v):
        return f"{v * 1e3:10.2f}" if v is not None else f"{'-':>10}"

    for r in result["results"]:
        best = r["triton_s"] or r["compiled_s"] or r["eager_s"]
        ratio = f"{r['compiled_vs_triton']:7.2f}" if r["compiled_vs_triton"] else f"{'-':>7}"
        lines.append(
            f"{r['shape'][0]:>5}x{r['shape'][1]:<5} {r['batch']:>5} {ms(r['eager_s'])} {ms(r['compiled_s']):>11} "
            f"{ms(r['triton_s'])} {ratio} {r['flops_dense'] / best / 1e12:10.4g} {r['flops_symmetric'] / best / 1e12:9.4g}"
        )
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import reference
    from ..backend import triton_available
    from ._timing import emit, machine_info, time_fn

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    repeats = args.repeats if args.repeats is not None else (20 if on_cuda else 3)
    run_triton = on_cuda and triton_available()
    notes = []
    if not run_triton:
        notes.append("Triton path not timed: no CUDA device (the TRITON_INTERPRET path measures nothing useful)")
    if args.peak_tflops is None:
        notes.append("no --peak-tflops given: no distance to the symmetric-FLOP floor reported")

    def twin(G):
        return reference.orthogonalize(G, args.steps, args.coefficients, 1e-7, None, dtype)

    results = []
    for (m, n), batch in _cases(args, on_cuda):
        G = torch.randn(batch, m, n, device=device, dtype=dtype)
        if batch == 1:
            G = G[0]
        timing = dict(device=device, warmup=warmup, repeats=repeats)
        eager = time_fn(lambda: twin(G), **timing)["median_s"]
        compiled = None
        if not args.no_compile:
            torch._dynamo.reset()  # one graph per case; avoids hitting the recompile limit
            compiled_twin = torch.compile(twin)
            compiled_twin(G)  # compile outside the timed region even with --warmup 0
            compiled = time_fn(lambda: compiled_twin(G), **timing)["median_s"]
        triton_s = None
        if run_triton:
            from ..kernels import newton_schulz

            out = torch.empty_like(G)
            kernel = lambda: newton_schulz.orthogonalize(G, args.steps, args.coefficients, 1e-7, out, dtype)
            kernel()  # autotuning happens on the first call of a shape
            triton_s = time_fn(kernel, **timing)["median_s"]
        dense, symmetric = flop_counts(m, n, batch, args.steps)
        row = {
            "shape": [m, n],
            "batch": batch,
            "eager_s": eager,
            "compiled_s": compiled,
            "triton_s": triton_s,
            "compiled_vs_triton": compiled / triton_s if compiled and triton_s else None,
            "eager_vs_triton": eager / triton_s if triton_s else None,
            "flops_dense": dense,
            "flops_symmetric": symmetric,
            "tflops_dense": {k: dense / v / 1e12 for k, v in (("eager", eager), ("compiled", compiled), ("triton", triton_s)) if v},
            "tflops_symmetric": {k: symmetric / v / 1e12 for k, v in (("eager", eager), ("compiled", compiled), ("triton", triton_s)) if v},
        }
        if args.peak_tflops and triton_s:
            row["triton_vs_symmetric_floor"] = triton_s / (symmetric / (args.peak_tflops * 1e12))
        results.append(row)

    config = {"steps": args.steps, "coefficients": args.coefficients, "dtype": str(dtype).removeprefix("torch."),
              "warmup": warmup, "repeats": repeats, "statistic": "median", "cpu_threads": torch.get_num_threads()}
    emit({"benchmark": "ns", "machine": machine_info(), "config": config, "results": results, "notes": notes},
         args.json, _table)
    return 0
