"""benchmarks/gpu_check.py, the script for a GPU window, rehearsed on the CPU so that a
rare GPU window is not lost to a script error."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PHASES = ["environment", "ceilings", "correctness", "timings", "lmo_bandwidth", "bench_optim", "capturable_step", "train",
          "cuda_tests"]


def _run(tmp_path, *args, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(env or {})}
    env.update(OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    lines = (tmp_path / "gpu_check.jsonl").read_text().splitlines()
    return done, {r["phase"]: r for r in map(json.loads, lines)}


def test_cpu_smoke_runs_every_phase(tmp_path):
    done, records = _run(tmp_path)
    assert list(records) == PHASES
    failed = {name: r.get("error") for name, r in records.items() if not r["ok"]}
    assert not failed and done.returncode == 0, (failed, done.stderr[-2000:])
    for row in records["correctness"]["result"]["shapes"].values():
        # fp32 iteration: kernel and twin both near the float64 iteration; X X^T mirrored exactly
        assert row["finite"] and row["syrk_exactly_symmetric"]
        assert row["kernel_vs_fp64"] < 1e-4 and row["twin_vs_fp64"] < 1e-4 and row["syrk_vs_fp64"] < 1e-6
    timings = records["timings"]["result"]["shapes"]["nanochat_attn"]
    contestants = ("triton", "triton_cublas_updates", "twin_eager", "twin_compiled", "cublas_matmuls")
    assert set(contestants) <= set(timings)
    assert all("error" not in timings[k] for k in contestants)
    assert records["lmo_bandwidth"]["result"]["norms"]["sign"]["GBps"] > 0
    assert "tiny" in records["bench_optim"]["result"]["models"]
    steps = records["capturable_step"]["result"]["steps"]
    assert steps["eager"]["wall_ms"] > 0 and steps["capturable"]["launches"]["torch"] == 0  # Triton launches only
    assert records["cuda_tests"]["result"]["returncode"] in (0, 5)


def test_a_failing_phase_is_recorded_and_the_next_still_runs(tmp_path):
    # an invalid $RINGMASTER_BACKEND makes bench optim's backend="auto" calls raise
    done, records = _run(tmp_path, "--phases", "bench_optim,environment", env={"RINGMASTER_BACKEND": "bogus"})
    assert done.returncode == 1
    assert not records["bench_optim"]["ok"] and "RINGMASTER_BACKEND" in records["bench_optim"]["error"]
    assert records["environment"]["ok"] and records["environment"]["result"]["smoke"] is True


def test_phases_past_the_deadline_are_recorded_as_skipped(tmp_path):
    done, records = _run(tmp_path, "--phases", "environment,cuda_tests", "--deadline-s", "0")
    assert done.returncode == 1
    assert [r["skipped"] for r in records.values()] == ["deadline passed before this phase"] * 2


def test_unknown_phase_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--phases", "nope"], capture_output=True,
                          text=True, env=dict(os.environ, OUT=str(tmp_path)))
    assert done.returncode == 2 and "unknown ['nope']" in done.stderr
