"""Every Triton launch runs on its tensors' device and is seen by the launch counter."""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import HAS_CUDA, KERNEL_DEVICE
from ringmaster_kernels import ops
from ringmaster_kernels.kernels import launches
from ringmaster_kernels.kernels import lmo as lmo_kernels
from ringmaster_kernels.kernels import newton_schulz as ns

HYPER = dict(lr=0.05, beta=0.9, weight_decay=0.1)


def test_guard_makes_a_cuda_tensors_device_current():
    guard = launches.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launches.device_guard(torch.device("cpu")), contextlib.nullcontext)


class _Recorder:
    """Stands in for the guard and for the kernels: each kernel call notes which device
    was made current around it (None: launched outside any guard)."""

    def __init__(self):
        self.current: list[torch.device] = []
        self.calls: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def guard(self, device):
        self.current.append(device)
        try:
            yield
        finally:
            self.current.pop()

    def kernel(self, name):
        recorder = self

        class Fake:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.calls.append((name, recorder.current[-1] if recorder.current else None))

        return Fake()


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(launches, "device_guard", rec.guard)
    monkeypatch.setattr(lmo_kernels, "device_guard", rec.guard)
    for module in (ns, lmo_kernels):
        for name in ("_syrk_kernel", "_update_kernel", "_stats_kernel", "_sumsq_kernel", "_inverse_norm_kernel"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, rec.kernel(f"{module.__name__}.{name}"))
    return rec


def test_newton_schulz_launches_inside_the_tensors_device_guard(recorder):
    G = torch.randn(2, 20, 36)
    ops.orthogonalize(G, steps=2, backend="triton")
    names = [name for name, _ in recorder.calls]
    norm = [f"{ns.__name__}.{k}" for k in ("_sumsq_kernel", "_inverse_norm_kernel")]
    assert names == norm + [f"{ns.__name__}.{k}" for k in ("_syrk_kernel", "_syrk_kernel", "_update_kernel")] * 2
    assert all(device == G.device for _, device in recorder.calls)


@pytest.mark.parametrize("norm", ["sign", "l2", "spectral"])
def test_lmo_step_launches_inside_the_tensors_device_guard(recorder, norm):
    xs = [torch.randn(20, 36), torch.randn(20, 36)]
    ops.lmo_step_(xs, [torch.randn_like(x) for x in xs], [torch.zeros_like(x) for x in xs], norm=norm,
                  backend="triton", **HYPER)
    kernels = {name.rsplit(".", 1)[-1] for name, _ in recorder.calls}
    assert "_update_kernel" in kernels and (norm != "spectral" or "_syrk_kernel" in kernels)
    assert recorder.calls and all(device == xs[0].device for _, device in recorder.calls)


@pytest.mark.cuda
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_second_gpu_while_the_first_is_current():
    with torch.cuda.device(0):
        G = torch.randn(2, 64, 96, device="cuda:1")
        # kernel and twin both iterate in bf16 (the CUDA default): bf16's tolerance
        torch.testing.assert_close(ops.orthogonalize(G, backend="triton"), ops.orthogonalize(G, backend="torch"),
                                   rtol=6e-2, atol=6e-2)
        xs = [torch.randn(64, 96, device="cuda:1")]
        xr = [xs[0].clone()]
        g, m, mr = torch.randn_like(xs[0]), torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
        ops.lmo_step_(xs, [g], [m], norm="l2", backend="triton", radius=1.0, **HYPER)
        ops.lmo_step_(xr, [g], [mr], norm="l2", backend="torch", radius=1.0, **HYPER)
        torch.testing.assert_close(xs[0], xr[0], rtol=1e-5, atol=1e-5)  # fp32 math on both sides


# ------------------------------------------------------------------- the counter
def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(KERNEL_DEVICE)


