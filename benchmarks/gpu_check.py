"""The one script to run in a short GPU window: what the kernels do on a real card.

    python benchmarks/gpu_check.py                 # on a CUDA machine, about 10 minutes at most
    python benchmarks/gpu_check.py --cpu-smoke     # every phase at tiny sizes on the CPU (CI)

Phases, in order (``--phases`` picks some):

* ``environment``: card, capability, SMs, memory, driver; torch, triton, CUDA versions.
* ``ceilings``: ``copy_`` bandwidth and a dense compute-dtype matmul's FLOP/s, the
  yardsticks the later figures are read against.
* ``correctness``: per shape (NanoChat's 768x768, 768x3072, 3072x768; 4096^2; 8192^2),
  the Triton iteration and its twin against the same iteration in float64 (relative
  Frobenius distance), and ``syrk``'s X X^T: exactly symmetric, and its distance from
  the float64 product.
* ``timings``: per shape, GPU time (CUDA events), wall time and CUDA-graph replay time
  of the Triton iteration (``ns_update="triton"``, the default), the same with
  ``ns_update="cublas"`` (the non-final updates through ``torch.baddbmm``: the row that
  decides that option), the eager twin, the ``torch.compile``'d twin and the
  iteration's matmuls alone through cuBLAS (``bmm`` into preallocated buffers); ratios
  are each baseline over Triton, all measured in this run.
* ``lmo_bandwidth``: the fused LMO step over a d12 list (sign, l2, colnorm) in GB/s, as
  a fraction of ``copy_`` moving the same bytes in the same run.
* ``bench_optim``: ``ringmaster bench optim`` on d12 (ours vs torch.optim.Muon, with
  launches per step).
* ``capturable_step``: Gluon's Muon step on the d12 list: eager, eager with
  ``capturable=True``, and that step captured in a CUDA graph and replayed (GPU and
  wall time per step), with the launches of one warm capturable step.
* ``train``: a short ``ringmaster train`` with 2 workers on one GPU.
* ``cuda_tests``: ``pytest -m cuda`` (given whatever time is left before ``--deadline-s``).

Every phase appends one JSON line to ``$OUT/gpu_check.jsonl`` (``$OUT`` defaults to
``./out``) the moment it ends, with ``ok``, ``seconds`` and ``result`` or ``error``; a
failing phase is recorded and the script goes on, so a run cut short still leaves data.
A phase that would start past ``--deadline-s`` is recorded as skipped.

``--cpu-smoke`` sets ``TRITON_INTERPRET=1`` and runs the same code at tiny sizes in fp32
(the interpreter's bf16 tl.dot is wrong); GPU-only measurements (events, graphs) are
recorded as skipped with the reason. It proves the script runs, not what a GPU does.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("environment", "ceilings", "correctness", "timings", "lmo_bandwidth", "bench_optim", "capturable_step", "train",
          "cuda_tests")


class Check:
    """Sizes and settings of one run: a GPU window or the CPU smoke."""

    def __init__(self, smoke: bool, out_dir: Path, deadline_s: float):
        import torch

        self.smoke = smoke
        self.out_dir = out_dir
        self.start = time.perf_counter()
        self.deadline_s = deadline_s
        self.device = torch.device("cpu" if smoke else "cuda")
        self.compute = torch.float32 if smoke else torch.bfloat16
        self.steps = 5
        if smoke:
            self.ns_shapes = [("nanochat_attn", 3, 24, 24), ("nanochat_mlp_in", 1, 40, 24), ("large", 1, 48, 48)]
            self.compile_shapes = 1  # one torch.compile on a CPU takes seconds
            self.copy_numel, self.matmul_side = 1 << 16, 64
            self.lmo_depth_width = (1, 16)
            self.warmup, self.repeats = 1, 1
        else:
            self.ns_shapes = [("nanochat_attn", 4, 768, 768), ("nanochat_mlp_in", 1, 3072, 768),
                              ("nanochat_mlp_out", 1, 768, 3072), ("square_4096", 1, 4096, 4096),
                              ("square_8192", 1, 8192, 8192)]
            # compiling costs tens of seconds per shape: the NanoChat ones only
            self.compile_shapes = 3
            self.copy_numel, self.matmul_side = 1 << 28, 8192  # 1 GiB of fp32: no cache flatters copy_
            self.lmo_depth_width = (12, 768)
            self.warmup, self.repeats = 2, 20  # the first call on a shape autotunes

    def left_s(self) -> float:
        return self.deadline_s - (time.perf_counter() - self.start)

    def gen(self, seed: int = 0):
        import torch

        return torch.Generator(device="cpu").manual_seed(seed)


# ------------------------------------------------------------------------ timing
def _timed(fn: Callable[[], object], check: Check) -> dict:
    """Per-call wall time (ms) and, on CUDA, GPU time from events around the same calls."""
    import torch

    for _ in range(check.warmup):
        fn()
    on_cuda = check.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(check.repeats):
        fn()
    if on_cuda:
        end.record()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / check.repeats
    return {"wall_ms": wall_ms, "gpu_ms": start.elapsed_time(end) / check.repeats if on_cuda else None}


def _graph_ms(fn: Callable[[], object], check: Check) -> float:
    """GPU ms per replay of ``fn`` captured in a CUDA graph (``fn`` warmed up first)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _timed(graph.replay, check)["gpu_ms"]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------ phases
