"""Momentum estimators and step-size rules against float64 loops written from the formulas
(../shared/ALGORITHMS.md), their reductions, the Hessian-vector product, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from ringmaster_kernels import norms
from ringmaster_kernels.optim import estimators, step_rules
from ringmaster_kernels.optim.gluon import Gluon

NORMS = ("spectral", "sign", "l2", "colnorm", "rownorm", "l1", "bias_rms")
SHAPE = (3, 5)


def lmo64(u, norm):
    """The float64 LMO (Newton–Schulz in float64 too, as the optimizers below run it)."""
    options = {"compute_dtype": torch.float64} if norm == "spectral" else {}
    return norms.lmo(u, norm, 1.0, backend="torch", **options)


class Problem:
    """f(x; xi) = sum(w * cos(x)) + <xi, x> per parameter: a non-quadratic loss with a
    closed-form gradient -w sin(x) + xi and Hessian diag(-w cos(x)); xi is the step's batch."""

    def __init__(self, seed: int, steps: int, linear: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x0 = [torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(2)]
        self.w = [torch.zeros(SHAPE, dtype=torch.float64) if linear else 1 + torch.rand(SHAPE, generator=gen, dtype=torch.float64)
                  for _ in range(2)]
        self.xi = [[torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(steps)]

    def loss(self, xs, k):
        return sum((w * torch.cos(x)).sum() + (xi * x).sum() for x, w, xi in zip(xs, self.w, self.xi[k]))

    def grad(self, xs, k):
        return [-w * torch.sin(x) + xi for x, w, xi in zip(xs, self.w, self.xi[k])]

    def hess(self, xs, d):
        return [-w * torch.cos(x) * di for x, w, di in zip(xs, self.w, d)]


def float64_loop(name, norm, problem, steps, *, lr, beta, q, seed):
    """The estimator's formulas, literally, in float64 (s ~ U(0,1) drawn as Gluon draws it)."""
    torch.manual_seed(seed)
    x = [t.clone() for t in problem.x0]
    m = [torch.zeros_like(t) for t in x]
    h, prev = None, None
    for k in range(steps):
        g = problem.grad(x, k)
        if prev is None:
            gp, hv = g, [torch.zeros_like(t) for t in x]
        else:
            gp = problem.grad(prev, k)
            d = [a - b for a, b in zip(x, prev)]
            if name == "hcm1":
                hv = problem.hess(x, d)
            elif name == "hcm2":
                s = float(torch.rand(()))
                hv = problem.hess([b + s * di for b, di in zip(prev, d)], d)
        if name in ("mvr2", "mvr3"):
            h = list(g) if h is None else [gi + (1 - q) * (hi - gpi) for gi, hi, gpi in zip(g, h, gp)]
        new = []
        for i in range(len(x)):
            if name in ("ema", "nesterov"):
                m[i] = beta * m[i] + (1 - beta) * g[i]
            elif name == "mvr1":
                m[i] = g[i] + beta * (m[i] - gp[i])
            elif name == "mvr2":
                m[i] = beta * m[i] + (1 - beta) * h[i]
            elif name == "mvr3":
                m[i] = beta * m[i] + (1 - beta) * h[i] + beta * (g[i] - gp[i])
            else:  # hcm: alpha = 1 - beta
                a = 1 - beta
                m[i] = (1 - a) * (m[i] + hv[i]) + a * g[i]
            u = beta * m[i] + (1 - beta) * g[i] if name == "nesterov" else m[i]
            new.append(x[i] + lr * lmo64(u, norm))
        prev, x = x, new
    return x


def run_gluon(name, norm, problem, steps, *, lr, beta, q, seed, **options):
    torch.manual_seed(seed)
    params = [t.clone().requires_grad_(True) for t in problem.x0]
    opt = Gluon(params, lr=lr, momentum=beta, norm=norm, momentum_estimator=name, mvr_q=q, backend="torch",
                ns_dtype=torch.float64 if norm == "spectral" else None, **options)
    for k in range(steps):
        if estimators.get(name).needs is None:
            opt.zero_grad()
            problem.loss(params, k).backward()
            opt.step()
        else:
            opt.step(lambda: problem.loss(params, k))
    return [p.detach() for p in params]


@pytest.mark.parametrize("steps", (1, 10))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", estimators.KNOWN)
def test_gluon_estimator_matches_float64_loop(name, norm, steps):
    problem = Problem(seed=3, steps=steps)
    hyper = dict(lr=0.05, beta=0.8, q=0.3, seed=11)
    expected = float64_loop(name, norm, problem, steps, **hyper)
    got = run_gluon(name, norm, problem, steps, **hyper)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,q", [("mvr1", 0.3), ("mvr2", 1.0), ("mvr3", 1.0)])
def test_mvr_without_momentum_is_the_plain_stochastic_gradient(name, q):
    # with ALGORITHMS.md's (1 - q) the recursion vanishes at q = 1 (q = 0 is SARAH's)
    problem = Problem(seed=5, steps=6)
    got = run_gluon(name, "l2", problem, 6, lr=0.1, beta=0.0, q=q, seed=0)
    plain = run_gluon("ema", "l2", problem, 6, lr=0.1, beta=0.0, q=q, seed=0)
    for a, b in zip(got, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ("hcm1", "hcm2"))
def test_hcm_with_zero_hessian_is_ema(name):
    problem = Problem(seed=6, steps=8, linear=True)  # f = <xi, x>: H = 0
    got = run_gluon(name, "spectral", problem, 8, lr=0.1, beta=0.9, q=0.0, seed=0)
    ema = run_gluon("ema", "spectral", problem, 8, lr=0.1, beta=0.9, q=0.0, seed=0)
    for a, b in zip(got, ema):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _mlp_loss(params, batch):
    W1, W2 = params
    X, Y = batch
    return ((torch.tanh(X @ W1.T) @ W2.T - Y) ** 2).mean()


def test_hvp_against_finite_differences():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_(True),
              torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_(True)]
    previous = [p.detach() - 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    batch = (torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randn(7, 2, generator=gen, dtype=torch.float64))
    loss, grads, extras = estimators.closure_extras(lambda: _mlp_loss(params, batch), params, previous,
                                                    estimators.needs_of(estimators.get("hcm1")))
    d = [p.detach() - x for p, x in zip(params, previous)]

    def grad_at(values):
        leaves = [v.clone().requires_grad_(True) for v in values]
        return torch.autograd.grad(_mlp_loss(leaves, batch), leaves)

    eps = 1e-5
    plus = grad_at([p.detach() + eps * di for p, di in zip(params, d)])
    minus = grad_at([p.detach() - eps * di for p, di in zip(params, d)])
    for hv, a, b in zip(extras["hvp"], plus, minus):
        torch.testing.assert_close(hv, (a - b) / (2 * eps), rtol=1e-6, atol=1e-8)
    for g, e in zip(grads, grad_at([p.detach() for p in params])):
        torch.testing.assert_close(g, e)


def test_previous_gradient_is_taken_at_the_previous_iterate_and_params_are_restored():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(4, 3, generator=gen, dtype=torch.float64).requires_grad_(True),
              torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_(True)]
    before = [p.detach().clone() for p in params]
    previous = [p.detach() + 0.2 for p in params]
    batch = (torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 2, generator=gen, dtype=torch.float64))
    _, _, extras = estimators.closure_extras(lambda: _mlp_loss(params, batch), params, previous, {"previous_gradient"})
    leaves = [v.clone().requires_grad_(True) for v in previous]
    expected = torch.autograd.grad(_mlp_loss(leaves, batch), leaves)
    for got, e in zip(extras["previous_gradient"], expected):
        torch.testing.assert_close(got, e)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


