"""Host cost of launching an autotuned kernel: ``triton.autotune``'s wrapper vs the direct launch.

Runs without a GPU. The real Newton–Schulz host code is run on CPU tensors with the launch
recorded (as ``ringmaster inspect sm90`` does), giving each launch's real arguments; then
the JIT function's own ``run`` (argument binding, the compiled-kernel lookup and the
driver call: the same for both paths) is replaced by a no-op, the autotuner's cache is
primed with its first config, and each path is timed on those arguments:

- ``autotuner``: ``kernel[grid](*args, **kwargs)``, what every launch did before;
- ``direct``: ``launches.chosen_configs.run``, what a warm launch does now;
- ``floor``: the bare ``kernel.fn[grid](*args, **kwargs, **config)`` call both end in.

What this leaves out, so it is the difference between the two wrappers and not a launch
time: ``JITFunction.run`` itself (on a GPU several microseconds per launch, unmeasured
here) and the driver.

    python benchmarks/bench_launch_overhead.py [--repeats N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real autotuner configs and JIT functions

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _record():
    import torch

    from ringmaster_kernels.kernels import newton_schulz as ns

    calls = []
    saved = ns.launch
    ns.launch = lambda kernel, grid, device, *args, **kwargs: calls.append((kernel, grid, args, kwargs))
    try:
        G = torch.empty(8, 768, 3072, dtype=torch.bfloat16)  # a NanoChat d12 MLP group
        ns.orthogonalize(G, steps=2, out=torch.empty_like(G), compute_dtype=torch.bfloat16)
    finally:
        ns.launch = saved
    return calls


def _autotuner_key(tuner, args, kwargs):
    """The key ``Autotuner.run`` computes (triton 3.9), to prime its cache."""
    nargs = dict(zip(tuner.arg_names, args))
    all_args = {**nargs, **kwargs}
    named = {k: v for k, v in all_args.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def _time(fn, repeats: int) -> float:
    """Median microseconds per call over ``repeats`` batches of 1000 calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(1000):
            fn()
        samples.append((time.perf_counter() - start) * 1e3)  # ms per 1000 = us per call
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from triton.runtime.autotuner import Autotuner

    from ringmaster_kernels.kernels import launches

    rows = {}
    for kernel, grid, call_args, kwargs in _record():
        if not isinstance(kernel, Autotuner):
            continue
        name = " ".join([kernel.fn.__name__] + [f"{k}={int(v)}" for k, v in kwargs.items() if k.startswith("HAS_")])
        if name in rows:
            continue
        config = kernel.configs[0]
        kernel.cache[_autotuner_key(kernel, call_args, kwargs)] = config
        kernel.fn.run = lambda *a, **k: None  # an instance attribute: the class's run is untouched
        launches.chosen_configs.run(kernel, grid, call_args, kwargs)  # primes the direct path
        meta = config.all_kwargs()
        rows[name] = {
            "autotuner_us": _time(lambda: kernel[grid](*call_args, **kwargs), args.repeats),
            "direct_us": _time(lambda: launches.chosen_configs.run(kernel, grid, call_args, kwargs), args.repeats),
            "floor_us": _time(lambda: kernel.fn[grid](*call_args, **kwargs, **meta), args.repeats),
        }
        del kernel.fn.run
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'kernel':50} {'autotuner us':>12} {'direct us':>10} {'floor us':>9}")
        for name, row in rows.items():
            print(f"{name:50} {row['autotuner_us']:12.2f} {row['direct_us']:10.2f} {row['floor_us']:9.2f}")
    return rows


if __name__ == "__main__":
    main()
