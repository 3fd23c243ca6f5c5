"""The real async runtime: threads, emulated heterogeneity, faults, accounting, checkpoints.

Timing-based checks use emulated compute times far above the runtime's own latencies and
loose bounds, and every run is bounded by max_time, so a loaded CI machine slows the
tests down but cannot hang them.
"""
import copy
import _thread
import math
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

from ringmaster_kernels.optim.policies import make_policy
from ringmaster_kernels.runtime.data import ByteData, stdlib_corpus
from ringmaster_kernels.runtime.model import GPTConfig, GPTTask, TinyGPT
from ringmaster_kernels.runtime.trainer import AsyncTrainer, Fault, Job, LocalWorker

RUN_LIMIT = 60.0  # seconds: no run may take longer, whatever the machine's load


class LinearTask:
    """Least squares on a fixed random problem: cheap gradients, known optimum."""

    def __init__(self, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w_true = torch.randn(dim, generator=g)
        self.dim = dim

    def build_model(self) -> nn.Module:
        return nn.Linear(self.dim, 1, bias=False)

    def group_of(self, name: str) -> dict:
        return {"norm": None}

    def sample(self, batch_size, generator, device):
        x = torch.randn(batch_size, self.dim, generator=generator)
        return x.to(device), (x @ self.w_true).to(device)

    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y).square().mean()

    def evaluate(self, model) -> float:
        return float((model.weight.detach().squeeze(0) - self.w_true).square().sum())


def linear_trainer(workers, method="async", **kwargs) -> AsyncTrainer:
    options = kwargs.pop("policy_options", {"lr": 0.05, "momentum": 0.0})
    return AsyncTrainer(LinearTask(), workers, method, options, torch_threads=1, **kwargs)


def check_accounting(summary: dict) -> None:
    t = summary["totals"]
    assert t["pushed"] == summary["queue_pushed"]
    assert t["pushed"] == t["accepted"] + t["stale"] + t["nonfinite"] + t["dropped"] + t["in_flight"]
    assert summary["accounting_ok"]


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    """Every run must end all its threads (a hung worker included): nothing may leak into CI."""
    yield
    for thread in threading.enumerate():
        if thread.name.startswith("ringmaster-"):
            thread.join(timeout=5.0)
            assert not thread.is_alive(), f"{thread.name} still running after the run ended"


@pytest.fixture(scope="module")
def gpt_task():
    cfg = GPTConfig(d_model=32, n_layer=1, n_head=2, seq_len=32)
    return GPTTask(cfg, ByteData(stdlib_corpus(300_000), cfg.seq_len), val_batches=2)


def test_heterogeneous_threads_train_gpt_below_unigram_entropy(gpt_task):
    corpus = stdlib_corpus(300_000).long()
    p = torch.bincount(corpus, minlength=256).double() / corpus.numel()
    unigram = float(-(p[p > 0] * p[p > 0].log()).sum())  # ~3.1 nats: what a context-free model reaches
    workers = [LocalWorker(batch_size=8, compute_time=t) for t in (0.01, 0.02, 0.04)]
    trainer = AsyncTrainer(gpt_task, workers, "ringmaster", {"lr": 0.05, "threshold": 4, "momentum": 0.9}, torch_threads=1)
    summary = trainer.run(max_updates=150, max_time=RUN_LIMIT)
    assert summary["updates"] == 150
    assert summary["initial_loss"] == pytest.approx(math.log(256), abs=0.1)
    assert summary["final_loss"] < unigram - 0.2
    check_accounting(summary)
    pushes = [w["pushed"] for w in summary["per_worker"]]
    assert pushes[0] > pushes[2]  # the emulated fast worker delivers more


