"""Several processes on Gloo: rank 0 serves, two heterogeneous remote workers, one killed;
and remote MVR/HCM jobs (both versions out, gradient and extra back).

The ranks are started directly with the torchrun environment variables (torchrun's own
agent stops every rank as soon as one dies, which is the opposite of what this checks).
Every wait is bounded; leftover processes are killed.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from ringmaster_kernels.runtime.distributed import RemoteWorker, init_from_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 150  # seconds for the whole 3-process job, whatever the machine's load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], tmp_path, command: tuple[str, ...] = ("-m", "ringmaster_kernels.cli")
           ) -> list[tuple[int, str]]:
    """Start ``world`` ranks of ``python COMMAND ARGV`` (bounded waits); [(return code, log)]."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for rank in range(world):
            log = open(tmp_path / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, *command, *argv], cwd=ROOT,
                                           env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                           stdout=log, stderr=subprocess.STDOUT), log))
        results = []
        for proc, log in procs:
            proc.wait(timeout=TIMEOUT)
            log.close()
            results.append((proc.returncode, open(log.name).read()))
        return results
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def test_gloo_server_two_heterogeneous_workers_cancels_and_a_killed_worker(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--distributed", "--methods", "ringmaster,sync", "--time", "4", "--out", str(out),
            "--d-model", "16", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "4",
            "--corpus-bytes", "100000", "--profile", "linear", "--tau", "0.02", "--lr", "0.05", "--threshold", "2",
            "--fault", "1:kill@8", "--log-every", "100", "--eval-every", "100"]
    (rc0, log0), (rc1, log1), (rc2, log2) = launch(3, argv, tmp_path)
    assert rc2 == -signal.SIGKILL, log2
    assert rc0 == 0, log0
    assert rc1 == 0, log1  # the surviving worker was told to exit
    assert "worker 1 dead" in log0 and "the run continues" in log0
    methods = json.loads((out / "summary.json").read_text())["methods"]
    summary = methods["ringmaster"]
    fast, killed = summary["per_worker"]
    assert killed["status"] == "dead" and killed["pushed"] + killed["cancelled"] == 8 and killed["jobs"] == 9
    assert fast["status"] == "stopped" and "RemoteWorker(rank=1" in fast["body"]
    assert fast["pushed"] > 2 * killed["pushed"]  # it kept training alone after the kill
    assert summary["stop_reason"] == "max_time"
    # R = 2 against a worker half as fast: remote jobs get cancelled mid-flight (stops variant)
    assert summary["totals"]["cancelled"] >= 1
    assert summary["accounting_ok"]
    assert summary["updates"] == summary["totals"]["accepted"] > 16
    assert summary["final_loss"] < summary["initial_loss"] - 0.5
    # the next method's trainer finds rank 2 dead at once and syncs on rank 1 alone; its
    # versions restart at 0, which must not trip the first method's cancel thresholds
    sync = methods["sync"]
    assert [w["status"] for w in sync["per_worker"]] == ["stopped", "dead"]
    assert sync["totals"]["cancelled"] == 0 and sync["updates"] > 10 and sync["accounting_ok"]


JOBS_SCRIPT = """
import json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import torch
from exact_jobs import ExactQuadraticTask, spy_run
from ringmaster_kernels.runtime import distributed
from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker

rank, world = distributed.init_from_env(timeout_s=60)
task = ExactQuadraticTask()
if rank:
    distributed.serve(task, LocalWorker(batch_size=1, compute_time=0.003 * rank), rank - 1, seed=0)
    distributed.dist.destroy_process_group()
    sys.exit(0)
results = {}
for estimator in sys.argv[1].split(","):
    task.estimator = estimator
    trainer = AsyncTrainer(task, [distributed.RemoteWorker(r) for r in range(1, world)], "ringmaster",
                           {"lr": 0.05, "threshold": 3, "momentum": 0.9}, torch_threads=1)
    summary, published, delivered = spy_run(trainer, max_updates=15, max_time=60)
    errors, moved, n = [], 0, 4
    for v, grad in delivered:
        x, prev = published[v][:n], published[v][n:]
        extra = grad[:n] - grad[n:] if estimator.startswith("mvr") else grad[n:]
        errors.append(float((extra - task.c * (x - prev)).abs().max()))
        moved += bool((x != prev).any())
    results[estimator] = {"updates": summary["updates"], "sizes": sorted({g.numel() for _, g in delivered}),
                          "delivered": len(delivered), "moved": moved, "max_error": max(errors),
                          "accounting_ok": summary["accounting_ok"], "totals": summary["totals"],
                          "lost": [w["status"] for w in summary["per_worker"] if w["status"] in ("dead", "dropped")]}
distributed.send_exit(list(range(1, world)))
distributed.dist.destroy_process_group()
print("RESULTS " + json.dumps(results))
"""


