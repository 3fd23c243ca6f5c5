"""Async-method policies: decisions on scripted arrivals, update formulas, schedules, checkpoints."""
import math

import pytest
import torch

from ringmaster_kernels import norms
from ringmaster_kernels.optim.hetero_policies import Malenia, RescaledASGD, Ringleader
from ringmaster_kernels.optim.policies import (
    METHODS,
    Decision,
    Minibatch,
    ParameterAgnosticRingmaster,
    Ringmaster,
    make_policy,
)


def vec(d=6, seed=0):
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(count, d=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(count)]


def test_ringmaster_discards_on_arrival_without_stops():
    pol = Ringmaster([vec()], num_workers=4, lr=0.1, threshold=2, stops=False, norm="l2", momentum=0.0)
    script = [(0, 0, True), (1, 0, True), (2, 0, False), (1, 2, True), (3, 0, False), (0, 1, False), (2, 2, True), (2, 2, False)]
    for worker, version, accept in script:
        d = pol.on_gradient(worker, version, grads(1)[0])
        assert d.accepted is accept and d.advanced is accept
        assert d.restart and d.cancel_before is None and not d.restart_idle
    assert pol.counters() == {"version": 4, "accepted": 4, "discarded": 4}
    assert d.delay == 2  # version 2 arriving at k = 4


def test_ringmaster_with_stops_cancels_jobs_whose_delay_reached_R():
    pol = Ringmaster([vec()], num_workers=3, lr=0.1, threshold=3, stops=True, norm="l2")
    decisions = [pol.on_gradient(0, v, grads(1)[0]) for v in range(5)]
    # after update to version k, jobs started at v <= k - R have delay >= R
    assert [d.cancel_before for d in decisions] == [k - 3 + 1 for k in range(1, 6)]
    assert all(d.accepted for d in decisions)


def test_stale_gradient_is_never_computed_when_discarded():
    pol = Ringmaster([vec()], num_workers=2, lr=0.1, threshold=1, stops=False, norm="l2")
    pol.on_gradient(0, 0, grads(1)[0])

    def boom():
        raise AssertionError("a discarded gradient must not be computed")

    d = pol.on_gradient(1, 0, boom)
    assert not d.accepted and d.delay == 1


def test_parameter_agnostic_schedule_values():
    sched = ParameterAgnosticRingmaster.schedule
    assert sched(0) == (1.0, 1, 1.0)
    assert sched(1) == (1.0, 1, 2 ** -0.75)
    a, R, e = sched(4)
    assert a == pytest.approx(0.5) and R == 2 and e == pytest.approx(5 ** -0.75)
    assert [sched(k)[1] for k in (8, 9, 15, 16, 99, 100)] == [2, 3, 3, 4, 9, 10]
    pol = make_policy("ringmaster_pa", [vec()], num_workers=2, lr=0.5, norm="l2")
    assert pol.threshold == 1
    for v in range(9):
        pol.on_gradient(0, v, grads(1)[0])
    assert pol.threshold == 3
    # delay 3 >= R_9 = 3 is discarded, delay 2 is accepted
    assert not pol.on_gradient(1, 6, grads(1)[0]).accepted
    assert pol.on_gradient(1, 7, grads(1)[0]).accepted


def test_parameter_agnostic_update_matches_formula():
    x0 = vec()
    gs = grads(4)
    pol = make_policy("ringmaster_pa", [x0.clone()], num_workers=1, lr=0.5, norm="l2", nesterov=False)
    x, m = x0.clone(), torch.zeros_like(x0)
    for k, g in enumerate(gs):
        pol.on_gradient(0, k, g)
        alpha = 1.0 if k == 0 else 1 / math.sqrt(k)
        m = (1 - alpha) * m + alpha * g
        x = x - 0.5 / (k + 1) ** 0.75 * m / m.norm()
    torch.testing.assert_close(pol.params[0], x, rtol=1e-12, atol=1e-12)