def test_counter_sees_three_launches_per_newton_schulz_step():
    G = _randn(3, 20, 36)
    with launches.count_launches() as counts:
        ops.orthogonalize(G, steps=4, backend="triton")
    # three per step, plus two for the Frobenius normalization (partial sums, inverse);
    # no torch kernel is left (the interpreter's own copies inside a launch are not counted)
    assert counts.triton == {"_syrk_kernel": 8, "_update_kernel": 4, "_sumsq_kernel": 1, "_inverse_norm_kernel": 1}
    assert sum(counts.torch.values()) == 0
    assert counts.summary()["triton"] == 14


def test_counter_counts_chunked_launches(monkeypatch):
    monkeypatch.setattr(ns, "_MAX_GRID_Y", 2)  # 5 matrices -> 3 launches per kernel call
    with launches.count_launches() as counts:
        ops.orthogonalize(_randn(5, 16, 20), steps=1, backend="triton")
    assert counts.triton == {"_syrk_kernel": 6, "_update_kernel": 3, "_sumsq_kernel": 3, "_inverse_norm_kernel": 3}


def test_counter_sees_nothing_outside_its_block_and_does_not_nest():
    with launches.count_launches() as counts:
        with pytest.raises(RuntimeError, match="nest"):
            with launches.count_launches():
                pass
    ops.orthogonalize(_randn(20, 36), steps=1, backend="triton")
    assert not counts.triton and not counts.torch