def environment(check: Check) -> dict:
    import torch
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "torch_cuda": torch.version.cuda, "device": str(check.device), "smoke": check.smoke}
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / 2**30, device_count=torch.cuda.device_count())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
    return info


def ceilings(check: Check) -> dict:
    import torch

    src = torch.randn(check.copy_numel, device=check.device)
    dst = torch.empty_like(src)
    copy = _timed(lambda: dst.copy_(src), check)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    n = check.matmul_side
    a = torch.randn(n, n, device=check.device).to(check.compute)
    b = torch.randn(n, n, device=check.device).to(check.compute)
    mm = _timed(lambda: a @ b, check)
    key = "gpu_ms" if check.device.type == "cuda" else "wall_ms"
    return {"copy": copy, "copy_GBps": nbytes / copy[key] / 1e6, "matmul_side": n, "matmul_dtype": str(check.compute),
            "matmul": mm, "matmul_TFLOPs": 2 * n**3 / mm[key] / 1e9}


def _ns_input(check: Check, batch: int, m: int, n: int):
    import torch

    return torch.randn(batch, m, n, generator=check.gen(m * n + batch)).to(check.device)


def correctness(check: Check) -> dict:
    import torch

    from ringmaster_kernels import ops, reference
    from ringmaster_kernels.kernels import newton_schulz as ns

    rows = {}
    for name, batch, m, n in check.ns_shapes:
        G = _ns_input(check, batch, m, n)
        exact = reference.orthogonalize(G.double(), check.steps, compute_dtype=torch.float64)
        kernel = ops.orthogonalize(G, check.steps, compute_dtype=check.compute, backend="triton")
        twin = ops.orthogonalize(G, check.steps, compute_dtype=check.compute, backend="torch")
        X = (G if m <= n else G.mT).to(check.compute)  # syrk's wide orientation, as the iteration sees it
        gram = torch.empty(batch, X.shape[1], X.shape[1], dtype=check.compute, device=check.device)
        ns.syrk(X, gram, compute_dtype=check.compute)
        gram64 = X.double() @ X.double().mT
        rows[name] = {"shape": [batch, m, n], "kernel_vs_fp64": _rel(kernel, exact), "twin_vs_fp64": _rel(twin, exact),
                      "kernel_vs_twin": _rel(kernel, twin), "finite": bool(torch.isfinite(kernel).all()),
                      "syrk_exactly_symmetric": bool(torch.equal(gram, gram.mT)), "syrk_vs_fp64": _rel(gram, gram64)}
        del G, exact, kernel, twin, X, gram, gram64
    return {"compute": str(check.compute), "steps": check.steps, "shapes": rows}


