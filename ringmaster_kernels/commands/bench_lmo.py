"""``ringmaster bench lmo``: norm-ball LMOs and the fused momentum -> LMO -> update step.

For each norm, times ``ops.lmo_step_`` (backend "auto": the Triton kernels on CUDA, the
twin elsewhere), the eager twin (``backend="torch"``) and, where torch has the pieces
(sign, l2), a ``torch._foreach_*`` version, on three parameter lists:

* ``nanochat``: a NanoChat-like GPT (embedding, lm_head, 4 attention + 2 MLP matrices
  per layer; spectral gets the hidden matrices only, as Muon does);
* ``many-small``: 512 small matrices of 28 shapes (launch overhead dominates);
* ``large``: one square matrix (bandwidth dominates); also times ``norms.lmo`` alone.

GB/s and ratios use median times (min also reported). Achieved GB/s counts the bytes a step must move: read g, m, x and write m, x (m is
fp32); for ``norms.lmo``: read G, write the result. The device copy bandwidth
(``dst.copy_(src)``, fp32, >= 256 MiB) is the yardstick for the >= 80% target.
"""
from __future__ import annotations

import argparse
from ._args import nonnegative_int, positive_int

NORMS = ("spectral", "sign", "l2", "l1", "colnorm", "rownorm", "bias_rms")
CASES = ("nanochat", "many-small", "large")
FOREACH = ("sign", "l2")