def test_ringmaster_asgd_matches_direct_formula():
    x0 = vec()
    pol = make_policy("ringmaster_asgd", [x0.clone()], num_workers=2, lr=0.3, threshold=2)
    x = x0.clone()
    for i, g in enumerate(grads(5)):
        d = pol.on_gradient(i % 2, pol.version, g)
        assert d.accepted
        x = x - 0.3 * g
    torch.testing.assert_close(pol.params[0], x, rtol=0, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_ringmaster_l2_momentum_matches_direct_formula(nesterov):
    x0, beta, lr, rho = vec(), 0.9, 0.05, 0.7
    pol = make_policy("ringmaster", [x0.clone()], num_workers=2, lr=lr, threshold=4, norm="l2", radius=rho,
                      momentum=beta, nesterov=nesterov)
    x, m = x0.clone(), torch.zeros_like(x0)
    for g in grads(6):
        pol.on_gradient(0, pol.version, g)
        m = beta * m + (1 - beta) * g
        u = beta * m + (1 - beta) * g if nesterov else m
        x = x - lr * rho * u / u.norm()
    torch.testing.assert_close(pol.params[0], x, rtol=1e-12, atol=1e-12)


def test_param_groups_use_their_own_norm_radius_and_lr():
    W = torch.randn(5, 3, dtype=torch.float64)
    b = vec(3)
    gW, gb = torch.randn(5, 3, dtype=torch.float64), vec(3, seed=5)
    pol = make_policy("async", [
        {"params": [W.clone()], "norm": "spectral", "radius": 2.0, "lr": 0.1},
        {"params": [b.clone()], "norm": "sign", "lr": 0.01},
    ], num_workers=1, lr=1.0, momentum=0.0)
    pol.on_gradient(0, 0, [gW, gb])
    torch.testing.assert_close(pol.params[0], W + 0.1 * norms.lmo(gW, "spectral", 2.0))
    torch.testing.assert_close(pol.params[1], b - 0.01 * torch.sign(gb))


def test_delay_adaptive_scales_step_by_n_over_delay():
    n = 4
    pol = make_policy("delay_adaptive", [torch.zeros(3, dtype=torch.float64)], num_workers=n, lr=1.0,
                      norm="l2", momentum=0.0)
    g = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for _ in range(8):
        pol.on_gradient(0, pol.version, g)
    before = pol.params[0].clone()
    d = pol.on_gradient(1, 0, g)  # delay 8 > n
    assert d.accepted and d.delay == 8
    assert (before - pol.params[0])[0].item() == pytest.approx(n / 8)


def test_rennala_batches_at_one_point_and_restarts_everyone():
    x0 = vec()
    pol = make_policy("rennala", [x0.clone()], num_workers=5, lr=0.2, batch=3, norm="l2", momentum=0.0)
    gs = grads(3)
    d1 = pol.on_gradient(0, 0, gs[0])
    d2 = pol.on_gradient(0, 0, gs[1])  # a fast worker contributes twice
    assert (d1.accepted, d1.advanced, d1.restart) == (True, False, True)
    assert not d2.advanced and pol.version == 0
    d3 = pol.on_gradient(4, 0, gs[2])
    assert d3.advanced and d3.version == 1 and d3.cancel_before == 1 and not d3.restart_idle
    mean = (gs[0] + gs[1] + gs[2]) / 3
    torch.testing.assert_close(pol.params[0], x0 - 0.2 * mean / mean.norm())
    stale = pol.on_gradient(2, 0, gs[0])
    assert not stale.accepted and pol.discarded == 1


def test_sync_waits_for_every_worker():
    pol = make_policy("sync", [vec()], num_workers=3, lr=0.1, norm="l2")
    ds = [pol.on_gradient(w, 0, g) for w, g in zip((2, 0, 1), grads(3))]
    assert [d.restart for d in ds] == [False, False, True]
    assert [d.advanced for d in ds] == [False, False, True]
    assert ds[-1].restart_idle and ds[-1].version == 1


def test_infinite_threshold_is_async():
    gs = grads(6)
    arrivals = [(0, 0), (1, 0), (0, 1), (2, 0), (1, 2), (0, 4)]
    a = make_policy("async", [vec()], num_workers=3, lr=0.1, norm="l2")
    r = Ringmaster([vec()], num_workers=3, lr=0.1, threshold=math.inf, stops=True, norm="l2")
    for (w, v), g in zip(arrivals, gs):
        da, dr = a.on_gradient(w, v, g), r.on_gradient(w, v, g)
        assert da == dr
    assert torch.equal(a.params[0], r.params[0])


def test_state_dict_round_trip_continues_identically():
    gs = grads(8)
    a = make_policy("rennala", [vec()], num_workers=2, lr=0.1, batch=3, norm="l2")
    for g in gs[:4]:
        a.on_gradient(0, a.version, g)
    b = make_policy("rennala", [a.params[0].clone()], num_workers=2, lr=0.1, batch=3, norm="l2")
    b.load_state_dict(a.state_dict())
    assert b.counters() == a.counters()
    for g in gs[4:]:
        assert a.on_gradient(1, a.version, g) == b.on_gradient(1, b.version, g)
    assert torch.equal(a.params[0], b.params[0])
    with pytest.raises(ValueError, match="state is for policy"):
        make_policy("sync", [vec()], num_workers=2, lr=0.1).load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="ringmaster", num_workers=0, lr=0.1), "num_workers"),
    (dict(method="ringmaster", num_workers=2, lr=0.1, threshold=0), "threshold"),
    (dict(method="ringmaster", num_workers=2, lr=-0.1), "lr"),
    (dict(method="ringmaster", num_workers=2, lr=float("nan")), "lr"),
    (dict(method="nope", num_workers=2, lr=0.1), "method"),
    (dict(method="rennala", num_workers=2, lr=0.1, batch=0), "batch"),
    (dict(method="async", num_workers=2, lr=0.1, threshold=3), "threshold"),
    (dict(method="ringmaster", num_workers=2, lr=0.1, norm="frobnorm"), "norm"),
    (dict(method="ringmaster", num_workers=2, lr=0.1, momentum=1.0), "momentum"),
])
def test_bad_configuration_raises_naming_the_argument(kwargs, match):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        make_policy(method, [vec()], **kwargs)


