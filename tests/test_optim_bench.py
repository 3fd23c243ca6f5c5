"""Smoke test of ``ringmaster bench optim``: it runs, reports every contestant, sane ratios,
and rows that claim the same math as torch.optim.Muon land as close to float64 as it does."""
import json

import pytest
import torch

from ringmaster_kernels.cli import main
from ringmaster_kernels.commands.bench_optim import hidden_shapes, launch_counts


def test_nanochat_like_shapes():
    shapes = hidden_shapes(12, 768)
    assert len(shapes) == 72
    assert sum(r * c for r, c in shapes) == 12 * 12 * 768 ** 2  # 4 d^2 attention + 8 d^2 MLP per layer


@pytest.fixture
def keep_threads():
    """--threads sets torch's process-wide thread count; give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_optim_json(capsys, keep_threads):
    assert main(["bench", "optim", "--model", "tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                 "--no-compile", "--threads", "1", "--rounds", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tiny = out["models"]["tiny"]
    assert set(tiny["times"]) == {"ours", "torch_muon", "ours_fp32_ns"}
    assert all(t["median_s"] > 0 and len(t["round_medians_s"]) == 2 for t in tiny["times"].values())
    assert set(tiny["ratios"]) == {"torch_muon/ours", "ours_fp32_ns/ours", "torch_muon/ours_fp32_ns"}
    assert all(r > 0 for r in tiny["ratios"].values())
    assert out["machine"]["device"] == "cpu" and out["threads"] == 1
    # Same math: ours (bf16 Newton–Schulz) sits at torch.optim.Muon's bf16 distance from
    # float64, and fp32 Newton–Schulz far closer; a wrong scale or schedule would be >> 0.1.
    near = tiny["agreement"]
    assert 1e-3 < near["torch_muon"] < 0.05
    assert near["ours"] == pytest.approx(near["torch_muon"], rel=0.5)
    assert near["ours_fp32_ns"] < 1e-4
    # auto on a CPU is the twin: no Triton launch, torch ops only
    assert tiny["launches"]["step"]["triton"] == 0 and tiny["launches"]["step"]["torch"] > 0


def test_launch_counts_per_step_and_shape_group():
    # three shape groups, NanoChat's pattern at a size the interpreter runs fast
    shapes = [(16, 16)] * 4 + [(32, 16), (16, 32)]
    launches = launch_counts(shapes, "cpu", torch.float32, backend="triton")
    groups = launches["per_shape_group"]
    assert set(groups) == {"16x16", "32x16", "16x32"}
    # per group: momentum pass, normalization (2), 5 Newton–Schulz steps of 3 launches, update pass
    norm = {"_sumsq_kernel": 1, "_inverse_norm_kernel": 1}
    for counts in groups.values():
        assert counts["triton_by_kernel"] == {"_stats_kernel": 1, **norm, "_syrk_kernel": 10, "_update_kernel": 6}
    # one list: the two elementwise passes cover every group, Newton–Schulz runs per group
    assert launches["step"]["triton_by_kernel"] == {"_stats_kernel": 1, "_sumsq_kernel": 3, "_inverse_norm_kernel": 3,
                                                    "_syrk_kernel": 30, "_update_kernel": 16}
    # what is left of torch per group is the non-finite guard and the elementwise passes'
    # bookkeeping, none of it the normalization any more
    assert not {"linalg_vector_norm", "reciprocal", "where"} & set(launches["step"]["torch_by_op"])
    assert launches["step"]["torch"] > 0
    # a capturable step (no guard; tables and direction buffers kept): the Triton launches alone
    assert launches["step_capturable"]["triton_by_kernel"] == launches["step"]["triton_by_kernel"]
    assert launches["step_capturable"]["torch"] == 0