# ---------------------------------------------------------------------- step rules
def _rule_loop(rule, options, problem, steps, *, lr, beta, norm):
    """The rules' formulas in float64 (EMA momentum; Gluon's norms per layer)."""
    x = [t.clone() for t in problem.x0]
    m = [torch.zeros_like(t) for t in x]
    rmax = [0.0 for _ in x]
    for k in range(steps):
        g = problem.grad(x, k)
        b = 1 - (k + 1) ** -0.5 if rule == "theorem2" else beta
        new = []
        for i in range(len(x)):
            m[i] = b * m[i] + (1 - b) * g[i]
            direction = lmo64(m[i], norm)
            dual = float(norms.dual_norm(g[i], norm).sum())
            if rule == "l0l1":
                t = dual / (options["L0"] + options["L1"] * dual)
            elif rule == "theorem2":
                t = (k + 1) ** -0.75
            elif rule == "distance_adaptive":
                rmax[i] = max(rmax[i], float(norms.primal_norm(x[i] - problem.x0[i], norm).max()))
                t = max(options["r_eps"], rmax[i]) / math.sqrt(k + 1)
            else:
                t = max(0.0, -float((g[i] * direction).sum())) / options["L"]
            new.append(x[i] + lr * t * direction)
        x = new
    return x


RULE_CASES = [("l0l1", {"L0": 0.5, "L1": 2.0}), ("theorem2", {}), ("distance_adaptive", {"r_eps": 0.01}),
              # L = 10 keeps t near 1: Gluon's fp32 momentum and direction round at ~1e-7 x t
              ("scale_calibrated", {"L": 10.0})]