@pytest.mark.parametrize("group, err, match", [
    (dict(radius=math.nan), ValueError, r"param_groups\[0\]\['radius'\] must be a finite number > 0"),
    (dict(radius=-1.0), ValueError, r"param_groups\[0\]\['radius'\]"),
    (dict(radius="1"), ValueError, r"param_groups\[0\]\['radius'\]"),
    (dict(norm="l2", lmo_options={"scale": "muon"}), TypeError, r"lmo_options'\]: norm 'l2' got unexpected"),
    (dict(lmo_options={"steps": -1}), ValueError, r"lmo_options'\]: steps must be in"),
    (dict(lmo_options={"coefficients": "cubic"}), ValueError, r"lmo_options'\]: coefficients"),
    (dict(lmo_options=["scale"]), TypeError, r"lmo_options'\] must be a dict"),
    (dict(norm=None, lmo_options={"steps": 3}), ValueError, "norm None .* takes no options"),
])
def test_bad_groups_fail_at_construction_not_at_the_first_gradient(group, err, match):
    with pytest.raises(err, match=match):
        make_policy("ringmaster", [{"params": [torch.zeros(3, 4, dtype=torch.float64)], **group}],
                    num_workers=2, lr=0.1)


def test_sync_with_no_workers_names_num_workers():
    with pytest.raises(ValueError, match="num_workers must be >= 1, got 0") as info:
        make_policy("sync", [vec()], num_workers=0, lr=0.1)
    assert "batch" not in str(info.value)


def test_load_state_dict_refuses_negative_counters_and_changes_nothing():
    a = make_policy("ringmaster", [vec()], num_workers=2, lr=0.1, norm="l2")
    a.on_gradient(0, 0, grads(1)[0])
    for key, bad in [("version", -5), ("accepted", -1), ("discarded", 1.5)]:
        state = a.state_dict()
        state["counters"][key] = bad
        b = make_policy("ringmaster", [vec()], num_workers=2, lr=0.1, norm="l2")
        with pytest.raises((ValueError, TypeError), match=rf"state\['counters'\]\['{key}'\]"):
            b.load_state_dict(state)
        assert b.counters() == {"version": 0, "accepted": 0, "discarded": 0}
        assert b.rule.state_dict()["momentum_buffers"] == [None]