def timings(check: Check) -> dict:
    import torch

    from ringmaster_kernels import ops, reference

    on_cuda = check.device.type == "cuda"
    rows = {}
    for index, (name, batch, m, n) in enumerate(check.ns_shapes):
        G = _ns_input(check, batch, m, n)
        out = torch.empty_like(G)
        k = min(m, n)
        X = torch.randn(batch, k, max(m, n), device=check.device).to(check.compute)
        A = torch.empty(batch, k, k, device=check.device, dtype=check.compute)
        B, Y = torch.empty_like(A), torch.empty_like(X)

        def cublas():  # the iteration's three products per step, nothing else
            for _ in range(check.steps):
                torch.bmm(X, X.mT, out=A)
                torch.bmm(A, A, out=B)
                torch.bmm(B, X, out=Y)

        contestants = {
            "triton": lambda: ops.orthogonalize(G, check.steps, out=out, compute_dtype=check.compute, backend="triton"),
            "triton_cublas_updates": lambda: ops.orthogonalize(G, check.steps, out=out, compute_dtype=check.compute,
                                                               ns_update="cublas", backend="triton"),
            "twin_eager": lambda: reference.orthogonalize(G, check.steps, out=out, compute_dtype=check.compute),
            "cublas_matmuls": cublas,
        }
        if index < check.compile_shapes:
            compiled = torch.compile(reference.orthogonalize)
            contestants["twin_compiled"] = lambda: compiled(G, check.steps, out=out, compute_dtype=check.compute)
        row = {"shape": [batch, m, n]}
        for label, fn in contestants.items():
            try:
                entry = _timed(fn, check)
                entry["graph_ms"] = _graph_ms(fn, check) if on_cuda else None
            except Exception as exc:  # one contestant failing (e.g. capture) must not hide the others
                entry = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            row[label] = entry
        key = "gpu_ms" if on_cuda else "wall_ms"
        base = row["triton"].get(key)
        row["ratios_over_triton"] = {label: row[label][key] / base for label in contestants
                                     if label != "triton" and base and row[label].get(key)}
        rows[name] = row
        del G, out, X, A, B, Y
    notes = [] if on_cuda else ["CPU smoke: no CUDA events or graphs; the interpreter's times mean nothing"]
    return {"compute": str(check.compute), "steps": check.steps, "shapes": rows, "notes": notes}


