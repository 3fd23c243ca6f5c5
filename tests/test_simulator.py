"""Virtual-time simulator: event order and clock, determinism, formulas, faults, the CLI."""
import json
import math

import numpy as np
import pytest
import torch

from ringmaster_kernels.cli import main
from ringmaster_kernels.optim.policies import make_policy
from ringmaster_kernels.runtime.experiments import QuadraticExperiment, muon_vector_gain
from ringmaster_kernels.runtime.objectives import LeastSquares, ModuleObjective, TridiagonalQuadratic
from ringmaster_kernels.runtime.simulator import simulate
from ringmaster_kernels.runtime.time_models import TimeModel, make_time_model


def fixed_times(*taus):
    return TimeModel(np.array(taus, dtype=np.float64), 0.0)


def quad_policy(method, n, dim=8, **kw):
    obj = TridiagonalQuadratic(dim, noise=0.0)
    kw.setdefault("norm", "l2")
    return make_policy(method, obj.initial_params(), num_workers=n, **kw), obj


def test_event_order_and_clock_hand_computed():
    # worker 0 every 1.0, worker 1 every 2.5, no threshold: arrivals at
    # t = 1 (w0), 2 (w0), 2.5 (w1, from v0 at k=2), 3 (w0, from v2 at k=3), 4, 5 (w0 first: ties
    # by id), 5 (w1, from v3 at k=6)
    pol, obj = quad_policy("async", 2, lr=0.01)
    tr = simulate(pol, obj, fixed_times(1.0, 2.5), horizon=5.2)
    assert tr.time.tolist() == [1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 5.0]
    assert tr.worker.tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert tr.delay.tolist() == [0, 0, 2, 1, 0, 0, 3]
    assert tr.version.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert tr.started == 9 and tr.end_time == 5.2


def test_stops_cancel_slow_worker_hand_computed():
    # R = 2: after the update at t=2 (k=2) worker 1's job from v0 has delay 2 -> cancelled,
    # restarted at t=2 (ends 4.5); at t=4 (k=4) its job from v2 is cancelled again, and so on.
    pol, obj = quad_policy("ringmaster", 2, lr=0.01, threshold=2)
    tr = simulate(pol, obj, fixed_times(1.0, 2.5), horizon=6.5)
    assert tr.worker.tolist() == [0] * 6
    assert tr.cancelled.tolist() == [0, 1, 0, 1, 0, 1]
    assert tr.num_discarded == 3 and tr.started == 2 + 6 + 3


def test_accounting_identity_and_trace_fields():
    pol, obj = quad_policy("ringmaster", 16, lr=0.04, threshold=3)
    tr = simulate(pol, obj, make_time_model("paper", 16), horizon=40, seed=3)
    in_flight = 16
    assert tr.started == tr.num_accepted + tr.num_discarded + in_flight
    assert np.all(np.diff(tr.time) >= 0)
    assert np.all(tr.delay[tr.accepted] < 3)
    assert not np.isnan(tr.metric[tr.accepted]).any()
    counts, _ = tr.delay_histogram(bins=3)
    assert counts.sum() == tr.num_accepted