def test_a_warm_step_reuses_its_address_table_and_new_tensors_get_their_own():
    def tensors(seed):
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(20, 36, generator=g).to(KERNEL_DEVICE) for _ in range(3)]
        return xs, [torch.randn(x.shape, generator=g).to(KERNEL_DEVICE) for x in xs], [torch.zeros_like(x) for x in xs]

    xs, gs, ms = tensors(0)
    ops.lmo_step_(xs, gs, ms, norm="l2", backend="triton", **HYPER)  # builds and keeps the table
    with launches.count_launches() as counts:
        ops.lmo_step_(xs, gs, ms, norm="l2", backend="triton", **HYPER)
    assert counts.triton == {"_stats_kernel": 1, "_update_kernel": 1}
    assert "cat" not in counts.torch  # no table built, nothing uploaded
    # other tensors of the same shapes: their own table, and the twin's result
    ys, hs, ns_ = tensors(1)
    ref = [y.clone() for y in ys], [h.clone() for h in hs], [m.clone() for m in ns_]
    ops.lmo_step_(ys, hs, ns_, norm="l2", backend="triton", **HYPER)
    ops.lmo_step_(*ref, norm="l2", backend="torch", **HYPER)
    for got, want in zip(ys + ns_, ref[0] + ref[2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- the chosen autotune config, launched directly
def test_an_autotuned_kernel_skips_the_autotuners_wrapper_once_its_key_is_known(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    wrapper_calls, meta = [], []
    run = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: (wrapper_calls.append(self.fn.__name__), run(self, *a, **k))[1])
    jit_run = ns._syrk_kernel.fn.run
    monkeypatch.setattr(ns._syrk_kernel.fn, "run", lambda *a, **k: (meta.append(k), jit_run(*a, **k))[1])
    launches.chosen_configs.clear()
    G = _randn(2, 20, 36)
    cold = ops.orthogonalize(G, steps=2, backend="triton")
    assert sorted(set(wrapper_calls)) == ["_syrk_kernel", "_update_kernel"]  # each key's first launch
    wrapper_calls.clear(), meta.clear()
    direct = launches.chosen_configs.direct
    warm = ops.orthogonalize(G, steps=2, backend="triton")
    assert wrapper_calls == [] and launches.chosen_configs.direct - direct == 6  # 4 syrk + 2 update
    assert torch.equal(cold, warm)
    config = ns._syrk_kernel.configs[0] if len(ns._syrk_kernel.configs) == 1 else None
    for k in meta:  # the config's meta-parameters and launch options reach the JIT function
        assert {"BLOCK", "BLOCK_K", "num_warps", "num_stages"} <= set(k)
        if config is not None:
            assert k["BLOCK"] == config.kwargs["BLOCK"] and k["num_warps"] == config.num_warps
    # another shape is another key: the autotuner's wrapper sees it first
    ops.orthogonalize(_randn(2, 24, 36), steps=1, backend="triton")
    assert "_syrk_kernel" in wrapper_calls


def test_the_direct_launch_key_is_never_coarser_than_the_autotuners():
    tuner = ns._update_kernel
    args = tuple(range(len(tuner.arg_names)))
    key = launches.chosen_configs._key
    base = key(tuner, args, {"HAS_BETA": False})
    moved = list(args)
    moved[tuner.arg_names.index("stride_xm")] = 99  # a key argument
    assert key(tuner, tuple(moved), {"HAS_BETA": False}) != base
    assert key(tuner, args, {"HAS_BETA": True}) != base  # every constexpr flag
    with_tensor = (torch.empty(1, dtype=torch.float16),) + args[1:]
    assert key(tuner, with_tensor, {"HAS_BETA": False}) != key(
        tuner, (torch.empty(1, dtype=torch.float32),) + args[1:], {"HAS_BETA": False})  # dtypes


# ------------------------------------------- persistent direction buffers: a warm step builds nothing
@pytest.mark.parametrize("norm", ["spectral", "l1"])
def test_a_warm_direction_step_allocates_no_buffer_and_builds_no_table(norm):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(*s, generator=g).to(KERNEL_DEVICE) for s in ((20, 36), (20, 36), (16, 24))]
    ms = [torch.zeros_like(x) for x in xs]
    step = lambda grads: ops.lmo_step_(xs, grads, ms, norm=norm, backend="triton", **HYPER)
    step([torch.randn(x.shape, generator=g).to(KERNEL_DEVICE) for x in xs])
    gs = [torch.randn(x.shape, generator=g).to(KERNEL_DEVICE) for x in xs]
    step(gs)  # these gradients' table is built here
    builds, made = lmo_kernels._address_tables.builds, lmo_kernels._direction_buffers.allocations
    want = [x.clone() for x in xs], [m.clone() for m in ms]
    ops.lmo_step_(*want[:1], gs, want[1], norm=norm, backend="torch", **HYPER)
    with launches.count_launches() as counts:
        step(gs)
    assert lmo_kernels._address_tables.builds == builds and lmo_kernels._direction_buffers.allocations == made
    assert "cat" not in counts.torch  # no table built, nothing uploaded
    for got, exp in zip(xs + ms, want[0] + want[1]):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


def test_direction_buffers_are_dropped_with_their_parameters():
    cache = lmo_kernels._DirectionBuffers(maxsize=8)
    xs = [torch.randn(4, 6), torch.randn(4, 6)]
    first = cache.get(xs, [torch.Size((4, 6))], torch.float32)
    assert first[0].shape == (2, 4, 6) and cache.get(xs, [torch.Size((4, 6))], torch.float32) is first
    assert cache.get(xs, [torch.Size((4, 6))], torch.bfloat16) is not first  # per dtype
    del xs
    ys = [torch.randn(3, 5)]
    cache.get(ys, [torch.Size((3, 5))], torch.float32)  # a miss sweeps the entries of freed parameters
    assert len(cache._entries) == 1


def test_launch_overhead_benchmark_runs_without_a_gpu():
    """benchmarks/bench_launch_overhead.py times both launch paths with the JIT run stubbed
    (no assertion on the times: only that every variant of a two-step iteration is there)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_launch_overhead.py"),
                          "--repeats", "1", "--json"], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) == 5  # syrk: scaled first, plain, with Y; update: scaled first, accumulating last
    assert all(set(r) == {"autotuner_us", "direct_us", "floor_us"} and min(r.values()) > 0 for r in rows.values())
