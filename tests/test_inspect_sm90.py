"""``ringmaster inspect sm90 --fast``: the kernels' H100 machine code, checked in CPU CI.

What the interpreter cannot show: register pressure and spills, shared memory, whether
loads are vectorized and whether the Newton–Schulz k loops pipeline. The command
compiles each variant the ops launch with every autotune config the autotuner keeps,
with the runtime's own specialisation; this test holds the fast subset (bf16, NanoChat
shapes) to what the kernels are meant to be on sm_90.
"""
import json
import os
import subprocess
import sys

import pytest

from ringmaster_kernels.commands.inspect_sm90 import SM90_SHARED_BYTES


@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    env["PYTHONPATH"] = root
    done = subprocess.run([sys.executable, "-m", "ringmaster_kernels.cli", "inspect", "sm90", "--fast", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas shipped with this triton")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["rows"]


def _name(r):
    return f"{r['family']}.{r['kernel']} [{r['variant']}] {r['config']}"


def test_every_variant_and_config_compiles(rows):
    families = {r["family"] for r in rows}
    assert families == {"newton_schulz", "lmo"}
    assert [_name(r) + ": " + r["error"] for r in rows if not r["compiled"]] == []
    # the fast subset still spans the first (scaled) iteration, the b A addend, the
    # accumulating epilogue (with its scale and beta by value, and read from device
    # tensors: a capturable step) and every autotune config of both Newton–Schulz kernels
    ns = [r for r in rows if r["family"] == "newton_schulz"]
    assert {r["variant"] for r in ns} >= {"HAS_Y=0 HAS_SCALE=1 SCALE_ON_LOAD=0", "HAS_Y=1 HAS_SCALE=0 SCALE_ON_LOAD=0",
                                          "HAS_SCALE=1 SCALE_ON_LOAD=0 HAS_BETA=1 HYPER_ON_DEVICE=0",
                                          "HAS_SCALE=1 SCALE_ON_LOAD=0 HAS_BETA=1 HYPER_ON_DEVICE=1"}
    lmo = {r["variant"] for r in rows if r["family"] == "lmo"}
    assert any("HYPER_ON_DEVICE=1" in v for v in lmo) and any("HYPER_ON_DEVICE=0" in v for v in lmo)


def test_no_config_spills_or_overflows_shared_memory(rows):
    assert [_name(r) for r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]] == []
    assert [_name(r) for r in rows if r["shared"] > SM90_SHARED_BYTES] == []
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_newton_schulz_main_loops_pipeline_in_every_variant(rows):
    # the matmul kernels (the normalization's two reductions have no MMA to pipeline)
    ns = [r for r in rows if r["family"] == "newton_schulz" and r["kernel"] in ("_syrk_kernel", "_update_kernel")]
    assert {r["kernel"] for r in ns} == {"_syrk_kernel", "_update_kernel"}
    # wgmma, fed by async copies (or TMA), with one MMA left in flight across iterations
    assert [_name(r) for r in ns if not r["hgmma"]] == []
    assert [_name(r) for r in ns if not (r["ldgsts"] or r["tma"])] == []
    assert [_name(r) for r in ns if r["mma_in_flight"] is not True] == []


def test_aligned_lmo_kernels_use_128_bit_loads(rows):
    aligned = [r for r in rows if r["family"] == "lmo" and "ALIGNED=1" in r["variant"]]
    assert len(aligned) >= 6  # both kernels, every source and reduction of the fast subset
    assert [_name(r) for r in aligned if not r["ldg128"]] == []
