"""Gluon and its presets against float64 re-implementations, torch.optim.Muon and SGD."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from conftest import KERNEL_DEVICE
from ringmaster_kernels.coefficients import schedule
from ringmaster_kernels.optim import Gluon, GluonAdamW, muon_groups, scion_groups

MATRIX_NORMS = ("spectral", "sign", "l2", "l1", "colnorm", "rownorm")


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second OpenMP thread only adds spin-waits, which on a loaded
    machine made the learning check 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ float64 oracle
def polar_ns64(U: torch.Tensor, steps: int, coefficients) -> torch.Tensor:
    """Newton–Schulz in float64 with the optimizer's schedule, on one (m, n) matrix."""
    sched = schedule(coefficients, steps)
    X = U / (U.norm() * sched.safety + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for a, b, c in sched.triples:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


SPECTRAL_SCALE = {"none": lambda m, n: 1.0, "muon": lambda m, n: max(1.0, m / n) ** 0.5,
                  "scion": lambda m, n: (m / n) ** 0.5}


def lmo64(U: torch.Tensor, norm: str, rho: float, steps: int = 5, coefficients="polar_express",
          scale: str = "none") -> torch.Tensor:
    """argmin_{||Z|| <= rho} <U, Z> for one (m, n) float64 matrix (../shared/ALGORITHMS.md)."""
    m, n = U.shape
    if norm == "spectral":
        return -rho * SPECTRAL_SCALE[scale](m, n) * polar_ns64(U, steps, coefficients)
    if norm == "sign":
        return -rho * torch.sign(U)
    if norm == "l2":
        return -rho * U / U.norm()
    if norm == "l1":
        Z = torch.zeros_like(U)
        j = U.abs().argmax()
        Z.view(-1)[j] = -rho * torch.sign(U.view(-1)[j])
        return Z
    if norm == "colnorm":
        return -rho * math.sqrt(m) * U / U.norm(dim=0, keepdim=True)
    if norm == "rownorm":
        return -rho * U / (math.sqrt(n) * U.norm(dim=1, keepdim=True))
    if norm == "bias_rms":
        return -rho * math.sqrt(U.numel()) * U / U.norm()
    raise AssertionError(norm)


def dual64(G: torch.Tensor, norm: str) -> float:
    if norm == "spectral":
        return float(torch.linalg.svdvals(G).sum())
    if norm == "sign":
        return float(G.abs().sum())
    if norm == "l2":
        return float(G.norm())
    raise AssertionError(norm)


class Oracle:
    """The Gluon step written out directly, in float64, one parameter at a time."""

    def __init__(self, groups: list[dict]):
        self.groups = [
            {**g, "x": [p.detach().double().clone() for p in g["params"]], "m": [None] * len(g["params"])}
            for g in groups
        ]

    def step(self, grads: list[list[torch.Tensor | None]]) -> None:
        for g, gg in zip(self.groups, grads):
            beta, lr = g["momentum"], g["lr"]
            for i, grad in enumerate(gg):
                if grad is None:
                    continue
                grad = grad.double()
                if g["m"][i] is None:
                    g["m"][i] = torch.zeros_like(grad)
                m = g["m"][i] = beta * g["m"][i] + (1 - beta) * grad
                u = beta * m + (1 - beta) * grad if g["nesterov"] else m
                shape = u.shape
                u2 = u.reshape(1, -1) if u.dim() < 2 else u.reshape(shape[0], -1)
                scale = (g.get("norm_options") or {}).get("scale", "none")
                d = lmo64(u2, g["norm"], g["radius"], g["ns_steps"], g["ns_coefficients"], scale)
                eta = lr
                if g.get("L0") is not None:  # Gluon's step size replaces lr in both terms
                    dual = dual64(grad.reshape(u2.shape), g["norm"])
                    eta = lr * dual / (g["L0"] + g["L1"] * dual)
                g["x"][i] = (1 - eta * g["weight_decay"]) * g["x"][i] + eta * d.reshape(shape)


# ------------------------------------------------------------------ models
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 5))


def block() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=24, dropout=0.0, batch_first=True)


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, nn.TransformerEncoderLayer):
        x = torch.randn(3, 5, 16, generator=g)
    else:
        x = torch.randn(8, 12, generator=g)
    y = model(x)
    return (y - torch.randn(y.shape, generator=g)).pow(2).mean()