@pytest.mark.parametrize("steps", (1, 10))
@pytest.mark.parametrize("norm", ("spectral", "sign", "l2", "colnorm"))
@pytest.mark.parametrize("rule,options", RULE_CASES)
def test_gluon_step_rule_matches_float64_loop(rule, options, norm, steps):
    problem = Problem(seed=4, steps=steps)
    expected = _rule_loop(rule, options, problem, steps, lr=0.3, beta=0.7, norm=norm)
    kw = dict(L0=options["L0"], L1=options["L1"]) if rule == "l0l1" else dict(step_options=options)
    got = run_gluon("ema", norm, problem, steps, lr=0.3, beta=0.7, q=0.0, seed=0, step_rule=rule, **kw)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_smoothness_fit_recovers_a_known_l0_l1():
    # g = c x on an l2 layer: every sample is L = c, whatever ||g||, so L0 = c and L1 = 0
    fit = step_rules.SmoothnessFit({"w": ("l2", {})})
    for k in range(6):
        x = torch.full((1, 4), float(k + 1))
        fit.observe("w", x, 3.0 * x)
    L0, L1, n = fit.fit()["w"]
    assert n == 5 and L0 == pytest.approx(3.0) and L1 == pytest.approx(0.0, abs=1e-9)


def test_smoothness_fit_slope():
    # unit moves whose gradient change is L0 + L1 ||g|| by construction
    fit = step_rules.SmoothnessFit({"w": ("l2", {})})
    L0, L1 = 0.5, 2.0
    x, g = torch.zeros(1, 1), torch.ones(1, 1)
    fit.observe("w", x, g)
    for k in range(5):
        s = float(g.abs().sum())
        x = x + 1.0
        g = g + (L0 + L1 * s)
        fit.observe("w", x, g)
    got0, got1, _ = fit.fit()["w"]
    assert got0 == pytest.approx(L0) and got1 == pytest.approx(L1)


# ---------------------------------------------------------------------- bad input
def test_bad_names_and_missing_inputs():
    p = torch.zeros(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="mvr1.*hcm2"):
        Gluon([p], momentum_estimator="storm")
    with pytest.raises(ValueError, match="constant"):
        Gluon([p], step_rule="adam")
    with pytest.raises(ValueError, match="no formula"):
        Gluon([p], step_rule="distance_free")
    with pytest.raises(ValueError, match="needs 'L'"):
        Gluon([p], step_rule="scale_calibrated")
    with pytest.raises(ValueError, match="does not take"):
        Gluon([p], step_rule="theorem2", step_options={"L": 1.0})
    with pytest.raises(ValueError, match="mvr_q"):
        Gluon([p], mvr_q=1.5)
    for name, missing in (("mvr2", "previous iterate"), ("hcm1", "Hessian-vector")):
        opt = Gluon([p], momentum_estimator=name)
        p.grad = torch.ones(2, 2)
        with pytest.raises(ValueError, match=f"needs closure.*{missing}"):
            opt.step()
    with pytest.raises(TypeError, match="with its autograd graph"):
        Gluon([p], momentum_estimator="mvr1").step(lambda: 1.0)
    with pytest.raises(ValueError, match="g_prev"):
        estimators.update_(estimators.get("mvr1"), torch.zeros(2), torch.ones(2), beta=0.5)
    with pytest.raises(ValueError, match="Hessian-vector"):
        estimators.update_(estimators.get("hcm2"), torch.zeros(2), torch.ones(2), beta=0.5)


# ---------------------------------------------------------------------- the async rule
from ringmaster_kernels.optim.policies import make_policy  # noqa: E402
from ringmaster_kernels.optim.update_rules import LMOMomentum  # noqa: E402


def run_rule(name, norm, problem, steps, *, lr, beta, q, seed):
    """The async rule driven as a synchronous worker would: each payload holds g at the
    current point and the extra input at the rule's previous copy (s drawn as the loop does)."""
    torch.manual_seed(seed)
    params = [t.clone() for t in problem.x0]
    options = {"compute_dtype": torch.float64} if norm == "spectral" else {}
    rule = LMOMomentum([{"params": params, "lmo_options": options}], lr=lr, norm=norm, momentum=beta,
                       momentum_estimator=name, mvr_q=q, backend="torch")
    for k in range(steps):
        g = problem.grad(params, k)
        payload = g
        if rule.job == "previous_gradient":
            payload = g + problem.grad(rule.previous, k)
        elif rule.job is not None:
            d = [a - b for a, b in zip(params, rule.previous)]
            point = params
            if rule.job == "hvp:random" and k > 0:  # at k = 0, d = 0: the loop draws nothing
                s = float(torch.rand(()))
                point = [b + s * di for b, di in zip(rule.previous, d)]
            payload = g + problem.hess(point, d)
        rule.apply(payload, version=k)
    return params


