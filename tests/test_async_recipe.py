"""A real training recipe behind the delay rule: NanoChat's groups, schedules and optimizer
(RingmasterMuonAdamW) as the update rule of the async engine, on both clocks."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from chat_task import ChatTask
from ringmaster_kernels.optim.policies import Ringmaster, make_policy
from ringmaster_kernels.runtime import checkpoint, task_experiment
from ringmaster_kernels.runtime.reporting import json_ready
from ringmaster_kernels.runtime.simulator import Simulation
from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker
from ringmaster_kernels.runtime.virtual import TaskObjective, authors_time_model, master_model

RUN_LIMIT = 120.0
FIELDS = ("time", "worker", "delay", "accepted", "version", "cancelled", "metric", "death")


def test_sync_with_n_workers_is_synchronous_training_at_n_times_the_batch():
    task, n, batch, updates, seed = ChatTask(), 3, 2, 20, 5
    trainer = AsyncTrainer(task, [LocalWorker(batch_size=batch) for _ in range(n)], "sync", seed=seed, torch_threads=1)
    summary = trainer.run(max_updates=updates, max_time=RUN_LIMIT)
    assert summary["updates"] == updates and summary["accounting_ok"]

    model, rule = master_model(task, seed)  # the same initial model and recipe, stepped synchronously
    streams = [task.data_stream(worker=w, num_workers=n, batch_size=batch, device=torch.device("cpu"), seed=seed)
               for w in range(n)]
    for version in range(updates):
        parts = [s.next_batch() for s in streams]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        grads = torch.autograd.grad(task.loss(model, (x, y)), rule.params)
        rule.apply(list(grads), version)
    got = dict(trainer.model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-4, atol=2e-5, msg=name)
    # the recipe's schedule ran per version: the last update's lr, momentum and decay
    opt = trainer.policy.rule.optimizer
    muon = next(g for g in opt.param_groups if g["kind"] == "muon")
    assert muon["lr"] == pytest.approx(muon["initial_lr"] * task.recipe.lr_multiplier(updates - 1))
    assert muon["momentum"] == pytest.approx(task.recipe.muon_momentum(updates - 1))
    assert muon["weight_decay"] == pytest.approx(task.recipe.weight_decay(updates - 1))


def _simulation(task, method, options, n=4, horizon=6.0, seed=3, record_every=3):
    model, rule = master_model(task, seed)
    policy = make_policy(method, rule, num_workers=n, **options)
    objective = TaskObjective(task, model, policy.params, num_workers=n, batch_size=2, seed=seed)
    sim = Simulation(policy, objective, authors_time_model(0.1, "linear", n), horizon=horizon, seed=seed,
                     record_every=record_every)
    return sim, model


def test_ringmaster_with_threshold_one_is_rennala_with_batch_one():
    task = ChatTask()
    a, model_a = _simulation(task, "ringmaster", {"threshold": 1})
    b, model_b = _simulation(task, "rennala", {"batch": 1})
    ta, tb = a.run(), b.run()
    assert ta.num_accepted > 10
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(ta, field), getattr(tb, field))
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name


class CountingObjective(TaskObjective):
    def gradient(self, params, rng, worker=0):
        self.calls = getattr(self, "calls", 0) + 1
        return super().gradient(params, rng, worker)


@pytest.mark.parametrize("stops", [False, True])
def test_a_discarded_gradient_never_reaches_the_optimizer(stops):
    """Without stops (the paper's Algorithm 1) stale arrivals are discarded; with stops
    stale jobs are cancelled in flight. Either way no unused gradient is even computed."""
    task, n, seed = ChatTask(), 4, 1
    model, rule = master_model(task, seed)
    policy = Ringmaster(rule, num_workers=n, threshold=2, stops=stops)
    steps = []
    rule.optimizer.register_step_pre_hook(lambda opt, args, kwargs: steps.append([p.grad.clone() for p in rule.params]))
    objective = CountingObjective(task, model, policy.params, num_workers=n, batch_size=2, seed=seed)
    time_model = authors_time_model(0.1, "linear", n)
    trace = Simulation(policy, objective, time_model, horizon=5.0, seed=seed).run()
    discarded_on_arrival = int((~trace.accepted & ~trace.death).sum())
    assert (int(trace.cancelled.sum()) if stops else discarded_on_arrival) > 0
    assert objective.calls == policy.accepted == trace.num_accepted  # discarded ones were never even computed
    assert len(steps) == policy.version  # one optimizer step per update, none for a discard
    assert all(p.grad is None for p in rule.params)  # gradients are lent to the optimizer for its step only


def test_runtime_applies_only_accepted_gradients_through_the_optimizer():
    task = ChatTask()
    workers = [LocalWorker(batch_size=2, compute_time=0.01 * (i + 1)) for i in range(3)]
    trainer = AsyncTrainer(task, workers, "rennala", {"batch": 2}, torch_threads=1)
    steps = []
    trainer.policy.rule.optimizer.register_step_post_hook(lambda *a: steps.append(1))
    summary = trainer.run(max_updates=15, max_time=RUN_LIMIT)
    assert summary["accounting_ok"] and summary["updates"] == 15
    assert len(steps) == 15
    assert summary["totals"]["accepted"] == 2 * 15 + (trainer.policy._count if trainer.policy._sum is not None else 0)


def test_virtual_clock_checkpoint_and_resume_continue_bit_for_bit(tmp_path):
    task = ChatTask()
    whole, whole_model = _simulation(task, "ringmaster", {"threshold": 2})
    full = whole.run()
    first, _ = _simulation(task, "ringmaster", {"threshold": 2})
    first.run(pause_after=12)
    path = checkpoint.write_atomic(str(tmp_path / "virtual.pt"), first.state_dict())
    second, second_model = _simulation(task, "ringmaster", {"threshold": 2})
    second.load_state_dict(checkpoint.read(path))  # weights_only: the state is plain data
    resumed = second.run()
    assert len(full.time) > 20
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(resumed, field), getattr(full, field))
    for (name, p), q in zip(whole_model.named_parameters(), second_model.parameters()):
        assert torch.equal(p, q), name
    saved, loaded = whole.policy.rule.optimizer.state_dict(), second.policy.rule.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]


def test_runtime_checkpoint_resumes_the_optimizer_recipe(tmp_path):
    task = ChatTask()
    path = tmp_path / "ck.pt"
    first = AsyncTrainer(task, [LocalWorker(batch_size=2) for _ in range(2)], "sync", checkpoint_path=path, torch_threads=1)
    first.run(max_updates=6, max_time=RUN_LIMIT)
    second = AsyncTrainer(task, [LocalWorker(batch_size=2) for _ in range(2)], "sync", checkpoint_path=path, torch_threads=1)
    second.load_checkpoint(path)
    a, b = first.policy.rule.optimizer.state_dict(), second.policy.rule.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(x, y) for s, t in zip(a["state"].values(), b["state"].values()) for x, y in
               zip(s.values(), t.values()) if isinstance(x, torch.Tensor))
    assert [w.stream.index for w in second.workers] == [w.stream.index for w in first.workers] == [6, 6]
    s = second.run(max_updates=10, max_time=RUN_LIMIT)
    assert s["version"] == 10 and s["accounting_ok"]


@pytest.mark.parametrize("clock", ["real", "virtual"])
def test_methods_compared_on_one_recipe(clock, tmp_path):
    summaries = task_experiment.run_methods(
        ChatTask(), ["ringmaster", "sync"], clock=clock, num_workers=3, profile="linear",
        seconds=3.0 if clock == "real" else 2.0, out=str(tmp_path), batch_size=2, eval_every=1.0, record_every=2)
    assert set(summaries) == {"ringmaster", "sync"}
    for s in summaries.values():
        assert s["updates"] > 0 and s["accounting_ok"] and len(s["gradients_per_worker"]) == 3
        assert np.isfinite(s["final_metric"]) and s["target"]["reference"] == "sync"
    assert summaries["ringmaster"]["updates"] > summaries["sync"]["updates"]
    assert "ringmaster" in task_experiment.table(summaries)
    png = task_experiment.plot(summaries, str(tmp_path / "plot.png"), "test")
    assert os.path.getsize(png) > 1000
    json.dumps(json_ready(summaries), allow_nan=False)


def test_methods_compared_over_seeds_with_median_and_band(tmp_path):
    result = task_experiment.run_seeds(
        ChatTask(), ["ringmaster", "sync"], seeds=[3, 4], clock="virtual", num_workers=3, profile="linear",
        seconds=2.0, out=str(tmp_path), batch_size=2, record_every=2)
    assert result["seeds"] == [3, 4] and len(result["runs"]) == 2
    assert os.path.isdir(tmp_path / "seed3" / "sync") and os.path.isdir(tmp_path / "seed4" / "ringmaster")
    # one time model for every seed: the base measured by the first
    assert {run[m]["base_seconds"] for run in result["runs"] for m in run} == {result["runs"][0]["sync"]["base_seconds"]}
    # different seeds are different runs (model init, data order)
    assert result["runs"][0]["ringmaster"]["evals"][0][1] != result["runs"][1]["ringmaster"]["evals"][0][1]
    for method, agg in result["aggregate"].items():
        finals = sorted(run[method]["final_metric"] for run in result["runs"])
        assert agg["final_metric"]["min"] == finals[0] and agg["final_metric"]["max"] == finals[1]
        assert agg["final_metric"]["median"] == pytest.approx(sum(finals) / 2)
        assert agg["sustained_s"]["seeds"] == 2
    text = task_experiment.table(result)
    assert "ringmaster" in text and "[" in text and "seeds [3, 4]" in text
    png = task_experiment.plot(result, str(tmp_path / "bands.png"), "test")
    assert os.path.getsize(png) > 1000
    json.dumps(json_ready(result), allow_nan=False)
    with pytest.raises(ValueError, match="seeds"):
        task_experiment.run_seeds(ChatTask(), ["sync"], seeds=[1, 1], clock="virtual", num_workers=2,
                                  profile="linear", seconds=1.0, out=str(tmp_path))


def test_time_to_distinguishes_touch_and_stay():
    t = [0, 1, 2, 3, 4]
    assert task_experiment.time_to(t, [5, 1, 5, 1, 1], 2) == (1.0, 3.0)
    assert task_experiment.time_to(t, [5, 1, 1, 1, 5], 2) == (1.0, None)
    assert task_experiment.time_to(t, [5, 5, 5, 5, 5], 2) == (None, None)
    assert task_experiment.time_to(t, [1, 1, 1, 1, 1], 2) == (0.0, 0.0)


@pytest.mark.parametrize("methods", [["ringmaster", "bogus"], ["ringmaster", "Sync"], ["ringmaster_asgd"], []])
def test_unknown_methods_are_refused_before_any_work(methods, tmp_path):
    with pytest.raises(ValueError, match="methods"):
        task_experiment.run_methods(ChatTask(), methods, clock="real", num_workers=2, profile="linear", seconds=1.0,
                                    out=str(tmp_path))