def test_observed_staleness_matches_emulated_speeds():
    times = (0.03, 0.09, 0.27)
    trainer = linear_trainer([LocalWorker(batch_size=4, compute_time=t) for t in times], "async")
    summary = trainer.run(max_time=4.0)
    check_accounting(summary)
    rates = [1.0 / t for t in times]
    for i, w in enumerate(summary["per_worker"]):
        # no threshold: every arrival is applied, so worker i's job sees the others' updates
        expected = times[i] * (sum(rates) - rates[i])
        assert w["mean_delay"] == pytest.approx(expected, rel=0.35, abs=0.3), (i, w, expected)
    assert summary["per_worker"][0]["pushed"] > 4 * summary["per_worker"][2]["pushed"]
    # the trace agrees with the policy's own bookkeeping
    versions_before = [row[4] - int(row[3]) for row in trainer.trace]
    assert all(d == vb - v for (_, v, d, _, _), vb in zip(trainer.trace, versions_before))
    assert sum(int(k) * c for k, c in summary["delay_histogram"].items()) == sum(r[2] for r in trainer.trace)


def test_accounting_identity_with_discards_cancels_nonfinite_and_in_flight():
    workers = [LocalWorker(batch_size=4, compute_time=t) for t in (0.005, 0.01, 0.08)]
    # the fastest worker's first job finishes first, so it cannot be cancelled before its push
    workers[0] = LocalWorker(batch_size=4, compute_time=0.005, fault=Fault("nan", 0))
    options = {"lr": 0.05, "momentum": 0.0, "threshold": 2}
    trainer = linear_trainer(workers, "ringmaster", policy_options=options)
    before = [p.clone() for p in trainer.policy.params]
    summary = trainer.run(max_updates=60, max_time=RUN_LIMIT)
    check_accounting(summary)
    t = summary["totals"]
    assert t["nonfinite"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.policy.params)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.params))
    assert t["accepted"] == trainer.policy.accepted
    assert t["stale"] == trainer.policy.discarded
    assert t["cancelled"] + t["stale"] > 0  # R = 2 against a worker 16x slower than the fastest


@pytest.mark.parametrize("method", ["ringmaster", "sync"])
def test_worker_crash_is_reported_and_the_run_continues(method):
    workers = [LocalWorker(batch_size=4, compute_time=0.01) for _ in range(3)]
    workers[1] = LocalWorker(batch_size=4, compute_time=0.01, fault=Fault("raise", 3))
    logs = []
    trainer = linear_trainer(workers, method, policy_options={"lr": 0.05, "momentum": 0.0}, log=logs.append)
    summary = trainer.run(max_updates=40, max_time=RUN_LIMIT)
    assert summary["updates"] == 40  # a synchronous barrier stops waiting for the dead worker
    crashed = summary["per_worker"][1]
    assert crashed["status"] == "dead" and "injected fault" in crashed["error"]
    assert crashed["pushed"] == 3
    assert [f["worker"] for f in summary["faults"]] == [1]
    assert any("worker 1 dead" in line for line in logs)
    assert [w["status"] for w in summary["per_worker"]] == ["stopped", "dead", "stopped"]
    check_accounting(summary)


def test_hung_worker_is_dropped_after_timeout():
    workers = [LocalWorker(batch_size=4, compute_time=0.01), LocalWorker(batch_size=4, compute_time=0.01, fault=Fault("hang", 2))]
    trainer = linear_trainer(workers, "sync", hang_timeout=0.5)
    summary = trainer.run(max_updates=30, max_time=RUN_LIMIT)
    assert summary["updates"] == 30
    hung = summary["per_worker"][1]
    assert hung["status"] == "dropped" and "heartbeat" in hung["error"]
    check_accounting(summary)


def test_a_slow_healthy_worker_is_not_taken_for_a_hung_one():
    """Emulated compute time longer than hang_timeout: the worker beats while it waits."""
    workers = [LocalWorker(batch_size=4, compute_time=0.01), LocalWorker(batch_size=4, compute_time=1.5)]
    summary = linear_trainer(workers, "async", hang_timeout=1.0).run(max_time=3.5)
    slow = summary["per_worker"][1]
    assert slow["status"] == "stopped" and slow["pushed"] >= 2, slow
    assert summary["faults"] == []
    check_accounting(summary)


class ClosingWorker(LocalWorker):
    closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("fault", [None, Fault("raise", 0)])