@pytest.mark.parametrize("damage, match", [
    (lambda st: st["rule"]["groups"][0].update(lr=math.nan), r"param_groups\[0\]: lr"),
    (lambda st: st["rule"]["groups"][0].update(radius=-1.0), r"\['radius'\]"),
    (lambda st: st["rule"]["groups"][0].update(norm="frobnorm"), r"\['norm'\]"),
    (lambda st: st["rule"]["groups"][0].update(lmo_options={"steps": -1}), "steps"),
    (lambda st: st["rule"]["groups"][0].pop("radius"), "exactly"),
    (lambda st: st["rule"]["groups"][0].update(extra=1), "exactly"),
    (lambda st: st["rule"]["groups"].append(dict(st["rule"]["groups"][0])), "param groups"),
    (lambda st: st["rule"]["momentum_buffers"].clear(), "momentum buffers"),
    (lambda st: st.update(batch_sum=[torch.zeros(5, dtype=torch.float64)]), "batch_sum"),
    (lambda st: st.update(batch_sum=["x"]), "batch_sum"),
    (lambda st: st.update(batch_count=3), "partial batch"),
    (lambda st: st.update(batch_count=0), "partial batch"),
    (lambda st: st.update(batch_count=-1), "batch_count"),
])
def test_load_state_dict_validates_groups_and_batch_before_changing_anything(damage, match):
    gs = grads(2)
    a = make_policy("rennala", [vec()], num_workers=2, lr=0.1, batch=3, norm="l2", momentum=0.9)
    for g in gs:
        a.on_gradient(0, a.version, g)  # two of three: a partial batch is saved
    state = a.state_dict()
    damage(state)
    b = make_policy("rennala", [vec()], num_workers=2, lr=0.1, batch=3, norm="l2", momentum=0.9)
    before = b.state_dict()
    with pytest.raises((ValueError, TypeError), match=match):
        b.load_state_dict(state)
    after = b.state_dict()
    assert after["counters"] == before["counters"] and after["rule"]["groups"] == before["rule"]["groups"]
    assert after["rule"]["momentum_buffers"] == [None] and after["batch_sum"] is None and after["batch_count"] == 0


def test_a_saved_partial_batch_keeps_its_dtype_and_is_a_copy():
    a = make_policy("rennala", [vec()], num_workers=2, lr=0.1, batch=3, norm="l2")
    a.on_gradient(0, 0, grads(1)[0].float())
    state = a.state_dict()
    b = make_policy("rennala", [vec()], num_workers=2, lr=0.1, batch=3, norm="l2")
    b.load_state_dict(state)
    saved = b.state_dict()["batch_sum"][0]
    assert saved.dtype == torch.float32 and torch.equal(saved, state["batch_sum"][0])
    state["batch_sum"][0].fill_(7.0)
    assert not torch.equal(b.state_dict()["batch_sum"][0], state["batch_sum"][0])


def test_bad_arrivals_raise():
    pol = make_policy("ringmaster", [vec()], num_workers=2, lr=0.1, norm="l2")
    with pytest.raises(ValueError, match="worker"):
        pol.on_gradient(2, 0, grads(1)[0])
    with pytest.raises(ValueError, match="version"):
        pol.on_gradient(0, 1, grads(1)[0])
    with pytest.raises(ValueError, match="shape"):
        pol.on_gradient(0, 0, torch.zeros(5, dtype=torch.float64))


def test_every_method_is_buildable_and_decides():
    for name in METHODS:  # default norm: spectral, on a matrix
        extra = {"batch": 2} if name == "rennala" else {}
        pol = make_policy(name, [vec().view(2, 3)], num_workers=2, lr=0.1, **extra)
        d = pol.on_gradient(0, 0, grads(1)[0].view(2, 3))
        assert isinstance(d, Decision) and d.accepted
        assert isinstance(pol, (Ringmaster, Minibatch, RescaledASGD, Ringleader, Malenia)) or name == "delay_adaptive"


