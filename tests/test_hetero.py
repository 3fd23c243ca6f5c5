"""Heterogeneous data: per-worker objectives, and the methods that remove the frequency bias."""
import numpy as np
import pytest
import torch

from ringmaster_kernels.cli import main
from ringmaster_kernels.optim.policies import make_policy
from ringmaster_kernels.runtime.hetero import (
    HeterogeneousModuleObjective,
    HeterogeneousQuadratic,
    compare,
    split_batches,
)


def test_quadratic_worker_gradients_average_to_the_global_gradient():
    obj = HeterogeneousQuadratic(dim=7, num_workers=6, zeta=3.0, noise=0.0)
    x = np.random.default_rng(0).standard_normal(7)
    per_worker = np.stack([obj.worker_gradient(x, i) for i in range(6)])
    np.testing.assert_allclose(per_worker.mean(axis=0), obj.full_gradient(x), rtol=0, atol=1e-15)
    assert np.abs(per_worker - obj.full_gradient(x)).max() > 1.0  # and they do differ
    rng = np.random.default_rng(1)
    g = obj.gradient([torch.from_numpy(x)], rng, worker=5)[0].numpy()
    np.testing.assert_array_equal(g, obj.worker_gradient(x, 5))
    with pytest.raises(ValueError, match="worker"):
        obj.gradient([torch.from_numpy(x)], rng, worker=6)


def test_module_shards_average_to_the_global_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    X, Y = torch.randn(24, 3, dtype=torch.float64), torch.randn(24, 1, dtype=torch.float64)
    streams = split_batches(X, Y, num_workers=4, batch=6, by=Y[:, 0])  # label-skewed shards of 6 rows
    obj = HeterogeneousModuleObjective(net, torch.nn.functional.mse_loss, streams, (X, Y))
    params = obj.initial_params()
    rng = np.random.default_rng(0)
    per_worker = [obj.gradient(params, rng, worker=i) for i in range(4)]  # a full shard each
    leaves = [p.detach().requires_grad_(True) for p in params]
    full = torch.autograd.grad(obj._loss(leaves, (X, Y)), leaves)
    for k, f in enumerate(full):
        torch.testing.assert_close(sum(g[k] for g in per_worker) / 4, f, rtol=1e-12, atol=1e-14)
    # skewed: worker 0 holds the smallest labels
    x0, y0 = next(streams[0])
    assert y0.max() <= torch.sort(Y[:, 0]).values[5]
    with pytest.raises(ValueError, match="batch"):
        split_batches(X, Y, num_workers=4, batch=7)


def test_bias_point_is_where_asgd_stalls_and_the_three_reach_the_global_target():
    res = compare({m: {"lr": 0.2} for m in ("asgd", "rescaled_asgd", "ringleader", "malenia")},
                  workers=4, dim=3, zeta=1.0, noise=0.0, horizon=500, time_model="linear", seeds=[0])
    bias = res["bias_grad_norm"]
    assert bias > 0.3
    tail = {m: r["seeds"][0]["tail_median"] for m, r in res["methods"].items()}
    assert tail["asgd"] == pytest.approx(bias, rel=0.1)  # the frequency-weighted stationary point
    for m in ("rescaled_asgd", "ringleader", "malenia"):
        assert tail[m] < 0.1 * bias, m


def test_ringleader_rounds_fill_then_update_once_per_worker():
    x = torch.zeros(2, dtype=torch.float64)
    pol = make_policy("ringleader", [x], num_workers=2, lr=1.0)
    g = {k: torch.tensor(v, dtype=torch.float64) for k, v in {"a": [1.0, 0], "b": [3.0, 0], "c": [0, 2.0], "d": [0, 4.0]}.items()}
    assert not pol.on_gradient(0, 0, g["a"]).advanced  # phase 1
    assert not pol.on_gradient(0, 0, g["b"]).advanced  # still phase 1: worker 1 has no entry
    assert not pol.on_gradient(1, 0, g["c"]).advanced  # table full; the completing arrival makes no update
    d = pol.on_gradient(1, 0, g["d"])  # worker 1's update: table 1 = (c + d)/2, table 0 = (a + b)/2
    assert d.advanced and d.version == 1
    torch.testing.assert_close(pol.params[0], -0.5 * (torch.tensor([2.0, 0]) + torch.tensor([0, 3.0])).double())
    assert not pol.on_gradient(1, 1, g["a"]).advanced  # worker 1 already updated: to the buffer
    d = pol.on_gradient(0, 0, g["c"])  # worker 0's update ends the round
    assert d.advanced and d.version == 2 and pol.updated.sum() == 0
    assert pol.counts.tolist() == [0, 1]  # the buffer is the new table: phase 1 again
    assert not pol.on_gradient(1, 2, g["b"]).advanced