def gluon_groups(model: nn.Module, norm: str, **options) -> list[dict]:
    hyper = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, ns_steps=5, ns_coefficients="polar_express")
    hyper.update(options)
    mats = [p for p in model.parameters() if p.dim() >= 2]
    vecs = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": mats, "norm": norm, "radius": 0.7, **hyper},
        {"params": vecs, "norm": "bias_rms", "radius": 0.3, **{**hyper, "nesterov": False}},
    ]


def run_against_oracle(model: nn.Module, groups: list[dict], steps: int, **opt_kwargs) -> None:
    oracle = Oracle(groups)
    opt = Gluon([{k: v for k, v in g.items()} for g in groups], **opt_kwargs)
    x0 = [p.detach().clone() for p in model.parameters()]
    for k in range(steps):
        opt.zero_grad()
        loss_of(model, k).backward()
        oracle.step([[None if p.grad is None else p.grad.clone() for p in g["params"]] for g in opt.param_groups])
        opt.step()
    ours = [p for g in opt.param_groups for p in g["params"]]
    ref = [x for g in oracle.groups for x in g["x"]]
    start = dict(zip(map(id, model.parameters()), x0))
    for p, r in zip(ours, ref):
        moved = (r - start[id(p)].double()).abs().max()
        assert moved > 0, "the oracle did not move this parameter: the comparison would be vacuous"
        torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=2e-5 * max(1.0, float(moved)))


@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("norm", MATRIX_NORMS)
@pytest.mark.parametrize("make", [mlp, block], ids=["mlp", "block"])
def test_matches_float64_oracle(make, norm, steps):
    model = make()
    run_against_oracle(model, gluon_groups(model, norm), steps)


def test_quintic_and_plain_momentum_match_oracle():
    model = mlp()
    run_against_oracle(model, gluon_groups(model, "spectral", ns_coefficients="quintic", nesterov=False,
                                           momentum=0.0, weight_decay=0.0), 3)


@pytest.mark.parametrize("norm", ["spectral", "sign", "l2"])
def test_gluon_step_size_rule_matches_oracle(norm):
    model = mlp()
    groups = gluon_groups(model, norm, lr=1.0, L0=4.0, L1=2.0)
    groups[1].update(norm="l2", L0=1.0, L1=0.5)
    run_against_oracle(model, groups, 4)


def test_spectral_lmo_is_the_polar_factor():
    """With a convergent cubic schedule, the spectral step is -lr * rho * U V^T from the SVD."""
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(6, 10))
    before = p.detach().clone()
    p.grad = torch.randn(6, 10)
    opt = Gluon([p], lr=0.1, momentum=0.0, radius=2.0, ns_steps=40, ns_coefficients=[(1.5, -0.5, 0.0)] * 40)
    opt.step()
    U, _, Vh = torch.linalg.svd(p.grad.double(), full_matrices=False)
    torch.testing.assert_close((p.detach() - before).double(), -0.2 * U @ Vh, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ Muon numerics
def keller_muon_step(params, grads, bufs, lr, beta, wd):
    """Keller Jordan's Muon update, written out in fp32 (quintic, max(1, r/c)^0.5 scale)."""
    for p, g, buf in zip(params, grads, bufs):
        buf.lerp_(g, 1 - beta)
        u = g.lerp(buf, beta)
        X = u / (u.norm() + 1e-7)
        tall = X.size(0) > X.size(1)
        if tall:
            X = X.T
        for _ in range(5):
            A = X @ X.T
            X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
        if tall:
            X = X.T
        p.mul_(1 - lr * wd).add_(X, alpha=-lr * max(1, p.size(0) / p.size(1)) ** 0.5)


class TinyGPT(nn.Module):
    def __init__(self, vocab=32, dim=16, tied=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim), nn.Linear(dim, dim)])
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        h = self.wte(idx)
        h = h + self.blocks[1](torch.relu(self.blocks[0](h)))
        h = h + self.blocks[2](h)
        return self.lm_head(self.norm(h))


def gpt_loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 32, (4, 7), generator=g)
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), torch.randint(0, 32, (28,), generator=g))