def test_deterministic_bit_for_bit_given_seed():
    def run(seed):
        pol, obj = quad_policy("ringmaster", 32, lr=0.04, threshold=4)
        obj.noise = 0.01
        return simulate(pol, obj, make_time_model("paper", 32), horizon=60, seed=seed), pol

    (a, pa), (b, pb), (c, _) = run(7), run(7), run(8)
    for field in ("time", "worker", "delay", "accepted", "cancelled"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert np.array_equal(a.metric, b.metric, equal_nan=True)
    assert torch.equal(pa.params[0], pb.params[0])
    assert not np.array_equal(a.time[:50], c.time[:50])


def test_infinite_threshold_ringmaster_equals_async():
    a, obj = quad_policy("async", 12, lr=0.02)
    r, _ = quad_policy("ringmaster", 12, lr=0.02)
    r._threshold = math.inf  # same object, R = infinity
    tm = make_time_model("paper", 12)
    ta, tr = simulate(a, obj, tm, horizon=30, seed=1), simulate(r, obj, tm, horizon=30, seed=1)
    assert np.array_equal(ta.time, tr.time) and np.array_equal(ta.metric, tr.metric, equal_nan=True)
    assert torch.equal(a.params[0], r.params[0])


def replay(trace, x0, grad, step):
    """Recompute the iterates from the trace's accepted events with a direct formula."""
    xs = [x0]
    for delay, acc in zip(trace.delay, trace.accepted):
        if acc:
            xs.append(step(xs[-1], grad(xs[len(xs) - 1 - delay])))
    return xs[-1]


def test_ringmaster_asgd_matches_direct_formula_on_least_squares():
    obj = LeastSquares.random(40, 6, seed=0, batch=40)  # full batch: deterministic gradients
    pol = make_policy("ringmaster_asgd", obj.initial_params(), num_workers=5, lr=0.5, threshold=3)
    tr = simulate(pol, obj, make_time_model("sqrt", 5), horizon=20, seed=2)
    M, y = obj.M.numpy(), obj.y.numpy()
    x = replay(tr, np.zeros(6), lambda z: M.T @ (M @ z - y) / 40, lambda x, g: x - 0.5 * g)
    assert tr.num_discarded > 0
    np.testing.assert_allclose(pol.params[0].numpy(), x, rtol=1e-10, atol=1e-12)


def test_ringmaster_l2_momentum_matches_direct_formula():
    beta, lr = 0.9, 0.05
    pol, obj = quad_policy("ringmaster", 6, lr=lr, threshold=3, momentum=beta, nesterov=False)
    tr = simulate(pol, obj, make_time_model("paper", 6), horizon=25, seed=4)
    m = np.zeros(8)

    def step(x, g):
        m[:] = beta * m + (1 - beta) * g
        return x - lr * m / np.linalg.norm(m)

    x = replay(tr, obj.initial_params()[0].numpy(), obj.full_gradient, step)
    np.testing.assert_allclose(pol.params[0].numpy(), x, rtol=1e-10, atol=1e-12)


def test_sync_rounds_cost_the_slowest_worker():
    pol, obj = quad_policy("sync", 3, lr=0.01)
    tr = simulate(pol, obj, fixed_times(1.0, 2.0, 4.0), horizon=12.5)
    assert tr.version[tr.accepted & (tr.worker == 2)].tolist() == [1, 2, 3]
    assert tr.time[np.nonzero(np.diff(tr.version))[0] + 1].tolist() == [4.0, 8.0, 12.0]


def test_rennala_restarts_everyone_each_iteration():
    pol, obj = quad_policy("rennala", 3, lr=0.01, batch=2)
    tr = simulate(pol, obj, fixed_times(1.0, 1.5, 10.0), horizon=4.0)
    # batches complete at 1.5, 3.0: the slow worker is cancelled each time and never arrives
    assert 2 not in tr.worker.tolist()
    assert tr.time[tr.version > np.concatenate([[0], tr.version[:-1]])].tolist() == [1.5, 3.0]


def test_dead_worker_stops_arriving_and_stalls_sync():
    tm = make_time_model("constant", 3, noise="none", deaths={1: 2.5})
    pol, obj = quad_policy("async", 3, lr=0.01)
    tr = simulate(pol, obj, tm, horizon=10)
    assert tr.time[tr.worker == 1].max() <= 2.5
    pol, obj = quad_policy("sync", 3, lr=0.01)
    tr = simulate(pol, obj, tm, horizon=10)
    assert tr.version.max() == 2 and tr.end_time < 10


def test_time_models():
    rng = np.random.default_rng(0)
    tm = make_time_model("paper", 4)
    assert np.allclose(tm.base, 1 + np.sqrt(np.arange(4))) and np.allclose(tm.scale, np.sqrt(np.arange(1, 5)))
    homo = make_time_model("paper", 4, heterogeneity=0.0).sampler(rng)(np.arange(4), 0.0)
    assert np.all(homo == 1.0)
    out = make_time_model("linear", 4, noise="none", outlier=(0, 10.0))
    assert out.base.tolist() == [10.0, 2.0, 3.0, 4.0]
    for noise in ("exponential", "pareto", "halfnormal"):
        draws = make_time_model("constant", 2, noise=noise, noise_scale=1.0).sampler(rng)(np.zeros(5000, dtype=int), 0.0)
        assert np.all(draws >= 1.0) and draws.std() > 0.1
    with pytest.raises(ValueError, match="time model"):
        make_time_model("bogus", 4)
    with pytest.raises(ValueError, match="num_workers"):
        make_time_model("paper", 0)
    with pytest.raises(ValueError, match="heterogeneity"):
        make_time_model("paper", 4, heterogeneity=float("nan"))


def test_module_objective_trains():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    X = torch.randn(256, 4)
    Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])

    def batches():
        gen = torch.Generator().manual_seed(1)
        while True:
            idx = torch.randint(0, 256, (16,), generator=gen)
            yield X[idx], Y[idx]

    obj = ModuleObjective(net, torch.nn.functional.mse_loss, batches(), (X, Y))
    groups = [{"params": [p], "norm": "spectral" if p.dim() == 2 else "l2"} for p in obj.initial_params()]
    pol = make_policy("ringmaster", groups, num_workers=4, lr=0.02, threshold=2)
    tr = simulate(pol, obj, make_time_model("sqrt", 4), horizon=60, seed=0, record_every=5)
    assert tr.final_metric() < 0.5 * tr.initial_metric


def test_muon_on_a_vector_is_0696_l2():
    d = 1729
    assert muon_vector_gain(d) == pytest.approx(0.696, abs=5e-4)
    v = torch.randn(1, d, dtype=torch.float64)
    from ringmaster_kernels import norms

    spectral = norms.lmo(v, "spectral", 1.0, coefficients="quintic", steps=5)
    torch.testing.assert_close(spectral, muon_vector_gain(d) * norms.lmo(v, "l2", 1.0), rtol=2e-5, atol=1e-8)  # NS in fp32


