"""``ringmaster inspect sm90``: the kernels' H100 machine code, read without a GPU.

Every kernel variant the ops launch is found by running the real host code
(``newton_schulz.orthogonalize`` and the LMO entry points) on CPU tensors with the launch
replaced by a recorder, so the arguments, and with them the runtime's specialisation
(stride-1 arguments as constexprs, 16-byte alignment facts), are those a launch would
have. Each variant is compiled for ``GPUTarget("cuda", 90, 32)`` with every autotune
config the autotuner keeps for that shape (its early prune applied), by Triton's own
binder and ``triton.compile``; then read:

* registers, stack frame and spill bytes from the bundled ``ptxas -v`` log;
* shared memory from the compiled kernel's metadata;
* in the SASS (bundled ``cuobjdump``): 128-bit global loads (``LDG.E...128``), async
  copies (``LDGSTS``) and TMA loads (``UTMALDG``), and wgmma instructions (``HGMMA``);
* in the TTGIR: whether the main loop keeps an MMA in flight, i.e. every
  ``warp_group_dot_wait`` inside the ``scf.for`` that issues the wgmma waits with
  ``pendings >= 1``.

``--fast`` is the CI subset: bf16, one NanoChat shape per kernel family.
"""
from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys

from ._args import positive_int

# The limit an sm_90 block may use (227 KB of opt-in shared memory per block).
SM90_SHARED_BYTES = 232448
NANOCHAT = [(768, 768, 4), (768, 3072, 1), (3072, 768, 1)]  # (m, n, batch): q/k/v/o, MLP out, MLP in
LARGE = [(4096, 4096, 1), (8192, 8192, 1)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["sm90"], help="the GPU architecture to compile for")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--fast", action="store_true", help="the CI subset: bf16, one shape, fewer variants")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="compute dtypes of Newton–Schulz and the LMO params")
    parser.add_argument("--kernels", default="ns,lmo", help="comma-separated kernel families: ns, lmo")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="compiles in parallel (processes)")


# ------------------------------------------------------------------ finding variants
class _Recorder:
    """Replaces ``launch`` in the kernel modules: keeps each call's kernel and arguments."""

    def __init__(self):
        self.calls: list[tuple[object, tuple, dict, dict]] = []
        self.context: dict = {}

    def __call__(self, kernel, grid, device, *args, **kwargs):
        self.calls.append((kernel, args, kwargs, dict(self.context)))


def _record_launches(families: list[str], dtypes: list, fast: bool) -> list[tuple[object, tuple, dict, dict]]:
    import torch

    from .. import catalogue
    from ..kernels import lmo as lmo_kernels
    from ..kernels import newton_schulz as ns

    recorder = _Recorder()
    saved = ns.launch, lmo_kernels.launch
    ns.launch = lmo_kernels.launch = recorder
    try:
        if "ns" in families:
            shapes = NANOCHAT[1:2] if fast else NANOCHAT + LARGE
            for compute in dtypes:
                for m, n, batch in shapes:
                    recorder.context = {"shape": f"{batch}x{m}x{n}", "dtype": str(compute).replace("torch.", "")}
                    G = torch.empty(batch, m, n, dtype=compute)
                    # 3 steps: the scaled first iteration, a plain one, the accumulating last;
                    # --fast: one step, both at once (the first iteration is the last)
                    for hyper in ((-0.1, 0.9), (torch.tensor(-0.1), torch.tensor(0.9))):  # numbers; capturable
                        ns.orthogonalize(G, steps=1 if fast else 3, out=torch.empty_like(G), compute_dtype=compute,
                                         scale=hyper[0], beta=hyper[1])
        if "lmo" in families:
            # NanoChat lists (every row a multiple of 8: the ALIGNED variants); the full run
            # adds a ragged list for the unaligned ones
            lists = {"nanochat": [(768, 768), (768, 3072)]}
            if not fast:
                lists = {"nanochat": [(768, 768), (3072, 768), (768, 3072), (65536, 768)], "ragged": [(33, 17), (5, 7)]}
            norms = ["sign", "l2", "colnorm", "spectral"] if fast else ["sign", "l2", "rownorm", "colnorm", "spectral", "l1"]
            for (label, shapes), dtype, name in itertools.product(lists.items(), dtypes, norms):
                spec = catalogue.get(name)
                recorder.context = {"shape": label, "dtype": str(dtype).replace("torch.", ""), "norm": name}
                xs = [torch.empty(s, dtype=dtype) for s in shapes]
                # numbers, without and with Nesterov; and a capturable step's device tensors
                for nesterov, hyper in ((False, (0.01, 0.9, 0.1)), (True, (0.01, 0.9, 0.1)),
                                        (True, tuple(map(torch.tensor, (0.01, 0.9, 0.1))))):
                    lmo_kernels.lmo_step_(xs, [torch.empty_like(x) for x in xs],
                                          [torch.empty(x.shape, dtype=torch.float32) for x in xs], spec,
                                          lr=hyper[0], beta=hyper[1], nesterov=nesterov, weight_decay=hyper[2],
                                          radius=1.0, direction=lambda buf: None)
                if spec.mode != "direction":
                    lmo_kernels.lmo(xs[0], spec, 1.0)
    finally:
        ns.launch, lmo_kernels.launch = saved
    return recorder.calls


