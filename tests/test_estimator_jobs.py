"""MVR/HCM jobs in the simulator: objectives give both evaluations on one minibatch (the
quadratic's Hessian exactly), and each job reads its version and the version before."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ringmaster_kernels.optim.policies import make_policy
from ringmaster_kernels.runtime.objectives import LeastSquares, TridiagonalQuadratic, hessian_vector_product
from ringmaster_kernels.runtime.simulator import simulate
from ringmaster_kernels.runtime.time_models import TimeModel


def _quadratic_loss(obj, x):
    A = obj.hessian()
    b = torch.zeros(obj.dim, dtype=torch.float64)
    b[0] = -obj.scale
    v = x.reshape(-1)
    return 0.5 * v @ A @ v - b @ v


def test_quadratic_hessian_is_exact_and_matches_double_backward():
    obj = TridiagonalQuadratic(7)
    A = obj.hessian()
    assert torch.equal(A, A.T) and torch.allclose(torch.diagonal(A), torch.full((7,), 0.5, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    x, d = (torch.randn(7, generator=gen, dtype=torch.float64) for _ in range(2))
    leaf = x.clone().requires_grad_(True)
    autograd_hv = hessian_vector_product(_quadratic_loss(obj, leaf), [leaf], [d])[0]
    hv = obj.hessian_vector([x], [d], None)[0]
    torch.testing.assert_close(hv, A @ d, rtol=0, atol=1e-15)
    torch.testing.assert_close(hv, autograd_hv, rtol=1e-14, atol=1e-14)
    # and the gradient is that loss's gradient
    g = torch.autograd.grad(_quadratic_loss(obj, leaf), leaf)[0]
    torch.testing.assert_close(obj.gradient_at([x], None)[0], g, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("job", ("previous_gradient", "hvp:current", "hvp:random"))
def test_quadratic_job_uses_one_noise_draw(job):
    obj = TridiagonalQuadratic(6, noise=0.5)
    x, prev = [torch.randn(6, dtype=torch.float64)], [torch.randn(6, dtype=torch.float64)]
    out = obj.job_gradient(x, prev, job, np.random.default_rng(3))
    z = np.random.default_rng(3).standard_normal()
    torch.testing.assert_close(out[0], obj.gradient_at(x, z)[0])
    A = obj.hessian()
    if job == "previous_gradient":  # same z: the difference is A (x - prev), noise-free
        torch.testing.assert_close(out[0] - out[1], A @ (x[0] - prev[0]), rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(out[1], A @ (x[0] - prev[0]), rtol=1e-12, atol=1e-12)


def test_least_squares_hvp_is_its_minibatch_hessian():
    obj = LeastSquares.random(20, 5, seed=1, batch=4)
    x, prev = [torch.randn(5, dtype=torch.float64)], [torch.randn(5, dtype=torch.float64)]
    out = obj.job_gradient(x, prev, "hvp:current", np.random.default_rng(0))
    rows = obj.sample(np.random.default_rng(0))
    Mb = obj.M[rows]
    torch.testing.assert_close(out[1], Mb.T @ Mb @ (x[0] - prev[0]) / 4)
    torch.testing.assert_close(out[0], obj.gradient_at(x, rows)[0])


def test_bad_job_and_objectives_without_support():
    obj = TridiagonalQuadratic(4)
    with pytest.raises(ValueError, match="job must be"):
        obj.job_gradient(obj.initial_params(), obj.initial_params(), "hvp", np.random.default_rng(0))


@pytest.mark.parametrize("estimator", ("mvr1", "mvr2", "hcm1", "hcm2"))
def test_simulated_jobs_read_their_version_and_the_one_before(estimator):
    """Spy on the rule (parameters before each update) and on the objective (what each job
    was handed): every job started at version v gets x^v and x^{v-1} (x^0 at v = 0)."""
    obj = TridiagonalQuadratic(6, noise=0.01)
    policy = make_policy("ringmaster", [{"params": obj.initial_params(), "momentum_estimator": estimator}],
                         num_workers=3, lr=0.05, norm="l2", momentum=0.9, threshold=3)
    history = [policy.params[0].clone()]
    apply = policy.rule.apply

    def spy_apply(grads, version, **kw):
        apply(grads, version, **kw)
        history.append(policy.params[0].clone())

    policy.rule.apply = spy_apply
    seen = []
    job_gradient = obj.job_gradient

    def spy_job(params, previous, job, rng, worker=0):
        seen.append((params[0].clone(), previous[0].clone(), job))
        return job_gradient(params, previous, job, rng, worker)

    obj.job_gradient = spy_job
    on_gradient = policy.on_gradient
    versions = []

    def spy_on_gradient(worker, version, grad):
        versions.append(version)
        return on_gradient(worker, version, grad)

    policy.on_gradient = spy_on_gradient
    trace = simulate(policy, obj, TimeModel(np.array([1.0, 1.7, 2.9]), 0.0), horizon=30.0, seed=0)
    assert trace.num_accepted > 10 and len(seen) == trace.num_accepted  # discarded jobs are never computed
    used = [v for v, accepted in zip(versions, trace.accepted) if accepted]
    expected_job = {"mvr1": "previous_gradient", "mvr2": "previous_gradient", "hcm1": "hvp:current", "hcm2": "hvp:random"}
    for (x, prev, job), v in zip(seen, used):
        assert job == expected_job[estimator]
        assert torch.equal(x, history[v])
        assert torch.equal(prev, history[max(v - 1, 0)])


def test_simulated_mvr_run_is_reproducible():
    def run():
        obj = TridiagonalQuadratic(16, noise=0.01)
        policy = make_policy("ringmaster", [{"params": obj.initial_params(), "momentum_estimator": "mvr1"}],
                             num_workers=4, lr=0.05, norm="l2", momentum=0.9, threshold=2)
        return simulate(policy, obj, TimeModel(np.array([1.0, 1.5, 2.0, 4.0]), 0.3), horizon=40.0, seed=5)

    a, b = run(), run()
    assert np.array_equal(a.metric, b.metric, equal_nan=True) and np.array_equal(a.delay, b.delay)


# ---------------------------------------------------------------------- the threaded runtime
class _QuadraticTask:
    """loss = c/2 ||w||^2 + <z, w> with a fresh z per batch: the gradient difference between
    two points on ONE batch is c (w - w') exactly, whatever z."""

    c = 3.0

    def build_model(self):
        return torch.nn.Linear(4, 1, bias=False)

    def group_of(self, name):
        return {"norm": "l2", "momentum_estimator": "mvr1"}

    def sample(self, batch_size, generator, device):
        return torch.randn(4, generator=generator).to(device)

    def loss(self, model, z):
        w = model.weight.reshape(-1)
        return 0.5 * self.c * (w * w).sum() + (z * w).sum()

    def evaluate(self, model):
        return float((model.weight.detach() ** 2).sum())


def test_threaded_mvr_jobs_compute_both_gradients_on_one_batch():
    from ringmaster_kernels.runtime.server import Server
    from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker

    task = _QuadraticTask()
    trainer = AsyncTrainer(task, [LocalWorker(batch_size=1, compute_time=t) for t in (0.002, 0.005)], "ringmaster",
                           {"lr": 0.05, "threshold": 3, "momentum": 0.9}, torch_threads=1)
    published, delivered = {}, []
    publish, deliver = Server.publish, Server.deliver

    def spy_publish(self):
        publish(self)
        published[self.published[0]] = self.published[1].clone()

    def spy_deliver(self, worker, version, grad, loss, device):
        delivered.append((version, grad.clone()))
        return deliver(self, worker, version, grad, loss, device)

    Server.publish, Server.deliver = spy_publish, spy_deliver
    try:
        summary = trainer.run(max_updates=20, max_time=30.0)
    finally:
        Server.publish, Server.deliver = publish, deliver
    assert summary["updates"] >= 20 and len(delivered) >= 20
    n = 4
    assert torch.equal(published[0][:n], published[0][n:])  # x^{-1} = x^0
    for v in range(1, 20):
        assert torch.equal(published[v][n:], published[v - 1][:n])  # the server's one previous copy
    for v, grad in delivered:
        x, prev = published[v][:n], published[v][n:]
        torch.testing.assert_close(grad[:n] - grad[n:], task.c * (x - prev), rtol=1e-5, atol=1e-6)
    assert float((trainer.master ** 2).sum()) < float((published[0][:n] ** 2).sum())


def test_threaded_runtime_refuses_hcm_jobs():
    from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker

    task = _QuadraticTask()
    task.group_of = lambda name: {"norm": "l2", "momentum_estimator": "hcm1"}
    trainer = AsyncTrainer(task, [LocalWorker(batch_size=1)], "ringmaster", {"lr": 0.05, "threshold": 3},
                           torch_threads=1)
    with pytest.raises(ValueError, match="HCM estimators under the simulator"):
        trainer.run(max_updates=2)