def _csv(choices):
    def parse(text: str) -> list[str]:
        values = text.split(",")
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {choices}")
        return values

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--norms", type=_csv(NORMS), default=list(NORMS), help="comma-separated norms")
    parser.add_argument("--cases", type=_csv(CASES), default=list(CASES), help="comma-separated parameter lists")
    parser.add_argument("--depth", type=_positive, default=None,
                        help="NanoChat depth; width = 64 * depth (default 12 on CUDA, 4 on CPU)")
    parser.add_argument("--vocab", type=_positive, default=None, help="NanoChat vocabulary (default 65536 CUDA / 8192 CPU)")
    parser.add_argument("--large", type=_positive, default=None, help="side of the large matrix (default 8192 CUDA / 2048 CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="param and grad dtype (momenta are always float32)")
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--warmup", type=nonnegative_int, default=None, help="untimed calls (default 3 CUDA / 1 CPU)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed calls (default 20 CUDA / 3 CPU)")


def nanochat_shapes(depth: int, vocab: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(all matrices, hidden matrices) of a NanoChat-like GPT of this depth."""
    d = 64 * depth
    hidden = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    hidden = hidden * depth
    return [(vocab, d)] + hidden + [(vocab, d)], hidden


def many_small_shapes() -> list[tuple[int, int]]:
    return [(32 * (1 + i % 4), 32 * (1 + i % 7)) for i in range(512)]


def _step_bytes(shapes, x_size: int) -> int:
    numel = sum(m * n for m, n in shapes)
    return numel * (x_size + 2 * x_size + 2 * 4)  # g read; x read+write; fp32 m read+write


def _table(result: dict) -> str:
    lines = [f"machine: {result['machine']}", f"config: {result['config']}",
             f"copy bandwidth: {result['copy_GBps']:.1f} GB/s"]
    lines.append(f"{'case':>10} {'op':>5} {'norm':>9} {'impl':>14} {'median ms':>10} {'min ms':>9} {'GB/s':>8} "
                 f"{'vs twin':>8} {'of copy':>8}")
    for r in result["results"]:
        ratio = f"{r['speedup_vs_twin']:8.2f}"
        lines.append(f"{r['case']:>10} {r['op']:>5} {r['norm']:>9} {r['impl']:>14} {r['median_s'] * 1e3:10.3f} "
                     f"{r['min_s'] * 1e3:9.3f} {r['GBps']:8.2f} {ratio} {r['fraction_of_copy']:8.2f}")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import norms, ops
    from ..backend import resolve_backend
    from ._timing import emit, machine_info, time_fn

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    depth = args.depth or (12 if on_cuda else 4)
    vocab = args.vocab or (65536 if on_cuda else 8192)
    large = args.large or (8192 if on_cuda else 2048)
    timing = dict(device=device, warmup=args.warmup if args.warmup is not None else (3 if on_cuda else 1),
                  repeats=args.repeats if args.repeats is not None else (20 if on_cuda else 3))
    probe = torch.empty(1, device=device)
    ours = f"ours({resolve_backend('auto', probe)})"
    notes = []
    if not on_cuda:
        notes.append("no CUDA device: 'ours' is the torch twin; the Triton kernels and the GPU targets "
                     "(>= 80% of copy bandwidth, >= 3x over the eager twin on many-small) are unmeasured")

    # at least 256 MiB, so caches do not flatter the yardstick
    src = torch.randn(max(large * large, 1 << 26), device=device)
    dst = torch.empty_like(src)
    copy_s = time_fn(lambda: dst.copy_(src), **{**timing, "repeats": max(timing["repeats"], 10)})["median_s"]
    copy_gbps = 2 * src.numel() * 4 / copy_s / 1e9
    del src, dst

    all_shapes, hidden = nanochat_shapes(depth, vocab)
    case_shapes = {"nanochat": all_shapes, "many-small": many_small_shapes(), "large": [(large, large)]}
    results = []

    def record(case, op, norm, impl, timed, nbytes, twin):
        seconds = timed["median_s"]
        gbps = nbytes / seconds / 1e9
        results.append({"case": case, "op": op, "norm": norm, "impl": impl, "median_s": seconds,
                        "min_s": timed["min_s"], "GBps": gbps, "speedup_vs_twin": twin["median_s"] / seconds,
                        "fraction_of_copy": gbps / copy_gbps})
        return timed

    for case in args.cases:
        for norm in args.norms:
            shapes = hidden if (norm == "spectral" and case == "nanochat") else case_shapes[case]
            if norm == "spectral" and case == "large":
                continue  # a single big Newton–Schulz is `ringmaster bench ns`
            gen = torch.Generator(device=device).manual_seed(0)
            xs = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
            gs = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
            ms = [torch.zeros(s, device=device) for s in shapes]
            hyper = dict(norm=norm, lr=0.01, beta=0.95, nesterov=args.nesterov, weight_decay=0.1, radius=1.0)
            nbytes = _step_bytes(shapes, xs[0].element_size())
            twin = time_fn(lambda: ops.lmo_step_(xs, gs, ms, backend="torch", **hyper), **timing)
            record(case, "step", norm, "twin(eager)", twin, nbytes, twin)
            if on_cuda:
                timed = time_fn(lambda: ops.lmo_step_(xs, gs, ms, backend="auto", **hyper), **timing)
                record(case, "step", norm, ours, timed, nbytes, twin)
            if norm in FOREACH and dtype == torch.float32:
                timed = time_fn(lambda: _foreach_step(xs, gs, ms, **hyper), **timing)
                record(case, "step", norm, "torch._foreach", timed, nbytes, twin)
            if case == "large" and norm != "spectral":
                G = gs[0]
                lmo_bytes = 2 * G.numel() * G.element_size()
                twin = time_fn(lambda: norms.lmo(G, norm, backend="torch"), **timing)
                record(case, "lmo", norm, "twin(eager)", twin, lmo_bytes, twin)
                if on_cuda:
                    out = torch.empty_like(G)
                    timed = time_fn(lambda: norms.lmo(G, norm, out=out, backend="auto"), **timing)
                    record(case, "lmo", norm, ours, timed, lmo_bytes, twin)
            del xs, gs, ms
    if dtype != torch.float32:
        notes.append("torch._foreach baseline only timed for float32 params (its ops need one dtype)")

    result = {
        "machine": machine_info(),
        "config": {"depth": depth, "width": 64 * depth, "vocab": vocab, "large": large, "dtype": args.dtype,
                   "nesterov": args.nesterov, "threads": torch.get_num_threads(), **{k: v for k, v in timing.items() if k != "device"}},
        "copy_GBps": copy_gbps,
        "results": results,
        "notes": notes,
    }
    emit(result, args.json, _table)
    return 0


def _foreach_step(xs, gs, ms, *, norm, lr, beta, nesterov, weight_decay, radius):
    """The step written with ``torch._foreach_*`` ops (sign and l2 only: the others
    need per-row/column reductions foreach does not have)."""
    import torch

    torch._foreach_lerp_(ms, gs, 1.0 - beta)
    us = torch._foreach_lerp(gs, ms, beta) if nesterov else ms
    if norm == "sign":
        ds = torch._foreach_sign(us)
    else:
        scale = [torch.where(n == 0, 0.0, 1.0 / n) for n in torch._foreach_norm(us)]
        ds = torch._foreach_mul(us, scale)
    torch._foreach_mul_(xs, 1.0 - lr * weight_decay)
    torch._foreach_add_(xs, ds, alpha=-lr * radius)