def test_muon_preset_matches_keller_jordan_muon():
    torch.manual_seed(0)
    model = TinyGPT()
    hidden = [p for b in model.blocks for p in [b.weight]]
    ref = [p.detach().clone() for p in hidden]
    bufs = [torch.zeros_like(p) for p in hidden]
    opt = GluonAdamW(muon_groups(model, lr=0.03, weight_decay=0.1, ns_coefficients="quintic"))
    for k in range(5):
        opt.zero_grad()
        gpt_loss(model, k).backward()
        keller_muon_step(ref, [p.grad for p in hidden], bufs, 0.03, 0.95, 0.1)
        opt.step()
    for p, r in zip(hidden, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-5)


def _muon_vs_torch(ns_coefficients, ns_dtype=None) -> float:
    """Largest relative difference, over tall/wide/square matrices, of one step vs torch.optim.Muon."""
    torch.manual_seed(2)
    worst = 0.0
    for shape in [(24, 8), (8, 24), (16, 16)]:
        x0, g = torch.randn(shape), torch.randn(shape)
        a, b = nn.Parameter(x0.clone()), nn.Parameter(x0.clone())
        ours = Gluon([a], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_coefficients=ns_coefficients,
                     radius=max(1, shape[0] / shape[1]) ** 0.5, ns_dtype=ns_dtype)
        theirs = torch.optim.Muon([b], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
        for _ in range(3):
            a.grad, b.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
        da, db = a.detach() - x0, b.detach() - x0
        worst = max(worst, float((da - db).norm() / db.norm()))
    return worst


@pytest.mark.parametrize("ns_dtype", [None, torch.bfloat16])
def test_matches_torch_optim_muon(ns_dtype):
    # torch.optim.Muon always iterates in bf16 (unit roundoff 2^-8); ours in fp32 on CPU by
    # default, or in bf16 too (then the two carry independent bf16 rounding).
    assert _muon_vs_torch("quintic", ns_dtype) < 0.03
    # and the comparison can tell a different definition apart
    assert _muon_vs_torch("polar_express", ns_dtype) > 0.1


def test_bf16_ns_is_torch_optim_muons_math():
    """ns_dtype=bf16 lands as far from the float64 step as torch.optim.Muon does (same math,
    same rounding), the fp32 default far closer."""
    torch.manual_seed(3)
    shapes = [(48, 32), (32, 48), (40, 40)]
    x0 = [torch.randn(s) for s in shapes]
    g = [torch.randn(s) for s in shapes]
    u = [0.95 * 0.05 * gi.double() + 0.05 * gi.double() for gi in g]  # Nesterov from zero momentum
    steps = [0.02 * lmo64(ui, "spectral", 1.0, coefficients="quintic", scale="muon") for ui in u]

    def distance(make) -> float:
        ps = [nn.Parameter(x.clone()) for x in x0]
        opt = make(ps)
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
        opt.step()
        return max(float((p.detach().double() - (1 - 0.02 * 0.1) * x.double() - step).norm() / step.norm())
                   for p, x, step in zip(ps, x0, steps))

    def gluon(ns_dtype):
        return lambda ps: Gluon(ps, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_coefficients="quintic",
                                norm_options={"scale": "muon"}, ns_dtype=ns_dtype)

    theirs = distance(lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1))
    ours_bf16, ours_fp32 = distance(gluon(torch.bfloat16)), distance(gluon(None))
    assert 0.5 * theirs < ours_bf16 < 1.5 * theirs, (ours_bf16, theirs)
    assert ours_fp32 < 0.01 * theirs, (ours_fp32, theirs)


# ------------------------------------------------------------------ learning check
def _teacher_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g) * torch.logspace(0, -2, 16)  # ill-conditioned inputs
    Y = torch.tanh(X @ torch.randn(32, 16, generator=g).T) @ (torch.randn(8, 32, generator=g) / math.sqrt(32)).T
    return X, Y


def _student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.Tanh(), nn.Linear(32, 8, bias=False))