def lmo_bandwidth(check: Check) -> dict:
    import torch

    from ringmaster_kernels import ops
    from ringmaster_kernels.commands.bench_lmo import _step_bytes
    from ringmaster_kernels.commands.bench_optim import hidden_shapes

    shapes = hidden_shapes(*check.lmo_depth_width)
    gen = check.gen(7)
    dtype = torch.float32 if check.smoke else torch.bfloat16
    xs = [torch.randn(s, generator=gen).to(check.device, dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(check.device, dtype) for s in shapes]
    ms = [torch.zeros(s, device=check.device) for s in shapes]
    nbytes = _step_bytes(shapes, xs[0].element_size())
    src = torch.empty(nbytes // 8, device=check.device)  # copy_ moving the same bytes (read + write)
    dst = torch.empty_like(src)
    key = "gpu_ms" if check.device.type == "cuda" else "wall_ms"
    copy_ms = _timed(lambda: dst.copy_(src), check)[key]
    rows = {}
    for norm in ("sign", "l2", "colnorm"):
        timed = _timed(lambda: ops.lmo_step_(xs, gs, ms, norm=norm, lr=0.01, beta=0.95, weight_decay=0.1,
                                             backend="triton"), check)
        rows[norm] = {**timed, "GBps": nbytes / timed[key] / 1e6, "fraction_of_copy": copy_ms / timed[key]}
    return {"params": str(dtype), "matrices": len(shapes), "bytes_per_step": nbytes,
            "copy_GBps": nbytes / copy_ms / 1e6, "norms": rows}


def _cli(argv: list[str]) -> dict:
    """Run a ``ringmaster`` command in this process; return its JSON output."""
    from ringmaster_kernels.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"ringmaster {' '.join(argv)} exited with {code}")
    return json.loads(buffer.getvalue())


def bench_optim(check: Check) -> dict:
    if check.smoke:
        argv = ["--model", "tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--threads", "1"]
    else:
        argv = ["--model", "d12", "--device", "cuda", "--warmup", "3", "--repeats", "10", "--rounds", "3"]
    # the compiled twin is left out: compiling a 72-matrix step costs minutes of the window
    return _cli(["bench", "optim", "--json", "--no-compile", *argv])


def capturable_step(check: Check) -> dict:
    import torch

    from ringmaster_kernels.commands.bench_optim import HYPER, _tensors, hidden_shapes
    from ringmaster_kernels.kernels.launches import count_launches
    from ringmaster_kernels.optim import Gluon

    shapes = hidden_shapes(*check.lmo_depth_width)
    dtype = torch.float32 if check.smoke else torch.bfloat16
    on_cuda = check.device.type == "cuda"
    rows = {}
    for label, options in (("eager", {}), ("capturable", dict(capturable=True, nonfinite="ignore"))):
        opt = Gluon(_tensors(shapes, check.device, dtype), lr=HYPER["lr"], momentum=HYPER["momentum"],
                    weight_decay=HYPER["weight_decay"], norm_options={"scale": "muon"}, backend="triton", **options)
        rows[label] = _timed(opt.step, check)
        if options:
            with count_launches() as counts:
                opt.step()
            rows[label]["launches"] = counts.summary()
            try:
                rows["graph_replay_gpu_ms"] = _graph_ms(opt.step, check) if on_cuda else None
            except Exception as exc:  # a capture failure is the finding; the eager rows stay
                rows["graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
        del opt
    notes = [] if on_cuda else ["CPU smoke: no CUDA graph; the interpreter's times mean nothing"]
    return {"params": str(dtype), "matrices": len(shapes), "steps": rows, "notes": notes}


def train(check: Check) -> dict:
    out = check.out_dir / "train"
    if check.smoke:
        argv = ["--device", "cpu", "--time", "1", "--d-model", "16", "--layers", "1", "--heads", "2", "--seq-len", "16",
                "--batch-size", "4", "--corpus-bytes", "100000", "--tau", "0.01"]
    else:
        argv = ["--device", "cuda", "--time", "20"]
    return _cli(["train", "--json", "--workers", "2", "--out", str(out), "--eval-every", "100", "--log-every", "100",
                 *argv])


def cuda_tests(check: Check) -> dict:
    files = ["tests/test_launches.py"] if check.smoke else ["tests"]
    timeout = max(check.left_s(), 10.0)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-4000:]
        return {"timed_out_after_s": timeout, "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    counts = {word: int(num) for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", done.stdout)}
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest exited with {done.returncode}: {counts}\n{done.stdout[-4000:]}")
    return {"returncode": done.returncode, "counts": counts, "tail": done.stdout[-2000:]}


# ------------------------------------------------------------------------ driver
def run_phase(name: str, fn: Callable[[Check], dict], check: Check, sink) -> dict:
    """Run one phase, append its JSON line (result or error) and return it."""
    record = {"phase": name, "started_s": round(time.perf_counter() - check.start, 3)}
    if check.left_s() <= 0:
        record.update(ok=False, skipped="deadline passed before this phase")
    else:
        t0 = time.perf_counter()
        try:
            record.update(ok=True, result=fn(check))
        except Exception as exc:
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc()[-4000:])
        record["seconds"] = round(time.perf_counter() - t0, 3)
        if check.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # hand this phase's memory to the next
    sink.write(json.dumps(record, default=str) + "\n")
    sink.flush()
    print(f"[gpu_check] {name}: {'ok' if record['ok'] else record.get('skipped') or record['error'][:200]}"
          f" ({record.get('seconds', 0):.1f} s)", file=sys.stderr, flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every phase at tiny sizes on the CPU (interpreter)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--deadline-s", type=float, default=540.0,
                        help="start no phase after this many seconds (cuda_tests gets what is left)")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown {unknown}; known: {', '.join(PHASES)}")
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu-smoke for the CPU rehearsal")
    out_dir = Path(os.environ.get("OUT") or "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(args.cpu_smoke, out_dir, args.deadline_s)
    failed = 0
    with open(out_dir / "gpu_check.jsonl", "a") as sink:
        for name in phases:
            failed += not run_phase(name, globals()[name], check, sink)["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