def test_malenia_waits_for_everyone_then_averages_per_worker_means():
    pol = make_policy("malenia", [torch.zeros(2, dtype=torch.float64)], num_workers=2, lr=1.0)
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in ([2.0, 0], [4.0, 0], [0, 2.0]))
    assert not pol.on_gradient(0, 0, a).advanced and not pol.on_gradient(0, 0, b).advanced
    d = pol.on_gradient(1, 0, c)
    assert d.advanced and d.cancel_before == 1
    torch.testing.assert_close(pol.params[0], torch.tensor([-1.5, -1.0], dtype=torch.float64))
    assert not pol.on_gradient(0, 0, a).accepted  # computed at the old point
    assert pol.remove_worker(1) is None  # nothing collected yet
    assert pol.on_gradient(0, 1, a).advanced  # worker 1 is gone: worker 0 alone completes the round


def test_rescaled_asgd_step_factors_known_and_online():
    known = make_policy("rescaled_asgd", [torch.zeros(1, dtype=torch.float64)], num_workers=3, lr=1.0,
                        worker_times=[1.0, 2.0, 4.0])
    assert [known.step_factor(i) for i in range(3)] == [0.25, 0.5, 1.0]
    known.on_gradient(0, 0, torch.ones(1, dtype=torch.float64))
    assert known.params[0].item() == -0.25
    online = make_policy("rescaled_asgd", [torch.zeros(1, dtype=torch.float64)], num_workers=3, lr=1.0)
    for w, t in [(0, 1.0), (0, 3.0), (2, 8.0)]:
        online.observe_time(w, t)
    assert online.step_factor(0) == 0.25 and online.step_factor(2) == 1.0 and online.step_factor(1) == 1.0
    with pytest.raises(ValueError, match="worker_times"):
        make_policy("rescaled_asgd", [torch.zeros(1)], num_workers=3, lr=1.0, worker_times=[1.0, 2.0])


def test_cli_hetero_data_table_and_plot(capsys, tmp_path):
    png = tmp_path / "h.png"
    rc = main(["simulate", "hetero-data", "--workers", "4", "--dim", "3", "--horizon", "300", "--seeds", "2",
               "--method", "asgd", "--method", "ringleader", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:4]}
    assert rows["asgd"].endswith("bias point") and rows["ringleader"].endswith("stationary point of f")
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("method, key, bad", [
    ("ringleader", "sums", [[torch.zeros(5)], None]),
    ("ringleader", "counts", [1, -1]),
    ("ringleader", "alive", [True]),
    ("ringleader", "buffer", [None]),
    ("ringleader", "buffer_counts", [0.5, 0]),
    ("ringleader", "updated", [1, 0]),
    ("malenia", "sums", ["x", None]),
    ("rescaled_asgd", "time_sum", [1.0, float("nan")]),
    ("rescaled_asgd", "time_count", [1.0]),
])
def test_a_damaged_state_is_refused_before_anything_changes(method, key, bad):
    def build():
        return make_policy(method, [torch.zeros(2, dtype=torch.float64)], num_workers=2, lr=0.1)

    pol = build()
    for w in (0, 1, 0):
        pol.on_gradient(w, pol.version, torch.ones(2, dtype=torch.float64))
    state = pol.state_dict()
    state[key] = bad
    fresh = build()
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=key):
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    assert fresh.counters() == before["counters"]
    assert after[key] == before[key]  # a fresh policy's tables hold no tensors: plain equality holds