def _train(opt_fn, steps=100) -> tuple[float, float]:
    X, Y = _teacher_problem()
    model = _student()
    opt = opt_fn(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    loss = lambda: 0.5 * (model(X) - Y).pow(2).sum(1).mean()  # noqa: E731
    with torch.no_grad():
        first = float(loss())
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return first, float(loss())


def test_learns_where_sgd_at_the_same_budget_does_not():
    first, ours = _train(lambda ps: Gluon(ps, lr=0.2, momentum=0.95, radius=1.0))
    bound = 0.02 * first
    assert ours < bound
    # Nesterov SGD with the same momentum, schedule and step count, best of a learning-rate
    # sweep up to divergence (0.3 diverges)
    sgd = [_train(lambda ps, lr=lr: torch.optim.SGD(ps, lr=lr, momentum=0.95, nesterov=True))[1]
           for lr in (0.03, 0.1, 0.2, 0.25, 0.3)]
    assert min(v for v in sgd if math.isfinite(v)) > bound


# ------------------------------------------------------------------ conventions
def _train_steps(model, opt, start, n, loss=gpt_loss):
    for k in range(start, start + n):
        opt.zero_grad()
        loss(model, k).backward()
        opt.step()


@pytest.mark.parametrize("preset", ["muon", "muon-bf16-ns", "scion", "gluon", "gluon-bf16"])
def test_state_dict_round_trip_is_bitwise(preset):
    def make():
        torch.manual_seed(0)
        model = TinyGPT()
        if preset == "muon-bf16-ns":  # a torch.dtype in param_groups survives torch.load(weights_only)
            return model, GluonAdamW(muon_groups(model, lr=0.02, adamw_lr=1e-2, ns_dtype=torch.bfloat16))
        if preset == "gluon-bf16":
            return model.to(torch.bfloat16), Gluon(model.parameters(), lr=0.02, norm_options={"scale": "muon"})
        if preset == "muon":
            return model, GluonAdamW(muon_groups(model, lr=0.02, adamw_lr=1e-2))
        if preset == "scion":
            return model, GluonAdamW(scion_groups(model, lr=0.01))
        return model, Gluon(model.parameters(), lr=0.02, norm="sign")

    model, opt = make()
    _train_steps(model, opt, 0, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train_steps(model, opt, 3, 4)

    buf.seek(0)
    ckpt = torch.load(buf)
    model2, opt2 = make()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train_steps(model2, opt2, 3, 4)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(opt.state.values(), opt2.state.values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
            if key == "momentum_buffer":
                assert b[key].dtype == torch.float32


def test_checkpoint_from_before_ns_dtype_loads_with_the_default():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = GluonAdamW(muon_groups(model, lr=0.02))
    _train_steps(model, opt, 0, 1)
    old = opt.state_dict()
    for g in old["param_groups"]:
        g.pop("ns_dtype", None)
    fresh = GluonAdamW(muon_groups(model, lr=0.02, ns_dtype=torch.bfloat16))
    fresh.load_state_dict(old)
    # the saved groups' (missing) ns_dtype, i.e. the default, not fresh's bf16
    assert all(g.get("ns_dtype") is None for g in fresh.param_groups)
    _train_steps(model, fresh, 1, 1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _trained_gluon(dim=3):
    torch.manual_seed(0)
    model = nn.Linear(dim, dim, bias=False)
    opt = Gluon(model.parameters(), lr=0.02)
    model(torch.randn(2, dim)).sum().backward()
    opt.step()
    return model, opt


def _refused(opt, state_dict, err, match):
    """load_state_dict raises `err` and leaves the optimizer as it was."""
    before = {k: v.clone() for k, v in next(iter(opt.state.values())).items()}
    with pytest.raises(err, match=match):
        opt.load_state_dict(state_dict)
    after = next(iter(opt.state.values()))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_state_dict_refuses_damaged_or_foreign_state():
    """Another model's shapes, a missing 'state', a non-tensor buffer and NaN/inf
    momentum were all accepted (the NaN then reached the parameters)."""
    model, opt = _trained_gluon()
    good = opt.state_dict()
    _, other = _trained_gluon(dim=4)
    _refused(opt, other.state_dict(), ValueError, r"state\[0\]\['momentum_buffer'\].*shape \(4, 4\).*another model")
    _refused(opt, {"param_groups": good["param_groups"]}, ValueError, r"lacks \['state'\]")
    _refused(opt, [1, 2], TypeError, "must be a dict")
    for bad, err, match in [
        ([0.0] * 9, TypeError, "must be a tensor, got list"),
        (torch.full((3, 3), math.nan), ValueError, "holds NaN or inf"),
        (torch.full((3, 3), math.inf), ValueError, "holds NaN or inf"),
    ]:
        damaged = {**good, "state": {0: {"momentum_buffer": bad}}}
        _refused(opt, damaged, err, match)
    _refused(opt, {**good, "skipped_steps": -2}, ValueError, "skipped_steps")
    fewer = {**good, "param_groups": [{**good["param_groups"][0], "params": []}]}
    _refused(opt, fewer, ValueError, r"param_groups\[0\] holds 0 parameters")
    opt.load_state_dict(good)  # the real one still loads


def test_gluon_adamw_refuses_nan_and_out_of_range_adamw_options():
    """Per-group AdamW values bypass torch.optim.AdamW's own checks: lr=nan turned the
    parameters NaN at the first step; betas=(1.5, 2) and eps=-1 were accepted."""
    for kwargs, match in [
        (dict(adamw_lr=math.nan), "muon_groups: adamw_lr"),
        (dict(adamw_betas=(1.5, 2)), r"muon_groups: adamw_betas\[0\]"),
        (dict(adamw_betas=(0.9, 1.0)), r"muon_groups: adamw_betas\[1\]"),
        (dict(adamw_eps=-1), "muon_groups: adamw_eps"),
        (dict(adamw_weight_decay=math.inf), "muon_groups: adamw_weight_decay"),
    ]:
        with pytest.raises(ValueError, match=match):
            muon_groups(TinyGPT(), **kwargs)
    groups = muon_groups(TinyGPT())
    (emb,) = [i for i, g in enumerate(groups) if g["role"] == "embedding"]
    for key, value in [("lr", math.nan), ("betas", (0.9, math.nan)), ("eps", -1.0)]:
        edited = muon_groups(TinyGPT())
        edited[emb][key] = value
        with pytest.raises(ValueError, match=rf"param_groups\[{emb}\]: {key}"):
            GluonAdamW(edited)
    model = TinyGPT()
    opt = GluonAdamW(muon_groups(model))
    opt.param_groups[emb]["lr"] = math.nan  # as a buggy scheduler would
    before = [p.detach().clone() for p in model.parameters()]
    gpt_loss(model, 0).backward()
    with pytest.raises(ValueError, match=rf"param_groups\[{emb}\]: lr"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_scheduler_drives_both_kinds():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = GluonAdamW(muon_groups(model, lr=0.02, adamw_lr=1e-2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k)
    _train_steps(model, opt, 0, 1)
    sched.step()
    for inner in opt._inner.values():
        for g in inner.param_groups:
            assert g["lr"] == 0.5 * g["initial_lr"]
    # lr 0 (and no decay) must freeze every parameter of either kind
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _train_steps(model, opt, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_step_size_rule_zero_gradient_gives_no_step():
    p = nn.Parameter(torch.randn(4, 6))
    before = p.detach().clone()
    p.grad = torch.zeros(4, 6)
    Gluon([p], lr=1.0, L0=0.0, L1=1.0, norm="l2").step()
    assert torch.equal(p.detach(), before)


def test_lr_scales_the_update_linearly():
    def delta(lr):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(5, 7))
        x0 = p.detach().clone()
        p.grad = torch.randn(5, 7)
        Gluon([p], lr=lr).step()
        return p.detach() - x0

    torch.testing.assert_close(delta(0.02) * 2, delta(0.04), rtol=0, atol=1e-6)


def test_params_without_grad_are_skipped_and_zero_grad_works():
    model = mlp()
    opt = Gluon(model.parameters(), lr=0.05, norm="l2")
    frozen = model[2].weight
    before = frozen.detach().clone()
    opt.zero_grad()
    loss_of(model, 0).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    assert model[0].weight in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_fused_step_per_group_and_one_newton_schulz_per_shape(monkeypatch, backend):
    from ringmaster_kernels import ops, reference

    steps, ns_calls = [], []
    ns_module = ops if backend == "triton" else reference  # the twin calls its own orthogonalize
    real_step, real_ns = ops.lmo_step_, ns_module.orthogonalize
    monkeypatch.setattr(ops, "lmo_step_", lambda params, *a, **k: (steps.append(len(params)), real_step(params, *a, **k)))
    monkeypatch.setattr(ns_module, "orthogonalize",
                        lambda G, *a, **k: (ns_calls.append(tuple(G.shape)), real_ns(G, *a, **k))[1])
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(4)], nn.Linear(8, 3, bias=False))
    opt = Gluon(model.parameters(), lr=0.01, backend=backend)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert steps == [5]
    assert sorted(ns_calls) == [(1, 3, 8), (4, 8, 8)]  # kernels and twin batch Newton–Schulz by shape
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ns_dtype_reaches_the_fused_step():
    """Gluon(ns_dtype=...) is exactly the twin step with that compute_dtype, and not the default."""
    from ringmaster_kernels import reference

    torch.manual_seed(0)
    x0 = [torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 20)]
    g = [torch.randn_like(x) for x in x0]
    results = {}
    for ns_dtype in (torch.bfloat16, None):
        ps = [nn.Parameter(x.clone()) for x in x0]
        opt = Gluon(ps, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype, backend="torch")
        assert opt.param_groups[0]["ns_dtype"] == ns_dtype
        for p, gi in zip(ps, g):
            p.grad = gi.clone()
        opt.step()
        results[ns_dtype] = [p.detach() for p in ps]
    xs, ms = [x.clone() for x in x0], [torch.zeros_like(x) for x in x0]
    reference.lmo_step_(xs, g, ms, norm="spectral", lr=0.02, beta=0.95, nesterov=True, weight_decay=0.1,
                        compute_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(results[torch.bfloat16], xs))
    assert not any(torch.equal(a, b) for a, b in zip(results[torch.bfloat16], results[None]))


def test_ns_update_reaches_newton_schulz(monkeypatch):
    """Gluon(ns_update="cublas") runs the kernels' Newton–Schulz with it (the torch.baddbmm
    updates), and steps as the default does to fp32 rounding (interpreter: fp32)."""
    from ringmaster_kernels.kernels import newton_schulz

    seen = []
    original = newton_schulz.orthogonalize
    monkeypatch.setattr(newton_schulz, "orthogonalize", lambda *a, **k: (seen.append(a[-1]), original(*a, **k))[1])
    torch.manual_seed(0)
    x0 = [torch.randn(20, 36), torch.randn(36, 20)]
    g = [torch.randn_like(x) for x in x0]
    results = {}
    for ns_update in ("cublas", "triton"):
        ps = [nn.Parameter(x.clone().to(KERNEL_DEVICE)) for x in x0]
        # fp32 iteration on any device, so the tolerance is fp32's
        opt = Gluon(ps, lr=0.02, weight_decay=0.1, ns_update=ns_update, ns_dtype=torch.float32, backend="triton")
        for p, gi in zip(ps, g):
            p.grad = gi.clone().to(KERNEL_DEVICE)
        opt.step()
        results[ns_update] = ps
    assert seen == ["cublas", "cublas", "triton", "triton"]  # one batched call per shape
    for a, b in zip(results["cublas"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_odd_layouts_noncontiguous_and_conv():
    torch.manual_seed(0)
    t = nn.Parameter(torch.randn(7, 5).t())  # non-contiguous (5, 7)
    conv = nn.Parameter(torch.randn(4, 3, 3, 3))
    groups = [{"params": [t, conv], "norm": "spectral", "lr": 0.1, "momentum": 0.5, "nesterov": True,
               "weight_decay": 0.0, "radius": 1.0, "ns_steps": 5, "ns_coefficients": "polar_express"}]
    oracle = Oracle(groups)
    opt = Gluon([dict(groups[0])])
    for k in range(2):
        gen = torch.Generator().manual_seed(k)
        t.grad, conv.grad = torch.randn(5, 7, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
        oracle.step([[t.grad.clone(), conv.grad.clone()]])
        opt.step()
    assert not t.is_contiguous() and t.shape == (5, 7)
    for p, r in zip([t, conv], oracle.groups[0]["x"]):
        torch.testing.assert_close(p.double(), r, rtol=0, atol=2e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_cpu(dtype):
    """The Triton path (bf16 Newton–Schulz by default on CUDA) against the CPU twin (fp32)."""
    torch.manual_seed(0)
    x0 = torch.randn(3, 64, 32) * 0.05  # small weights, so bf16 rounds the update finely
    grads = [torch.randn(3, 64, 32) for _ in range(3)]
    deltas = []
    for device in ("cpu", "cuda"):
        ps = [nn.Parameter(x.to(device, dtype)) for x in x0]
        opt = Gluon(ps, lr=0.02, weight_decay=0.1, norm_options={"scale": "muon"})
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = gi.to(device, dtype)
            opt.step()
        deltas.append(torch.stack([p.detach().float().cpu() for p in ps]) - x0.to(dtype).float())
    rel = float((deltas[1] - deltas[0]).norm() / deltas[0].norm())
    assert rel < (0.05 if dtype == torch.bfloat16 else 0.02), rel


# ------------------------------------------------------------------ non-finite and bad input
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_skips_the_whole_step_and_counts(bad):
    torch.manual_seed(0)
    model = TinyGPT()
    opt = GluonAdamW(muon_groups(model))
    _train_steps(model, opt, 0, 1)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state.items()}
    opt.zero_grad()
    gpt_loss(model, 1).backward()
    model.blocks[0].weight.grad[2, 3] = bad
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for k, s in opt.state.items():
        assert all(torch.equal(v, state[k][n]) for n, v in s.items())
    fresh = GluonAdamW(muon_groups(TinyGPT()))
    fresh.load_state_dict(opt.state_dict())
    assert fresh.skipped_steps == 1


def test_nonfinite_raise_names_the_problem():
    p = nn.Parameter(torch.randn(4, 4))
    p.grad = torch.full((4, 4), float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        Gluon([p], nonfinite="raise").step()
    assert torch.isfinite(p).all()


def test_sparse_grad_rejected_by_name():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Gluon(emb.named_parameters(), norm="sign")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients; 'weight'"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(norm="frobenius-ish"), ValueError, "norm"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr=True), ValueError, "lr"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(radius=-1.0), ValueError, "radius"),
        (dict(norm_options={"scale": "huge"}), ValueError, "scale"),
        (dict(norm="sign", norm_options={"steps": 3}), TypeError, "unexpected option"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(nesterov=1), TypeError, "nesterov"),
        (dict(L0=1.0), ValueError, "L0 and L1"),
        (dict(L0=0.0, L1=0.0), ValueError, "both be 0"),
        (dict(nonfinite="warn"), ValueError, "nonfinite"),
        (dict(ns_dtype="bf16"), TypeError, "ns_dtype"),
        (dict(ns_dtype=torch.int32), TypeError, "ns_dtype"),
        # Newton–Schulz settings and the backend fail here, not at the first step
        (dict(ns_steps=-1), ValueError, r"param_groups\[0\]: ns_steps must be in"),
        (dict(ns_steps=10**12), ValueError, r"param_groups\[0\]: ns_steps must be in"),
        (dict(ns_coefficients="cubic"), ValueError, r"param_groups\[0\]: ns_coefficients"),
        (dict(ns_steps=1, ns_coefficients=["123"]), TypeError, r"param_groups\[0\]: ns_coefficients"),
        (dict(ns_steps=1, ns_coefficients=[(1.0, math.nan, 0.0)]), ValueError, r"ns_coefficients\[0\]"),
        (dict(norm_options={"steps": -2}), ValueError, r"norm_options\['steps'\] must be in"),
        (dict(norm_options={"eps": "x"}), TypeError, r"norm_options\['eps'\]"),
        (dict(backend="gpu"), ValueError, "backend must be None or one of"),
        (dict(ns_update="cuBLAS"), ValueError, r"param_groups\[0\]: ns_update must be one of"),
        (dict(norm="sign", ns_update=None), ValueError, r"param_groups\[0\]: ns_update must be one of"),
    ],
)
def test_bad_options(kwargs, err, match):
    with pytest.raises(err, match=match):
        Gluon([nn.Parameter(torch.randn(3, 3))], **kwargs)


def test_bad_params_and_groups():
    with pytest.raises(TypeError, match="floating-point"):
        Gluon([nn.Parameter(torch.ones(3, 3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="floating-point"):
        Gluon([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="kind"):
        GluonAdamW([{"params": [nn.Parameter(torch.randn(2, 2))], "kind": "sgd"}])
    with pytest.raises(ValueError, match="backend must be None or one of"):
        GluonAdamW(muon_groups(TinyGPT()), backend="gpu")
    with pytest.raises(TypeError, match="nn.Module"):
        muon_groups([nn.Parameter(torch.randn(2, 2))])
    with pytest.raises(ValueError, match="head"):
        muon_groups(TinyGPT(), head="decoder.weight")
    with pytest.raises(ValueError, match="unknown role"):
        muon_groups(TinyGPT(), overrides={"embeddings": {"lr": 1.0}})
    opt = Gluon([nn.Parameter(torch.randn(3, 3))])
    opt.param_groups[0]["lr"] = -0.1  # as a buggy scheduler would
    opt.param_groups[0]["params"][0].grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr"):
        opt.step()


# ------------------------------------------------------------------ presets
def test_muon_groups_roles_shapes_and_overrides():
    model = TinyGPT()
    groups = muon_groups(model, lr=0.02, overrides={"head": {"lr": 5e-3}})
    roles = {g["role"]: g for g in groups if g["role"] != "hidden"}
    (hidden,) = [g for g in groups if g["role"] == "hidden"]
    assert hidden["param_names"] == ["blocks.0.weight", "blocks.1.weight", "blocks.2.weight"]
    assert hidden["kind"] == "gluon" and hidden["norm"] == "spectral"
    assert hidden["norm_options"] == {"scale": "muon"} and hidden["radius"] == 1.0
    assert roles["embedding"]["param_names"] == ["wte.weight"] and roles["embedding"]["kind"] == "adamw"
    assert roles["head"]["param_names"] == ["lm_head.weight"] and roles["head"]["lr"] == 5e-3
    assert sorted(roles["vector"]["param_names"]) == sorted(
        ["blocks.0.bias", "blocks.1.bias", "blocks.2.bias", "norm.weight", "norm.bias"])
    opt = GluonAdamW(groups)
    assert opt._inner["adamw"].defaults["fused"] is True
    assert hidden["ns_dtype"] is None
    (bf16,) = [g for g in muon_groups(model, ns_dtype=torch.bfloat16) if g["role"] == "hidden"]
    assert bf16["ns_dtype"] == torch.bfloat16
    # tied head: the shared matrix is the embedding, once
    tied = muon_groups(TinyGPT(tied=True))
    assert "head" not in {g["role"] for g in tied}


def test_scion_groups_norms_and_radii():
    model = TinyGPT()
    groups = scion_groups(model, radius=50.0, head_radius=3000.0)
    by_role = {}
    for g in groups:
        by_role.setdefault(g["role"], []).append(g)
    assert by_role["hidden"][0]["radius"] == 50.0 and by_role["hidden"][0]["norm_options"] == {"scale": "scion"}
    assert by_role["head"][0]["norm"] == "sign" and by_role["head"][0]["radius"] == 3000.0 / 16
    assert by_role["embedding"][0]["norm"] == "sign"
    assert by_role["vector"][0]["norm"] == "bias_rms"
    assert all(g["weight_decay"] == 1.0 and g["kind"] == "gluon" for g in groups)
    assert all(g["ns_dtype"] == torch.bfloat16 for g in scion_groups(model, ns_dtype=torch.bfloat16))
    opt = GluonAdamW(groups)
    assert set(opt._inner) == {"gluon"}
    _train_steps(model, opt, 0, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_add_param_group_after_construction():
    model = TinyGPT()
    extra = nn.Parameter(torch.randn(5))
    opt = GluonAdamW(muon_groups(model))
    opt.add_param_group({"params": [("extra", extra)], "kind": "adamw", "lr": 0.1})
    assert opt.param_groups[-1]["params"] == [extra]
    assert opt._inner["adamw"].param_groups[-1] is opt.param_groups[-1]
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [("again", extra)], "kind": "gluon", "norm": "l2"})
    before = extra.detach().clone()
    extra.grad = torch.ones(5)
    opt.step()
    assert (extra < before).all()
