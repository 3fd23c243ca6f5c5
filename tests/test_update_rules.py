"""The update rule apart from the delay rule: any torch.optim.Optimizer behind a policy."""
from __future__ import annotations

import math

import pytest
import torch

from ringmaster_kernels.optim.gluon import Gluon
from ringmaster_kernels.optim.policies import make_policy
from ringmaster_kernels.optim.update_rules import LMOMomentum, OptimizerRule


class Recorder(torch.optim.Optimizer):
    """SGD that records, at each step, every group's lr and momentum and the gradients it saw."""

    def __init__(self, params, lr=0.1, momentum=0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})
        self.seen: list[tuple[list[tuple[float, float]], list[torch.Tensor]]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append(([(g["lr"], g["momentum"]) for g in self.param_groups],
                          [p.grad.clone() for g in self.param_groups for p in g["params"]]))
        for g in self.param_groups:
            for p in g["params"]:
                p.add_(p.grad, alpha=-g["lr"])


def _two_groups():
    a, b = torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
    return a, b, Recorder([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01, "momentum": 0.5}])


def test_step_factors_reach_the_optimizer_for_that_step_only():
    a, b, opt = _two_groups()
    rule = OptimizerRule(opt)
    ga, gb = torch.ones(3, dtype=torch.float64), torch.full((2, 2), 2.0, dtype=torch.float64)
    rule.apply([ga, gb], version=0, lr_factor=0.25, momentum=0.3)
    assert opt.seen[0][0] == [(0.025, 0.3), (0.0025, 0.3)]
    assert [(g["lr"], g["momentum"]) for g in opt.param_groups] == [(0.1, 0.9), (0.01, 0.5)]  # restored
    assert torch.equal(opt.seen[0][1][0], ga) and torch.equal(opt.seen[0][1][1], gb)
    assert a.grad is None and b.grad is None
    torch.testing.assert_close(a, -0.025 * ga)


def test_schedule_runs_per_version_before_the_factors():
    a, b, opt = _two_groups()
    versions = []

    def schedule(version, optimizer):
        versions.append(version)
        for g in optimizer.param_groups:
            g["lr"] = 1.0 / (version + 1)

    policy = make_policy("delay_adaptive", opt, num_workers=2, schedule=schedule)
    grads = [torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    policy.on_gradient(0, 0, grads)  # delay 0: factor n / max(n, 0) = 1
    policy.on_gradient(1, 0, grads)  # delay 1: factor 1
    policy.on_gradient(0, 0, grads)  # delay 2: factor 2 / max(2, 2) = 1
    policy.on_gradient(1, 0, grads)  # delay 3: factor 2 / 3
    assert versions == [0, 1, 2, 3]
    assert [s[0][0][0] for s in opt.seen] == pytest.approx([1.0, 0.5, 1 / 3, 0.25 * 2 / 3])


def test_parameter_agnostic_schedules_reach_the_optimizer_groups():
    a, b, opt = _two_groups()
    policy = make_policy("ringmaster_pa", opt, num_workers=2)
    grads = [torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    for k in range(5):
        policy.on_gradient(0, policy.version, grads)
    for k, (groups, _) in enumerate(opt.seen):
        alpha, _, eta = policy.schedule(k)
        assert groups[0] == pytest.approx((0.1 * eta, 1 - alpha)) and groups[1] == pytest.approx((0.01 * eta, 1 - alpha))


def test_gluon_behind_a_policy_is_gluon_stepped_by_hand():
    torch.manual_seed(0)
    W = torch.randn(6, 4, dtype=torch.float64)
    grads = [torch.randn(6, 4, dtype=torch.float64) for _ in range(4)]
    x = W.clone().requires_grad_(True)
    policy = make_policy("ringmaster", Gluon([x], lr=0.05, norm="spectral", backend="torch"), num_workers=1, threshold=3)
    y = W.clone().requires_grad_(True)
    ref = Gluon([y], lr=0.05, norm="spectral", backend="torch")
    for g in grads:
        policy.on_gradient(0, policy.version, [g])
        y.grad = g.clone()
        ref.step()
    assert torch.equal(x, y)


def test_built_in_rule_is_the_default_and_bad_combinations_are_named():
    x = torch.zeros(3)
    assert isinstance(make_policy("async", [x], num_workers=1, lr=0.1).rule, LMOMomentum)
    opt = torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        make_policy("async", opt, num_workers=1, lr=0.1)
    with pytest.raises(ValueError, match="ringmaster_asgd"):
        make_policy("ringmaster_asgd", opt, num_workers=1)
    with pytest.raises(ValueError, match="schedule"):
        make_policy("async", [x], num_workers=1, lr=0.1, schedule=lambda v, o: None)
    with pytest.raises(ValueError, match="lr is required"):
        make_policy("async", [x], num_workers=1)
    with pytest.raises(TypeError, match="schedule"):
        OptimizerRule(opt, schedule=3)
    with pytest.raises(ValueError, match="grad 0 has shape"):
        OptimizerRule(opt).apply([torch.zeros(4)], version=0)


def test_optimizer_rule_state_round_trips_through_the_policy():
    a, b, _ = _two_groups()
    opt = torch.optim.Adam([a, b], lr=0.1)
    policy = make_policy("async", opt, num_workers=1)
    policy.on_gradient(0, 0, [torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)])
    state = policy.state_dict()
    c, d = a.clone(), b.clone()
    other = make_policy("async", torch.optim.Adam([c, d], lr=0.1), num_workers=1)
    other.load_state_dict(state)
    assert other.version == 1
    assert math.isclose(other.rule.optimizer.state_dict()["state"][0]["step"].item(), 1.0)


def test_a_failing_schedule_or_step_leaves_no_gradient_lent_and_no_factor_applied():
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.5)

    def bad_schedule(version, optimizer):
        raise RuntimeError("schedule broke")

    with pytest.raises(RuntimeError, match="schedule broke"):
        OptimizerRule(opt, schedule=bad_schedule).apply([torch.ones(3)], version=0, lr_factor=0.5, momentum=0.0)
    assert p.grad is None and opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.5
    opt.step = lambda: (_ for _ in ()).throw(RuntimeError("step broke"))
    with pytest.raises(RuntimeError, match="step broke"):
        OptimizerRule(opt).apply([torch.ones(3)], version=0, lr_factor=0.5, momentum=0.0)
    assert p.grad is None and opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.5
    assert torch.equal(p.detach(), torch.zeros(3))
