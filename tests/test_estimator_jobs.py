"""MVR/HCM jobs in the simulator: objectives give both evaluations on one minibatch (the
quadratic's Hessian exactly), and each job reads its version and the version before."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from exact_jobs import ExactQuadraticTask, spy_run

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
def _check_accounting(summary):
    t = summary["totals"]
    assert t["pushed"] == summary["queue_pushed"] == t["accepted"] + t["discarded"] + t["in_flight"]
    assert t["discarded"] == t["stale"] + t["nonfinite"] + t["dropped"]
    assert summary["accounting_ok"]


@pytest.mark.parametrize("estimator", ("mvr1", "hcm1", "hcm2"))
def test_threaded_jobs_compute_their_extra_on_one_batch(estimator):
    """On ``ExactQuadraticTask`` (H = c I whatever the batch) a job at version v returns
    g - g_prev = c (x^v - x^{v-1}) (MVR) or H d = c (x^v - x^{v-1}) (HCM), exactly up to fp32."""
    from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker

    task = ExactQuadraticTask(estimator)
    trainer = AsyncTrainer(task, [LocalWorker(batch_size=1, compute_time=t) for t in (0.002, 0.005)], "ringmaster",
                           {"lr": 0.05, "threshold": 3, "momentum": 0.9}, torch_threads=1)
    summary, published, delivered = spy_run(trainer, max_updates=20, max_time=30.0)
    assert summary["updates"] >= 20 and len(delivered) >= 20
    _check_accounting(summary)
    n = 4
    assert torch.equal(published[0][:n], published[0][n:])  # x^{-1} = x^0
    for v in range(1, 20):
        assert torch.equal(published[v][n:], published[v - 1][:n])  # the server's one previous copy
    moved = 0
    for v, grad in delivered:
        x, prev = published[v][:n], published[v][n:]
        extra = grad[:n] - grad[n:] if estimator == "mvr1" else grad[n:]
        torch.testing.assert_close(extra, task.c * (x - prev), rtol=1e-5, atol=1e-6)
        moved += bool((x != prev).any())
    assert moved >= 10  # most jobs had a nonzero d: the check is not on zeros
    assert float((trainer.master ** 2).sum()) < float((published[0][:n] ** 2).sum())


# ---------------------------------------------------------------------- HCM jobs of one worker
class _LeastSquaresTask:
    """mean((X w + b - y)^2) on fresh Gaussian rows: the Hessian of a batch is exactly
    2/B [X 1]^T [X 1] (constant in the parameters, different per batch)."""

    dim = 3

    def build_model(self):
        return torch.nn.Linear(self.dim, 1)

    def group_of(self, name):
        return {"norm": "l2", "momentum_estimator": "hcm1"}

    def sample(self, batch_size, generator, device):
        x = torch.randn(batch_size, self.dim, generator=generator)
        return x.to(device), torch.randn(batch_size, generator=generator).to(device)

    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y).square().mean()

    def evaluate(self, model):
        return 0.0


class _TanhTask(_LeastSquaresTask):
    """A small tanh MLP on the same data: a Hessian that changes with the parameters."""

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(self.dim, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _bound_worker(task, accum_steps=1, batch_size=4, seed=0):
    """A LocalWorker bound as a trainer binds it (its model's parameters views of the flat buffers)."""
    from types import SimpleNamespace

    from ringmaster_kernels.runtime.layout import param_layout
    from ringmaster_kernels.runtime.trainer import LocalWorker

    torch.manual_seed(seed)
    layout, _ = param_layout(task, task.build_model())
    worker = LocalWorker(batch_size=batch_size, accum_steps=accum_steps)
    worker.bind(SimpleNamespace(task=task, layout=layout, seed=seed, num_workers=1), 0)
    worker.setup()
    return worker, layout


def _job(x, prev, extra):
    from ringmaster_kernels.runtime.trainer import Job

    return Job(0, 0, 1, x, None, cancelled=lambda: False, beat=lambda: None, sleep_until=lambda t: True,
               extra=extra, previous=prev)


def _clone(generator):
    twin = torch.Generator()
    twin.set_state(generator.get_state())
    return twin


def _points(numel, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen)
    return x, x - 0.3 * torch.randn(numel, generator=gen)


def _run_hcm(task, extra, accum_steps):
    """One HCM job of a fresh worker, and what a float64 reference needs: the job's
    micro-batches and its s (both from clones of the worker's generators), x and x_prev."""
    worker, layout = _bound_worker(task, accum_steps)
    x, prev = _points(layout.numel)
    data, hvp = _clone(worker.generator), _clone(worker.hvp_generator)
    g_and_e, loss = worker.compute(_job(x, prev, extra))
    batches = [tuple(t.double() for t in task.sample(worker.batch_size, data, "cpu")) for _ in range(accum_steps)]
    s = float(torch.rand((), generator=hvp)) if extra == "hvp:random" else 1.0
    assert torch.equal(worker.hvp_generator.get_state(), hvp.get_state())  # one draw per hcm2 job, none for hcm1
    return g_and_e.clone(), loss, layout, batches, x.double(), prev.double(), s


def _mean_loss(task, layout, flat, batches):
    """The job's loss (mean over micro-batches) as a function of the flat float64 parameters."""
    model = task.build_model().double()
    params = dict(zip(layout.names, layout.views(flat)))
    return sum(task.loss(lambda inp: torch.func.functional_call(model, params, (inp,)), b) for b in batches) / len(batches)


@pytest.mark.parametrize("extra", ("hvp:current", "hvp:random"))
@pytest.mark.parametrize("accum_steps", (1, 3))
def test_worker_hcm_job_on_least_squares_is_the_exact_hessian_times_d(extra, accum_steps):
    task = _LeastSquaresTask()
    out, loss, layout, batches, x, prev, _ = _run_hcm(task, extra, accum_steps)
    assert layout.names == ["weight", "bias"]
    n = layout.numel
    d = x - prev
    H = torch.zeros(n, n, dtype=torch.float64)
    g = torch.zeros(n, dtype=torch.float64)
    for inputs, y in batches:  # [X 1]: the weight's columns, then the bias's, as the layout lays them out
        A = torch.cat([inputs, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
        H += 2 * A.T @ A / len(y) / accum_steps
        g += 2 * A.T @ (A @ x - y) / len(y) / accum_steps
    assert float(d.abs().min()) > 0
    torch.testing.assert_close(out[n:].double(), H @ d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:n].double(), g, rtol=1e-5, atol=1e-5)  # the gradient at x_v
    assert loss == pytest.approx(float(_mean_loss(task, layout, x, batches)), rel=1e-5)


@pytest.mark.parametrize("extra", ("hvp:current", "hvp:random"))
@pytest.mark.parametrize("accum_steps", (1, 3))
def test_worker_hcm_job_on_a_tanh_mlp_matches_autograd_and_finite_differences(extra, accum_steps):
    """H(p) d with p = x_v (hcm1) or x_{v-1} + s d (hcm2, s from the worker's generator),
    averaged over the micro-batches: against torch.autograd.functional.hvp and against a
    central difference of float64 gradients."""
    task = _TanhTask()
    out, _, layout, batches, x, prev, s = _run_hcm(task, extra, accum_steps)
    n = layout.numel
    d = x - prev
    p = prev + s * d
    f = lambda flat: _mean_loss(task, layout, flat, batches)  # noqa: E731
    _, reference = torch.autograd.functional.hvp(f, p, d)
    grad = lambda flat: torch.autograd.functional.jacobian(f, flat)  # noqa: E731
    eps = 1e-5
    finite = (grad(p + eps * d) - grad(p - eps * d)) / (2 * eps)
    torch.testing.assert_close(finite, reference, rtol=1e-6, atol=1e-8)  # the two references agree
    torch.testing.assert_close(out[n:].double(), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:n].double(), grad(x), rtol=1e-4, atol=1e-5)  # the gradient at x_v, not at p
    if extra == "hvp:random":  # the Hessian moves: H(p) d differs from H(x_v) d here
        _, at_x = torch.autograd.functional.hvp(f, x, d)
        assert float((at_x - reference).abs().max()) > 1e-3


def test_worker_hcm_job_on_the_tiny_gpt_runs_attention_twice_differentiable():
    """The task of ``ringmaster train``: SDPA's fused CPU kernel has no double backward;
    the worker's HVP runs it in the math backend and matches float64 double backward and
    a central difference (eps 1e-3: TinyGPT's cross-entropy runs in fp32, whose noise a
    smaller eps would amplify)."""
    from ringmaster_kernels.runtime.data import ByteData, stdlib_corpus
    from ringmaster_kernels.runtime.model import GPTConfig, GPTTask
    from ringmaster_kernels.runtime.objectives import twice_differentiable

    cfg = GPTConfig(d_model=16, n_layer=1, n_head=2, seq_len=16)
    task = GPTTask(cfg, ByteData(stdlib_corpus(50_000), cfg.seq_len), val_batches=1, val_batch_size=2)
    worker, layout = _bound_worker(task, batch_size=2)
    x, prev = _points(layout.numel)
    x, prev = 0.3 * x, 0.3 * prev
    data = _clone(worker.generator)
    out, _ = worker.compute(_job(x, prev, "hvp:current"))
    batch = task.sample(2, data, "cpu")
    model = task.build_model().double()

    def f(flat):
        params = dict(zip(layout.names, layout.views(flat)))
        return model.loss.__func__(lambda idx: torch.func.functional_call(model, params, (idx,)), *batch)

    x, d, eps = x.double(), (x - prev).double(), 1e-3
    with twice_differentiable():
        _, reference = torch.autograd.functional.hvp(f, x, d)
    grad = lambda flat: torch.autograd.functional.jacobian(f, flat)  # noqa: E731
    finite = (grad(x + eps * d) - grad(x - eps * d)) / (2 * eps)
    n = layout.numel
    assert float(reference.abs().max()) > 0.1
    torch.testing.assert_close(out[n:].double(), reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[n:].double(), finite, rtol=1e-3, atol=1e-4)


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class _OnceDifferentiableTask(_LeastSquaresTask):
    def loss(self, model, batch):
        x, y = batch
        return (_OnceDifferentiable.apply(model(x).squeeze(-1)) - y).square().mean()


def test_a_loss_without_double_backward_is_a_clear_error():
    from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker

    task = _OnceDifferentiableTask()
    worker, layout = _bound_worker(task)
    x, prev = _points(layout.numel)
    with pytest.raises(ValueError, match="task.loss, and the loss has no double backward: .*once_differentiable"):
        worker.compute(_job(x, prev, "hvp:current"))
    out, _ = worker.compute(_job(x, prev, "previous_gradient"))  # MVR needs no double backward
    assert torch.isfinite(out).all()
    trainer = AsyncTrainer(task, [LocalWorker(batch_size=2) for _ in range(2)], "ringmaster",
                           {"lr": 0.05, "threshold": 3}, torch_threads=1)
    summary = trainer.run(max_time=30.0)
    assert summary["stop_reason"] == "all workers lost" and summary["updates"] == 0
    assert all("ValueError: an HCM job needs a Hessian-vector product" in f["error"] for f in summary["faults"])


def test_unknown_job_kinds_are_refused():
    from ringmaster_kernels.optim.update_rules import LMOMomentum
    from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker

    worker, layout = _bound_worker(_LeastSquaresTask())
    x, prev = _points(layout.numel)
    with pytest.raises(ValueError, match=r"job.extra: job must be None or one of .*hvp:random"):
        worker.compute(_job(x, prev, "hvp"))
    with pytest.raises(ValueError, match="job.previous"):
        worker.compute(_job(x, None, "hvp:current"))

    class Task(_LeastSquaresTask):
        def update_rule(self, model):
            rule = LMOMomentum(model.parameters(), lr=0.1, norm="l2", momentum_estimator="hcm1")
            rule.job = "hessian"
            return rule

    trainer = AsyncTrainer(Task(), [LocalWorker(batch_size=2)], "ringmaster", {"threshold": 3}, torch_threads=1)
    with pytest.raises(ValueError, match="policy.rule.job: job must be None or one of"):
        trainer.run(max_updates=2)


def test_threaded_hcm2_resumes_with_each_workers_generator(tmp_path):
    """hcm2's s comes from each worker's own generator, saved in the checkpoint: a resumed
    trainer's workers continue from the states the first run's workers ended with."""
    from ringmaster_kernels.runtime import checkpoint
    from ringmaster_kernels.runtime.trainer import AsyncTrainer, LocalWorker

    task = _TanhTask()
    task.group_of = lambda name: {"norm": "l2", "momentum_estimator": "hcm2"}
    path = tmp_path / "ck.pt"

    def trainer():
        return AsyncTrainer(task, [LocalWorker(batch_size=4, compute_time=t) for t in (0.002, 0.005)], "ringmaster",
                            {"lr": 0.05, "threshold": 3, "momentum": 0.9}, torch_threads=1, checkpoint_path=path,
                            checkpoint_every=5)

    first = trainer()
    seeded = [w.hvp_generator.get_state() for w in first.workers]
    assert not torch.equal(*seeded)  # one generator per worker
    s1 = first.run(max_updates=12)
    _check_accounting(s1)
    ended = [w.hvp_generator.get_state() for w in first.workers]
    assert not any(torch.equal(a, b) for a, b in zip(seeded, ended))  # every worker drew s for its jobs
    saved = checkpoint.read(str(path))["workers"]
    assert all(torch.equal(w["hvp_generator"], e) for w, e in zip(saved, ended))
    second = trainer()
    assert all(torch.equal(w.hvp_generator.get_state(), s) for w, s in zip(second.workers, seeded))
    second.load_checkpoint(path)
    assert all(torch.equal(w.hvp_generator.get_state(), e) for w, e in zip(second.workers, ended))
    s2 = second.run(max_updates=24)
    _check_accounting(s2)
    assert s2["version"] == 24 and s2["updates"] == 24 - s1["version"]
    assert not any(torch.equal(w.hvp_generator.get_state(), e) for w, e in zip(second.workers, ended))


def test_worker_state_without_an_hvp_generator_loads_and_a_bad_one_is_refused():
    worker, _ = _bound_worker(_LeastSquaresTask())
    state = worker.state_dict()
    assert set(state) == {"generator", "hvp_generator"}
    before = worker.hvp_generator.get_state()
    worker.load_state_dict({"generator": state["generator"]})  # saved before HCM jobs ran on threads
    assert torch.equal(worker.hvp_generator.get_state(), before)
    with pytest.raises(ValueError, match="hvp_generator"):
        worker.load_state_dict({**state, "hvp_generator": [1, 2]})


def test_an_op_without_double_backward_is_a_clear_error_not_a_zero_product():
    from ringmaster_kernels.runtime.objectives import gradient_and_hvp

    x = torch.randn(5, requires_grad=True)
    log_probs = torch.stack([x, -x], dim=-1).log_softmax(-1)[:, None]  # (T=5, N=1, C=2)
    loss = torch.nn.functional.ctc_loss(log_probs, torch.tensor([[1]]), torch.tensor([5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="the loss has no double backward: .*NotImplemented"):
        gradient_and_hvp(loss, [x], [torch.ones(5)])


def test_math_attention_stays_selected_while_any_thread_needs_it():
    """SDPA's backend switches are process-wide: a thread leaving its HVP must not give
    the fused kernels back to another thread still inside one."""
    import threading

    from ringmaster_kernels.runtime.objectives import twice_differentiable

    flash = torch.backends.cuda.flash_sdp_enabled
    assert flash()
    inside, leave = threading.Event(), threading.Event()

    def other():
        with twice_differentiable():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with twice_differentiable():  # in first, out first (torch's own sdpa_kernel restores here)
        assert not flash()
        thread.start()
        assert inside.wait(10)
    assert not flash()  # the other thread is still inside
    leave.set()
    thread.join(10)
    assert flash()