def test_the_trainer_closes_every_body_once_its_run_ends(fault):
    """Remote proxies hold a sender thread each; the run ends them, whatever its end."""
    workers = [ClosingWorker(batch_size=4), ClosingWorker(batch_size=4, fault=fault)]
    linear_trainer(workers).run(max_updates=5, max_time=RUN_LIMIT)
    assert [w.closed for w in workers] == [1, 1]


def test_all_workers_lost_stops_the_run():
    workers = [LocalWorker(batch_size=4, fault=Fault("raise", 0)) for _ in range(2)]
    summary = linear_trainer(workers).run(max_time=RUN_LIMIT)
    assert summary["stop_reason"] == "all workers lost"
    assert summary["updates"] == 0
    assert sorted(f["worker"] for f in summary["faults"]) == [0, 1]
    assert [w["status"] for w in summary["per_worker"]] == ["dead", "dead"]


def test_checkpoint_resume_continues_the_run(tmp_path):
    path = tmp_path / "ck.pt"
    workers = lambda: [LocalWorker(batch_size=4, compute_time=t) for t in (0.005, 0.01)]  # noqa: E731
    options = {"lr": 0.05, "momentum": 0.9, "threshold": 3}
    first = linear_trainer(workers(), "ringmaster", policy_options=options, checkpoint_path=path, checkpoint_every=10)
    s1 = first.run(max_updates=25, max_time=RUN_LIMIT)
    assert os.listdir(tmp_path) == ["ck.pt"]  # written atomically: no temporary left behind
    second = linear_trainer(workers(), "ringmaster", policy_options=options, checkpoint_path=path)
    second.load_checkpoint(path)
    assert second.version == first.version == s1["version"]
    assert torch.equal(second.master, first.master)
    saved, loaded = first.policy.state_dict(), second.policy.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(saved["rule"]["momentum_buffers"], loaded["rule"]["momentum_buffers"]))
    assert saved["counters"] == loaded["counters"]
    assert [b.generator.get_state().tolist() for b in first.workers] == [b.generator.get_state().tolist() for b in second.workers]
    s2 = second.run(max_updates=50, max_time=RUN_LIMIT)
    assert s2["version"] == 50 and s2["updates"] == 50 - s1["version"]
    assert second.curve[: len(first.curve)] == first.curve  # the history continues
    times = [t for t, _, _ in second.curve]
    assert times == sorted(times) and len(times) > len(first.curve)
    for key in ("accepted", "pushed", "discarded", "cancelled"):
        assert s2["totals_including_resumed"][key] == s1["totals"][key] + s2["totals"][key]
    assert s2["final_loss"] < s1["initial_loss"]
    with pytest.raises(ValueError, match="path"):
        linear_trainer(workers(), "sync").load_checkpoint(path)


def test_ctrl_c_stops_cleanly_with_a_final_checkpoint(tmp_path, python_sigint):
    path = tmp_path / "ck.pt"
    trainer = linear_trainer([LocalWorker(batch_size=4, compute_time=0.01) for _ in range(2)], checkpoint_path=path)
    timer = threading.Timer(1.0, _thread.interrupt_main)  # Ctrl-C, delivered to the main thread
    timer.start()
    try:
        summary = trainer.run(max_time=RUN_LIMIT)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped AsyncTrainer.run")
    finally:
        timer.cancel()
    assert summary["stop_reason"] == "interrupted"
    assert summary["updates"] > 0
    assert torch.load(path, weights_only=False)["policy"]["counters"]["version"] == summary["version"]
    check_accounting(summary)