@pytest.mark.parametrize("method", ["ringmaster", "ringmaster_pa"])
def test_fused_step_matches_unfused(method):
    W = torch.randn(4, 6, dtype=torch.float32)
    b = torch.randn(6, dtype=torch.float32)
    groups = lambda: [{"params": [W.clone()], "norm": "spectral"}, {"params": [b.clone()], "norm": "l2", "radius": 0.5}]  # noqa: E731
    a = make_policy(method, groups(), num_workers=2, lr=0.05)
    f = make_policy(method, groups(), num_workers=2, lr=0.05, fused=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        g = [torch.randn(4, 6, generator=gen), torch.randn(6, generator=gen)]
        assert a.on_gradient(0, a.version, g) == f.on_gradient(0, f.version, g)
    for pa, pf in zip(a.params, f.params):
        torch.testing.assert_close(pa, pf, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
def test_fused_policy_on_cuda_matches_cpu_twin_path():
    """The real runtime's path: fused Triton step on CUDA tensors, same decisions as on CPU."""
    W, b = torch.randn(48, 40), torch.randn(40)
    groups = lambda dev: [{"params": [W.clone().to(dev)], "norm": "sign"}, {"params": [b.clone().to(dev)], "norm": "l2"}]  # noqa: E731
    cpu = make_policy("ringmaster", groups("cpu"), num_workers=3, lr=0.01, threshold=2)
    gpu = make_policy("ringmaster", groups("cuda"), num_workers=3, lr=0.01, threshold=2, fused=True)
    gen = torch.Generator().manual_seed(0)
    for worker, lag in [(0, 0), (1, 1), (2, 0), (0, 2), (1, 0)]:
        g = [torch.randn(48, 40, generator=gen), torch.randn(40, generator=gen)]
        v = max(0, cpu.version - lag)
        assert cpu.on_gradient(worker, v, g) == gpu.on_gradient(worker, v, [t.cuda() for t in g])
    for pc, pg in zip(cpu.params, gpu.params):
        torch.testing.assert_close(pg.cpu(), pc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, cls, stops, nesterov", [
    ("ringmaster", Ringmaster, True, True),
    ("ringmaster_nostops", Ringmaster, False, True),
    ("ringmaster_alg1", Ringmaster, False, False),
    ("ringmaster_pa", ParameterAgnosticRingmaster, True, True),
    ("ringmaster_pa_nostops", ParameterAgnosticRingmaster, False, True),
    ("ringmaster_pa_alg1", ParameterAgnosticRingmaster, False, False),
])
def test_every_variant_name_reaches_its_policy(name, cls, stops, nesterov):
    pol = make_policy(name, [{"params": [vec()], "norm": "l2"}], num_workers=3, lr=0.1)
    assert type(pol) is cls and pol.name == name and pol.stops is stops
    assert pol.rule.hyperparameters()["nesterov"] is nesterov
    # stops show in the decisions: with stops the first update cancels jobs of delay >= R_1
    d = pol.on_gradient(0, 0, grads(1)[0])
    assert (d.cancel_before is not None) is stops
    # a variant fixes its settings: asking it for the other value is an error, not a no-op
    if not stops:
        with pytest.raises(ValueError, match="stops"):
            make_policy(name, [vec()], num_workers=3, lr=0.1, stops=True)
    if not nesterov:
        with pytest.raises(ValueError, match="nesterov"):
            make_policy(name, [vec()], num_workers=3, lr=0.1, nesterov=True)


def test_algorithm_1_update_is_plain_ema_and_lmo():
    """x+ = x + eta lmo(m+), m+ = alpha g + (1 - alpha) m, no Nesterov look-ahead."""
    x0 = vec()
    pol = make_policy("ringmaster_alg1", [{"params": [x0.clone()], "norm": "l2", "radius": 1.0}],
                      num_workers=2, lr=0.5, momentum=0.9, threshold=2)
    g1, g2 = grads(2)
    pol.on_gradient(0, 0, g1)
    pol.on_gradient(1, 0, g2)
    m1 = 0.1 * g1
    m2 = 0.1 * g2 + 0.9 * m1
    expected = x0 + 0.5 * norms.lmo(m1, "l2", 1.0) + 0.5 * norms.lmo(m2, "l2", 1.0)
    torch.testing.assert_close(pol.params[0], expected)


def test_stops_flag_of_ringmaster_keeps_its_default():
    on = make_policy("ringmaster", [vec()], num_workers=2, lr=0.1, norm="l2")
    off = make_policy("ringmaster", [vec()], num_workers=2, lr=0.1, norm="l2", stops=False)
    assert on.stops and not off.stops