def _config_label(config) -> str:
    names = {"BLOCK": "B", "BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G"}
    parts = [f"{names.get(k, k)}{v}" for k, v in config.kwargs.items() if k != "GROUP_M"]
    return " ".join(parts + [f"w{config.num_warps}", f"s{config.num_stages}"])


_FLAGS = ("HAS_Y", "HAS_SCALE", "SCALE_ON_LOAD", "HAS_BETA", "MOMENTUM", "NESTEROV", "WRITE_U", "REDUCE", "SOURCE", "SIGN", "HAS_X",
          "ALIGNED", "HYPER_ON_DEVICE")


def _jobs(calls) -> list[dict]:
    """One compile job per (variant, config): signature, constexprs, attrs and options as
    Triton's binder derives them from the recorded arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    jobs: dict[str, dict] = {}
    for kernel, args, kwargs, context in calls:
        tuner = kernel if isinstance(kernel, triton.runtime.Autotuner) else None
        jit = tuner.fn if tuner else kernel
        if tuner:
            named = dict(zip(jit.arg_names, args))
            named.update(kwargs)
            # the autotuner's own prune, on the arguments it would see
            configs = tuner.early_config_prune(tuner.configs, named) if tuner.early_config_prune else tuner.configs
        else:
            configs = [triton.Config({}, num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))]
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        for config in configs:
            kw = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            bound, specialization, options = binder(*args, **kw)
            options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, specialization, options)
            key = (f"{jit.__name__}|{sorted(signature.items())}|{sorted(map(str, constexprs.items()))}|{attrs}"
                   f"|{config.num_warps}|{config.num_stages}")
            if key in jobs:
                jobs[key]["contexts"].append(context)
                continue
            flags = {k: bound[k] for k in _FLAGS if k in bound}
            stride_one = [k for k, v in signature.items() if v == "constexpr" and k.startswith("stride")]
            # Newton–Schulz: the compute dtype; LMO kernels: the gradient's
            dtype = str(bound.get("COMPUTE", signature.get("G0", ""))).replace("triton.language.", "").lstrip("*")
            jobs[key] = {"module": jit.__module__, "kernel": jit.__name__, "family": jit.__module__.rsplit(".", 1)[-1],
                         "variant": " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in flags.items()),
                         "dtype": dtype, "stride_one": stride_one, "config": _config_label(config),
                         "signature": signature, "constexprs": constexprs, "attrs": attrs,
                         "options": options.__dict__, "contexts": [context]}
    return list(jobs.values())


# ------------------------------------------------------------------ compiling and reading
def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _loop_wait_pendings(ttgir: str) -> list[int] | None:
    """``pendings`` of each ``warp_group_dot_wait`` inside an ``scf.for`` that issues a
    ``warp_group_dot``; None when no loop issues one."""
    import re

    lines = ttgir.splitlines()
    found = None
    for start, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, body = 0, []
        for inner in lines[start:]:
            depth += inner.count("{") - inner.count("}")
            body.append(inner)
            if depth <= 0:
                break
        text = "\n".join(body[1:])
        if "ttng.warp_group_dot " in text:
            found = (found or []) + [int(p) for p in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", text)]
    return found


def _compile(job: dict) -> dict:
    """Compile one job for sm_90 and read its resources and instruction counts."""
    import contextlib
    import importlib
    import io
    import re
    import tempfile
    import time

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    row = {k: job[k] for k in ("family", "kernel", "variant", "dtype", "config", "stride_one")}
    row["used_by"] = sorted({" ".join(f"{v}" for v in c.values()) for c in job["contexts"]})
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job["signature"], job["constexprs"], job["attrs"]),
                                      target=GPUTarget("cuda", 90, 32), options=job["options"])
    except Exception as exc:  # a config that fails to compile (e.g. out of shared memory) is a finding
        row.update(compiled=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()

    def grab(pattern):
        found = re.search(pattern, text)
        return int(found.group(1)) if found else None

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)
    pendings = _loop_wait_pendings(compiled.asm["ttgir"])
    row.update(
        compiled=True, registers=grab(r"Used (\d+) registers"), stack=grab(r"(\d+) bytes stack frame"),
        spill_stores=grab(r"(\d+) bytes spill stores"), spill_loads=grab(r"(\d+) bytes spill loads"),
        shared=compiled.metadata.shared,
        ldg128=sum(op.startswith("LDG.") and op.endswith(".128") for op in ops),
        ldg=sum(op.startswith("LDG.") for op in ops),
        ldgsts=sum(op.startswith("LDGSTS") for op in ops), tma=sum(op.startswith("UTMALDG") for op in ops),
        hgmma=sum(op.startswith("HGMMA") for op in ops),
        mma_in_flight=None if pendings is None else bool(pendings) and min(pendings) >= 1,
    )
    return row


def inspect(families: list[str], dtypes: list, fast: bool, jobs: int = 1) -> list[dict]:
    """Rows of :func:`_compile` for every variant x config; needs TRITON_INTERPRET unset."""
    import tempfile

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("inspect compiles for a GPU: run it without TRITON_INTERPRET=1")
    work = _jobs(_record_launches(families, dtypes, fast))
    with tempfile.TemporaryDirectory() as cache:
        # a fresh cache, so every compile runs ptxas and its log can be read
        os.environ["TRITON_CACHE_DIR"] = cache
        if jobs <= 1:
            return [_compile(j) for j in work]
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return pool.map(_compile, work, chunksize=1)


def _table(result: dict) -> str:
    head = (f"{'kernel':<22} {'variant':<44} {'dtype':<9} {'config':<22} {'regs':>4} {'spill':>5} {'stack':>5} "
            f"{'shared':>7} {'ldg128':>6} {'ldg':>4} {'async':>5} {'tma':>3} {'wgmma':>5} {'in-flight':>9}")
    lines = [f"sm_90 machine code ({result['seconds']:.0f} s to compile {len(result['rows'])} kernels)", head]
    for r in result["rows"]:
        name = f"{r['family']}.{r['kernel']}"
        if not r["compiled"]:
            lines.append(f"{name:<22} {r['variant']:<44} {r['dtype']:<9} {r['config']:<22} {r['error']}")
            continue
        lines.append(f"{name:<22} {r['variant']:<44} {r['dtype']:<9} {r['config']:<22} {r['registers']:>4} "
                     f"{r['spill_stores']:>5} {r['stack']:>5} {r['shared']:>7} {r['ldg128']:>6} {r['ldg']:>4} "
                     f"{r['ldgsts']:>5} {r['tma']:>3} {r['hgmma']:>5} {str(r['mma_in_flight']):>9}")
    return "\n".join(lines)


def check(args: argparse.Namespace) -> None:
    """--kernels and --dtypes name known things (before the minutes of compiling)."""
    families = [f for f in args.kernels.split(",") if f]
    if not families or set(families) - {"ns", "lmo"}:
        raise ValueError(f"--kernels: unknown {sorted(set(families) - {'ns', 'lmo'}) or families}; known: ns, lmo")
    names = [d for d in args.dtypes.split(",") if d]
    if not names or set(names) - {"bfloat16", "float16", "float32"}:
        raise ValueError(f"--dtypes: choose from bfloat16, float16, float32, got {names}")


def run(args: argparse.Namespace) -> int:
    import time

    from ._timing import emit

    if os.environ.get("TRITON_INTERPRET") == "1":
        # triton.jit decides at import whether it interprets: compile in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = ["inspect", args.target, "--dtypes", args.dtypes, "--kernels", args.kernels, "--jobs", str(args.jobs)]
        argv += ["--json"] * args.json + ["--fast"] * args.fast
        return subprocess.run([sys.executable, "-m", "ringmaster_kernels.cli", *argv], env=env).returncode
    import torch

    families = [f for f in args.kernels.split(",") if f]
    names = ["bfloat16"] if args.fast else [d for d in args.dtypes.split(",") if d]
    t0 = time.perf_counter()
    rows = inspect(families, [getattr(torch, n) for n in names], args.fast, max(1, args.jobs))
    result = {"target": "sm_90", "shared_limit": SM90_SHARED_BYTES, "fast": args.fast,
              "seconds": time.perf_counter() - t0, "rows": rows}
    emit(result, args.json, _table)
    return 0