class ScriptedWorker:
    """Delivers gradients in a given global order: its k-th arrival waits until the
    runtime has fully handled exactly ``turns[k]`` records and every other worker is
    computing a live (not cancelled) job, which is the simulator's model of time."""

    def __init__(self, turns: list[int], total: int, peers: list, grad_value: float):
        self.turns, self.total, self.peers, self.grad_value = turns, total, peers, grad_value
        self.device = torch.device("cpu")
        self.current: Job | None = None
        self.done = 0

    def bind(self, trainer, worker):
        self.trainer, self.worker = trainer, worker

    def setup(self):
        self.grad = torch.full((self.trainer.layout.numel,), self.grad_value)

    def settled(self) -> bool:
        return all(p is self or (p.current is not None and not p.current.cancelled()) for p in self.peers)

    def compute(self, job):
        self.current = job
        try:
            while not job.cancelled():
                job.beat()
                handled = len(self.trainer.trace)
                if handled == self.total:
                    self.trainer.request_stop("script done")
                elif self.done < len(self.turns) and handled == self.turns[self.done] and self.settled():
                    self.done += 1
                    return self.grad, 0.0
                threading.Event().wait(0.001)
            return None
        finally:
            self.current = None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("method,options", [
    ("ringmaster", {"threshold": 2}),
    ("rennala", {"batch": 3}),
    ("delay_adaptive", {}),
])
def test_runtime_and_simulator_make_the_same_decisions(method, options):
    from ringmaster_kernels.runtime.objectives import LeastSquares
    from ringmaster_kernels.runtime.simulator import simulate
    from ringmaster_kernels.runtime.time_models import TimeModel

    n = 3
    objective = LeastSquares.random(rows=16, dim=8, seed=0)
    sim_policy = make_policy(method, objective.initial_params(), num_workers=n, lr=0.01, momentum=0.0, norm="l2", **options)
    trace = simulate(sim_policy, objective, TimeModel(base=np.array([1.0, 2.3, 5.1]), scale=0.0), horizon=30.0, seed=0)
    assert len(trace.worker) > 20 and (not trace.accepted.all() or trace.cancelled.any() or method == "delay_adaptive")
    turns = [[k for k, w in enumerate(trace.worker.tolist()) if w == i] for i in range(n)]
    peers: list = []
    peers.extend(ScriptedWorker(turns[i], len(trace.worker), peers, grad_value=0.1 * (i + 1)) for i in range(n))
    trainer = AsyncTrainer(LinearTask(), peers, method, {"lr": 0.01, "momentum": 0.0, **options})
    summary = trainer.run(max_time=RUN_LIMIT)
    assert summary["stop_reason"] == "script done" and not summary["faults"]
    got = np.array(trainer.trace)
    assert len(got) == len(trace.worker), summary["stop_reason"]
    np.testing.assert_array_equal(got[:, 0], trace.worker)
    np.testing.assert_array_equal(got[:, 2], trace.delay)
    np.testing.assert_array_equal(got[:, 3].astype(bool), trace.accepted)
    np.testing.assert_array_equal(got[:, 4], trace.version)
    assert summary["totals"]["cancelled"] == int(trace.cancelled.sum())


def test_bad_arguments_raise_naming_them():
    task = LinearTask()
    with pytest.raises(ValueError, match="workers"):
        AsyncTrainer(task, [], "async", {"lr": 0.1})
    with pytest.raises(ValueError, match="method"):
        AsyncTrainer(task, [LocalWorker()], "nope", {"lr": 0.1})
    with pytest.raises(ValueError, match="hang_timeout"):
        AsyncTrainer(task, [LocalWorker()], "async", {"lr": 0.1}, hang_timeout=-1)
    with pytest.raises(ValueError, match="checkpoint_every"):
        AsyncTrainer(task, [LocalWorker()], "async", {"lr": 0.1}, checkpoint_every=5)
    with pytest.raises(ValueError, match="num_slots"):
        AsyncTrainer(task, [LocalWorker(), LocalWorker()], "async", {"lr": 0.1}, num_slots=1)
    with pytest.raises(ValueError, match="batch_size"):
        LocalWorker(batch_size=0)
    with pytest.raises(ValueError, match="compute_time"):
        LocalWorker(compute_time=-1.0)
    with pytest.raises(ValueError, match="slowdown"):
        LocalWorker(slowdown=0.5)
    with pytest.raises(ValueError, match="kill"):
        LocalWorker(fault=Fault("kill", 0))
    with pytest.raises(ValueError, match="WORKER:KIND@JOB"):
        Fault.parse("2-raise")
    with pytest.raises(ValueError, match="fault kind"):
        Fault.parse("2:explode@1")
    trainer = linear_trainer([LocalWorker()])
    with pytest.raises(ValueError, match="max_updates or max_time"):
        trainer.run()
    with pytest.raises(ValueError, match="max_time"):
        trainer.run(max_time=math.nan)