def test_remote_workers_serve_mvr_and_hcm_jobs(tmp_path):
    """Both versions travel to the worker rank and 2 x numel values come back: the extra half
    is the gradient at the previous version (MVR) or H d (HCM), exactly c d on this task."""
    script = tmp_path / "jobs.py"
    script.write_text(JOBS_SCRIPT)
    estimators = ("mvr1", "hcm1", "hcm2")
    (rc0, log0), (rc1, log1), (rc2, log2) = launch(3, [",".join(estimators)], tmp_path, command=(str(script),))
    assert (rc0, rc1, rc2) == (0, 0, 0), log0 + log1 + log2
    results = json.loads(log0.split("RESULTS ", 1)[1])
    for estimator in estimators:
        r = results[estimator]
        assert r["updates"] == 15 and r["accounting_ok"] and r["lost"] == [], r
        assert r["sizes"] == [8] and r["delivered"] >= 15 and r["moved"] >= 8, r  # [g, e] per job, d mostly nonzero
        assert r["max_error"] < 1e-5, r


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        RemoteWorker(0)
    if not dist.is_initialized():
        saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
        try:
            with pytest.raises(ValueError, match="torchrun"):
                init_from_env()
        finally:
            os.environ.update(saved)


def test_a_cancellation_to_a_hung_rank_never_blocks_the_server(monkeypatch):
    """SIGSTOP of a worker rank made the server's dist.send(CANCEL) block for the whole
    process-group timeout; cancellations now go through the proxy's own sender thread."""
    import threading
    import time
    from types import SimpleNamespace

    from ringmaster_kernels.runtime import distributed

    blocked = threading.Event()
    release = threading.Event()

    def hung_send(tensor, dst, tag=0):
        blocked.set()
        release.wait(30)  # the peer never answers

    monkeypatch.setattr(distributed, "comm_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(distributed.dist, "send", hung_send)
    worker = distributed.RemoteWorker(1)
    worker.bind(SimpleNamespace(layout=SimpleNamespace(numel=4)), 0)
    worker.setup()
    try:
        t0 = time.monotonic()
        for before in range(1, 50):
            worker.interrupt(before)
        assert time.monotonic() - t0 < 1.0
        assert blocked.wait(10)  # the sender thread did try to send
    finally:
        worker.close()
        release.set()
        worker._sender.join(10)
    assert not worker._sender.is_alive()


STORE_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from ringmaster_kernels.runtime import distributed
distributed.init_from_env(timeout_s=30)
port = int({port!r})
listening = []
for line in open("/proc/net/tcp").read().splitlines()[1:]:
    local, state = line.split()[1], line.split()[3]
    address, hexport = local.split(":")
    if int(hexport, 16) == port and state == "0A":
        listening.append(address)
print(" ".join(listening))
distributed.dist.destroy_process_group()
"""


def test_direct_launch_store_listens_on_master_addr_only():
    """torch's env:// store binds every interface; without torchrun's agent, rank 0's store
    is bound to MASTER_ADDR (127.0.0.1 here: 0100007F in /proc/net/tcp)."""
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "1", "RANK": "0",
           "LOCAL_RANK": "0"}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    result = subprocess.run([sys.executable, "-c", STORE_SCRIPT.format(root=root, port=port)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0100007F"], result.stdout