def test_spectral_row_run_equals_l2_gain_run():
    small = QuadraticExperiment(workers=8, dim=16, horizon=15)
    a = small.run("ringmaster", {"lr": 0.04, "threshold": 3}, seed=0)
    b = QuadraticExperiment(workers=8, dim=16, horizon=15, norm="spectral").run("ringmaster", {"lr": 0.04, "threshold": 3}, seed=0)
    assert np.array_equal(a.time, b.time)
    np.testing.assert_allclose(a.metric, b.metric, rtol=1e-5)


def test_authors_harness_facts_n512():
    """Their defaults (gamma 0.04, R 6) on n=512, d=256: 1e-2 at ~342, 1e-4 at ~450, >98% discarded."""
    exp = QuadraticExperiment(workers=512, dim=256, horizon=600)
    tr = exp.run("ringmaster", {"lr": 0.04, "threshold": 6}, seed=0)
    assert 300 < tr.time_to_target(1e-2 * tr.initial_metric) < 390
    assert 400 < tr.time_to_target(1e-4 * tr.initial_metric) < 520
    assert tr.num_discarded / tr.started > 0.98


@pytest.mark.parametrize("field, value", [
    ("workers", 0), ("horizon", -1.0), ("target", 0.0), ("norm", "bogus"), ("time_model", "bogus"),
    ("heterogeneity", float("nan")),
])
def test_bad_experiment_configuration(field, value):
    with pytest.raises(ValueError, match=field.replace("_", " ") if field == "time_model" else field):
        QuadraticExperiment(**{field: value}).validate()


def test_simulate_rejects_mismatched_workers_and_bad_horizon():
    pol, obj = quad_policy("async", 3, lr=0.01)
    with pytest.raises(ValueError, match="num_workers"):
        simulate(pol, obj, fixed_times(1.0, 2.0), horizon=5)
    with pytest.raises(ValueError, match="horizon"):
        simulate(pol, obj, fixed_times(1.0, 2.0, 3.0), horizon=float("nan"))


def test_cli_quadratic_json(capsys):
    rc = main(["simulate", "quadratic", "--workers", "24", "--dim", "16", "--horizon", "40", "--json", "--target", "1e-2"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"target", "methods"} and out["target"] == 1e-2
    assert set(out["methods"]) == {"ringmaster", "ringmaster_pa", "sync", "async", "delay_adaptive", "rennala"}
    for rec in out["methods"].values():
        assert set(rec) == {"final_grad_norm_sq", "time_to_target", "accepted", "discarded"}
        assert rec["accepted"] > 0 and math.isfinite(rec["final_grad_norm_sq"])


def test_cli_quadratic_overrides_carry_params_and_plot(capsys, tmp_path):
    png = tmp_path / "q.png"
    rc = main(["simulate", "quadratic", "--workers", "16", "--dim", "8", "--horizon", "20", "--json",
               "--method", "ringmaster", "--method", "rennala", "--lr", "0.2", "--threshold", "4", "--batch", "2",
               "--plot", str(png)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["methods"]["ringmaster"]["params"]["threshold"] == 4
    assert out["methods"]["rennala"]["params"] == {"lr": 0.2, "batch": 2, "norm": "l2", "momentum": 0.95}
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv, match", [
    (["--workers", "0"], "workers"),
    (["--lr", "-1", "--method", "sync"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--threshold", "0", "--method", "ringmaster"], "threshold"),
    (["--threshold", "3", "--method", "sync"], "threshold"),
])
def test_cli_bad_configuration(capsys, argv, match):
    assert main(["simulate", "quadratic", "--horizon", "5", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_sweep_json(capsys):
    rc = main(["simulate", "sweep", "--workers", "8", "--dim", "8", "--horizon", "50", "--levels", "0,1",
               "--target", "1e-1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["heterogeneity"] for r in out["levels"]] == [0.0, 1.0]
    for r in out["levels"]:
        assert set(r) == {"heterogeneity", "speedup_vs_sync", "speedup_vs_best_baseline"}


def test_ringmaster_R1_is_rennala_B1():
    """Both restart every worker after each update: the same run, event for event."""
    exp = QuadraticExperiment(workers=16, dim=16, horizon=40)
    a = exp.run("ringmaster", {"lr": 0.2, "threshold": 1}, seed=5)
    b = exp.run("rennala", {"lr": 0.2, "batch": 1}, seed=5)
    assert np.array_equal(a.time, b.time) and np.array_equal(a.metric, b.metric, equal_nan=True)
    assert a.num_discarded == b.num_discarded and a.started == b.started


def test_sampler_draws_do_not_depend_on_block_boundaries():
    tm = make_time_model("paper", 5)
    one_block = tm.sampler(np.random.default_rng(3), block=1000)
    tiny_blocks = tm.sampler(np.random.default_rng(3), block=3)
    calls = [np.arange(5), 2, np.array([0, 4]), 1, np.arange(5), 3]
    for w in calls:
        np.testing.assert_array_equal(one_block(w, 0.0), tiny_blocks(w, 0.0))