def test_gpt_shapes_and_data_windows():
    cfg = GPTConfig(d_model=16, n_layer=1, n_head=2, seq_len=8)
    model = TinyGPT(cfg)
    assert all(p.dim() == 2 for p in model.parameters())
    data = ByteData(stdlib_corpus(10_000), seq_len=8)
    x, y = data.sample(3, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert model(x).shape == (3, 8, 256)
    val = data.validation(2, 2)
    assert len(val) == 2 and torch.equal(val[0][0], data.validation(2, 2)[0][0])
    with pytest.raises(ValueError, match="idx"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model"):
        GPTConfig(d_model=10, n_head=3)
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_corpus(0)
    with pytest.raises(ValueError, match="too short"):
        ByteData(stdlib_corpus(100), seq_len=64)


def test_train_command_writes_table_json_and_plot(tmp_path, capsys):
    from ringmaster_kernels.cli import main

    out = tmp_path / "run"
    code = main(["train", "--time", "2", "--out", str(out), "--workers", "2", "--d-model", "16", "--layers", "1",
                 "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--corpus-bytes", "100000", "--tau", "0.01",
                 "--eval-every", "100", "--log-every", "100"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ringmaster" in printed and "sync" in printed and "held-out end" in printed and "train EMA" in printed
    assert "s/gradient" in printed and "server wall us/upd" in printed and "wall >= CPU" in printed
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"ringmaster", "sync"}
    for s in summary["methods"].values():
        assert s["accounting_ok"] and s["updates"] > 0 and s["final_loss"] < s["initial_loss"]
    # every job of synchronous training completes: each worker's speed is measured
    assert all(w["seconds_per_gradient"] > 0 for w in summary["methods"]["sync"]["per_worker"])
    bodies = [w["body"] for w in summary["methods"]["sync"]["per_worker"]]
    assert "slowdown=1.0" in bodies[0] and "slowdown=2.0" in bodies[1]  # --profile linear
    assert (out / "loss_vs_time.png").stat().st_size > 1000
    assert (out / "ringmaster" / "checkpoint.pt").exists()


@pytest.mark.cuda
def test_one_gpu_two_worker_threads_train():
    cfg = GPTConfig(d_model=64, n_layer=2, n_head=4, seq_len=64)
    task = GPTTask(cfg, ByteData(stdlib_corpus(1_000_000), cfg.seq_len))
    workers = [LocalWorker("cuda:0", batch_size=16), LocalWorker("cuda:0", batch_size=16, slowdown=3.0)]
    trainer = AsyncTrainer(task, workers, "ringmaster", {"lr": 0.05, "threshold": 4, "momentum": 0.9}, server_device="cuda:0")
    summary = trainer.run(max_updates=200, max_time=RUN_LIMIT)
    check_accounting(summary)
    assert summary["final_loss"] < summary["initial_loss"] - 1.0
    assert summary["per_worker"][0]["pushed"] > summary["per_worker"][1]["pushed"]


class _Payload:
    """Unpickling this runs code: what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _same(a, b) -> bool:
    """Nested dicts/lists/tuples of tensors and plain values are equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _saved_trainer(tmp_path):
    path = tmp_path / "ck.pt"
    trainer = linear_trainer([LocalWorker(batch_size=4)], checkpoint_path=path)
    trainer.run(max_updates=5, max_time=RUN_LIMIT)
    return path, torch.load(path, weights_only=True)


def test_a_checkpoint_never_runs_code_and_damage_is_one_clear_error(tmp_path):
    path, state = _saved_trainer(tmp_path)
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({**state, "loss_ema": _Payload(str(marker))}, crafted)
    raw = path.read_bytes()
    damaged = {
        "truncated.pt": raw[: len(raw) // 2], "empty.pt": b"", "random.pt": os.urandom(4096),
        "flipped.pt": raw[:100] + bytes(b ^ 0xFF for b in raw[100:400]) + raw[400:],
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({**state, "params": state["params"][:-1]}, tmp_path / "short.pt")
    torch.save({k: v for k, v in state.items() if k != "policy"}, tmp_path / "missing.pt")
    bad_version = {**state, "policy": {**state["policy"], "counters": {**state["policy"]["counters"], "version": -7}}}
    torch.save(bad_version, tmp_path / "version.pt")
    (tmp_path / "adir.pt").mkdir()
    # these fail half-way through loading: params and policy fit, a later part does not
    torch.save({**state, "history": {**state["history"], "curve": [("x",)]}}, tmp_path / "history.pt")
    torch.save({**state, "workers": [{"bogus": 1}]}, tmp_path / "worker.pt")
    torch.save({**state, "rng": {"torch": torch.zeros(3), "python": None}}, tmp_path / "rng.pt")
    torch.save({**state, "totals": {**state["totals"], "pushed": "many"}}, tmp_path / "totals.pt")
    names = ["crafted.pt", *damaged, "list.pt", "short.pt", "missing.pt", "version.pt", "adir.pt",
             "history.pt", "worker.pt", "rng.pt", "totals.pt"]
    for name in names:
        fresh = linear_trainer([LocalWorker(batch_size=4)])
        before = copy.deepcopy(fresh._state())
        with pytest.raises(ValueError) as info:
            fresh.load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value), name
        after = fresh._state()  # nothing was changed: parameters, policy, metrics, data, RNG
        assert torch.equal(after["params"], before["params"]) and fresh.version == 0, name
        assert after["policy"]["counters"] == before["policy"]["counters"], name
        for part in ("history", "workers", "rng"):
            assert _same(after[part], before[part]), (name, part)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["params", "momentum"])
def test_non_finite_state_is_refused_on_resume(tmp_path, where):
    path = tmp_path / "ck.pt"
    trainer = linear_trainer([LocalWorker(batch_size=4)], policy_options={"lr": 0.05, "momentum": 0.9},
                             checkpoint_path=path)
    trainer.run(max_updates=5, max_time=RUN_LIMIT)
    state = torch.load(path, weights_only=True)
    if where == "params":
        state["params"][0] = math.nan
    else:
        state["policy"]["rule"]["momentum_buffers"][0].fill_(math.inf)
    torch.save(state, path)
    fresh = linear_trainer([LocalWorker(batch_size=4)], policy_options={"lr": 0.05, "momentum": 0.9})
    with pytest.raises(ValueError, match="NaN or inf"):
        fresh.load_checkpoint(path)


def test_accounting_holds_across_mid_run_checkpoints_and_resumes(tmp_path):
    path = tmp_path / "ck.pt"
    workers = lambda: [LocalWorker(batch_size=4, compute_time=t) for t in (0.002, 0.004, 0.006)]  # noqa: E731
    options = {"lr": 0.05, "momentum": 0.0, "threshold": 2}
    target = 0
    for cycle in range(4):
        trainer = linear_trainer(workers(), "ringmaster", policy_options=options, checkpoint_path=path, checkpoint_every=3)
        if path.exists():
            # resume from the last *mid-run* checkpoint, as after a SIGKILL
            state = torch.load(path, weights_only=True)
            trainer.load_checkpoint(path)
            t = state["totals"]
            assert t["pushed"] == t["accepted"] + t["discarded"] + t["in_flight"], t
            # the curve holds a point for every update up to the checkpoint, its own included
            versions = [v for _, v, _ in state["history"]["curve"]]
            assert versions[-1] == state["policy"]["counters"]["version"] and versions == sorted(set(versions))
        target += 10
        summary = trainer.run(max_updates=target, max_time=RUN_LIMIT)
        check_accounting(summary)
    combined = summary["totals_including_resumed"]
    assert combined["pushed"] == combined["accepted"] + combined["discarded"] + combined["in_flight"]


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    path = tmp_path / "ck.pt"
    stale = tmp_path / "ck.pt.tmp999999"
    stale.write_bytes(b"x" * 1000)
    trainer = linear_trainer([LocalWorker(batch_size=4)], checkpoint_path=path)
    trainer.run(max_updates=3, max_time=RUN_LIMIT)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]


SIGTERM_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import linear_trainer
from ringmaster_kernels.runtime.trainer import LocalWorker
trainer = linear_trainer([LocalWorker(batch_size=4, compute_time=0.01)], checkpoint_path={path!r})
print("started", flush=True)
summary = trainer.run(max_time=60)
print("stopped", summary["stop_reason"], summary["updates"], flush=True)
"""


def test_sigterm_stops_cleanly_with_a_final_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "ck.pt"
    script = SIGTERM_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split()[:2] == ["stopped", "terminated"] and int(out.split()[2]) > 0
    state = torch.load(path, weights_only=True)
    assert state["policy"]["counters"]["version"] == int(out.split()[2])


@pytest.mark.parametrize("argv, flag", [
    (["train", "--methods", "ringmaster,Sync"], "--methods"),
    (["train", "--methods", "ringmaster,bogus"], "--methods"),
    (["train", "--methods", "sync,sync"], "--methods"),
    (["train", "--fault", "1:raise@2", "--fault", "1:nan@3"], "--fault"),
    (["train", "--time", "inf"], "--time"),
    (["train", "--tau", "-1"], "--tau"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--threshold", "0"], "--threshold"),
    (["train", "--momentum", "1"], "--momentum"),
    (["train", "--d-model", "10", "--heads", "3"], "--d-model"),
    (["train", "--fault", "0:kill@1"], "--fault"),
    (["train", "--fault", "0:explode@1"], "--fault"),
    (["train", "--max-updates", "0"], "--max-updates"),
    (["simulate", "quadratic", "--threshold", "0"], "--threshold"),
    (["simulate", "quadratic", "--momentum", "1.5"], "--momentum"),
    (["inspect", "sm90", "--kernels", "ns,foo"], "--kernels"),
    (["simulate", "sweep", "--levels", "a,b"], "--levels"),
    (["simulate", "quadratic", "--seed", "-1"], "--seed"),
    (["bench", "ns", "--repeats", "0"], "--repeats"),
    (["bench", "lmo", "--repeats", "0"], "--repeats"),
    (["bench", "optim", "--repeats", "0"], "--repeats"),
])
def test_cli_refuses_bad_flags_before_any_work(argv, flag, tmp_path, capsys):
    import time

    from ringmaster_kernels.cli import main

    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "out"), "--workers", "2"]
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code) + capsys.readouterr().err
    assert info.value.code != 0 and flag in message, message
    assert time.monotonic() - t0 < 10  # nothing trained first
    assert not (tmp_path / "out" / "summary.json").exists()


def test_train_refuses_an_out_folder_it_cannot_write(tmp_path, capsys):
    from ringmaster_kernels.cli import main

    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "afile" / "run")])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err


def test_every_option_with_a_default_shows_it_in_help():
    import argparse

    from ringmaster_kernels.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    missing = []
    for parser in parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            shown = action.default not in (None, False, [], argparse.SUPPRESS)
            if action.option_strings and shown and f"(default: {action.default})" not in text:
                missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing


def test_simulate_plot_path_is_checked_before_the_run(tmp_path, capsys):
    from ringmaster_kernels.cli import main

    (tmp_path / "adir").mkdir()
    with pytest.raises(SystemExit):
        main(["simulate", "quadratic", "--plot", str(tmp_path / "adir")])
    assert "--plot" in capsys.readouterr().err
    from ringmaster_kernels.commands._args import output_file

    target = tmp_path / "missing" / "deeper" / "p.png"
    assert output_file(str(target)) == str(target) and target.parent.is_dir()  # made before the run, not after


def test_a_hang_is_detected_under_the_stops_of_ringmaster():
    workers = [LocalWorker(batch_size=4, compute_time=0.01), LocalWorker(batch_size=4, compute_time=0.02, fault=Fault("hang", 1))]
    trainer = linear_trainer(workers, "ringmaster", policy_options={"lr": 0.05, "momentum": 0.0, "threshold": 1},
                             hang_timeout=0.5)
    summary = trainer.run(max_time=4.0)
    assert [f["status"] for f in summary["faults"]] == ["dropped"]
    assert summary["per_worker"][1]["status"] == "dropped" and summary["updates"] > 0
    check_accounting(summary)