@pytest.mark.parametrize("steps", (1, 10))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", estimators.KNOWN)
def test_async_rule_estimator_matches_float64_loop(name, norm, steps):
    problem = Problem(seed=8, steps=steps)
    hyper = dict(lr=0.05, beta=0.8, q=0.3, seed=2)
    expected = float64_loop(name, norm, problem, steps, **hyper)
    got = run_rule(name, norm, problem, steps, **hyper)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", (False, True))
@pytest.mark.parametrize("norm", ("spectral", "sign", "l2", "rownorm"))
def test_l0l1_rule_gives_the_same_step_in_gluon_and_in_an_async_policy(norm, fused):
    problem = Problem(seed=9, steps=6)
    L0, L1 = 0.3, 1.7
    sync = [t.clone().float().requires_grad_(True) for t in problem.x0]
    gluon = Gluon(sync, lr=0.5, momentum=0.9, nesterov=True, norm=norm, L0=L0, L1=L1, backend="torch")
    asynchronous = [t.clone().float() for t in problem.x0]
    policy = make_policy("ringmaster", [{"params": asynchronous, "step_rule": "l0l1",
                                         "step_options": {"L0": L0, "L1": L1}}],
                         num_workers=1, lr=0.5, momentum=0.9, nesterov=True, norm=norm, fused=fused, backend="torch")
    for k in range(6):
        grads = [g.float() for g in problem.grad([p.detach().double() for p in sync], k)]
        for p, g in zip(sync, grads):
            p.grad = g.clone()
        gluon.step()
        policy.on_gradient(0, policy.version, [g.clone() for g in grads])
        for a, b in zip(asynchronous, sync):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
    assert policy.version == 6


def test_async_rule_bad_payloads_and_groups():
    x = torch.zeros(2, 3, dtype=torch.float64)
    rule = LMOMomentum([x], lr=0.1, norm="l2", momentum_estimator="mvr1")
    assert rule.job == "previous_gradient"
    with pytest.raises(ValueError, match="previous iterate.*2 x 1 tensors"):
        rule.apply([torch.ones_like(x)], version=0)
    with pytest.raises(ValueError, match="one kind of extra input"):
        LMOMomentum([{"params": [x], "momentum_estimator": "mvr1"},
                     {"params": [x.clone()], "momentum_estimator": "hcm1"}], lr=0.1, norm="l2")
    with pytest.raises(ValueError, match="raw step"):
        LMOMomentum([x], lr=0.1, norm=None, step_rule="theorem2")
    with pytest.raises(ValueError, match="must be one of"):
        LMOMomentum([x], lr=0.1, norm="l2", momentum_estimator="adam")


def test_async_rule_state_round_trip():
    problem = Problem(seed=10, steps=4)
    params = [t.clone() for t in problem.x0]
    rule = LMOMomentum(params, lr=0.1, norm="l2", momentum_estimator="mvr2", step_rule="distance_adaptive")
    for k in range(2):
        rule.apply(problem.grad(params, k) + problem.grad(rule.previous, k), version=k)
    state = rule.state_dict()
    twin_params = [p.clone() for p in params]
    twin = LMOMomentum(twin_params, lr=0.1, norm="l2", momentum_estimator="mvr2", step_rule="distance_adaptive")
    twin.load_state_dict(state)
    for k in range(2, 4):
        rule.apply(problem.grad(params, k) + problem.grad(rule.previous, k), version=k)
        twin.apply(problem.grad(twin_params, k) + problem.grad(twin.previous, k), version=k)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", ("constant", "l0l1", "scale_calibrated"))
@pytest.mark.parametrize("name", ("mvr1", "mvr2", "mvr3", "hcm1"))
def test_fused_async_rule_matches_the_float64_rule(name, rule):
    """fused=True (fp32 momentum, the multi-tensor pass) against fused=False (float64)."""
    problem = Problem(seed=12, steps=6)
    options = {"l0l1": {"L0": 0.5, "L1": 2.0}, "scale_calibrated": {"L": 10.0}}.get(rule)
    runs = []
    for fused in (False, True):
        params = [t.clone() for t in problem.x0]
        r = LMOMomentum(params, lr=0.05, norm="l2", momentum=0.8, momentum_estimator=name, mvr_q=0.3,
                        step_rule=rule, step_options=options, fused=fused, backend="torch")
        for k in range(6):
            g = problem.grad(params, k)
            extra = problem.grad(r.previous, k) if r.job == "previous_gradient" else problem.hess(
                params, [a - b for a, b in zip(params, r.previous)])
            r.apply(g + extra, version=k)
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
