"""RingmasterMuonAdamW (the NanoChat drop-in) without NanoChat: groups built like
NanoChat's ``GPT.setup_optimizer`` from a tiny fake GPT, checked against a float64
re-implementation of NanoChat's Muon step, torch.optim.AdamW, a 2-rank Gloo group and a
fake ``nanochat.gpt`` module."""
from __future__ import annotations

import copy
import datetime
import io
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from ringmaster_kernels.coefficients import POLAR_EXPRESS
from ringmaster_kernels.integrations import nanochat as nc
from ringmaster_kernels.integrations.nanochat import EXTRAS, RingmasterMuonAdamW, install, patch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_ON = {k: True for k in EXTRAS}
ALL_OFF = {k: False for k in EXTRAS}


class FakeGPT(nn.Module):
    """The parameter layout NanoChat's GPT hands to setup_optimizer, at toy size (odd dims)."""

    def __init__(self, vocab: int = 37, d: int = 12, layers: int = 2) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d),
            h=nn.ModuleList(nn.ModuleDict(dict(
                c_q=nn.Linear(d, d, bias=False), c_fc=nn.Linear(d, 3 * d, bias=False),
                c_proj=nn.Linear(3 * d, d, bias=False))) for _ in range(layers)),
        ))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(layers))
        self.x0_lambdas = nn.Parameter(torch.full((layers,), 0.1))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = x0 = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = x + block.c_q(x).tanh()
            x = x + block.c_proj(torch.relu(block.c_fc(x)).square())
        logits = self.lm_head(x)
        return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def nanochat_groups(model: FakeGPT, matrix_lr: float = 0.02, weight_decay: float = 0.2) -> list[dict]:
    """Groups with the structure of NanoChat's setup_optimizer (kinds, keys, one muon group per shape)."""
    matrix = list(model.transformer.h.parameters())
    groups = [
        dict(kind="adamw", params=list(model.lm_head.parameters()), lr=0.004, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
        dict(kind="adamw", params=list(model.transformer.wte.parameters()), lr=0.2, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
        dict(kind="adamw", params=[model.resid_lambdas], lr=0.005, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
        dict(kind="adamw", params=[model.x0_lambdas], lr=0.5, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
    ]
    for shape in sorted({p.shape for p in matrix}):
        groups.append(dict(kind="muon", params=[p for p in matrix if p.shape == shape], lr=matrix_lr,
                           momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
    return groups


def make_optimizer(model: FakeGPT, **options) -> RingmasterMuonAdamW:
    opt = RingmasterMuonAdamW(nanochat_groups(model), **options)
    for group in opt.param_groups:  # as setup_optimizer does
        group["initial_lr"] = group["lr"]
    return opt


def schedule(opt: torch.optim.Optimizer, step: int) -> None:
    """What base_train does before every step: rewrite lr, and momentum / weight decay of muon groups."""
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * (1.0 - 0.2 * step)
        if group["kind"] == "muon":
            group["momentum"] = 0.85 + 0.04 * step
            group["weight_decay"] = 0.2 * (1.0 - 0.3 * step)


def backward(model: FakeGPT, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 37, (2, 9), generator=g)
    model(idx, torch.randint(0, 37, (2, 9), generator=g)).backward()


def train(model: FakeGPT, opt: torch.optim.Optimizer, steps: range, scheduled: bool = True) -> None:
    """Steps as base_train takes them: backward on batch `step`, (schedule,) step, clear grads."""
    for step in steps:
        backward(model, step)
        if scheduled:
            schedule(opt, step)
        opt.step()
        model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- float64 re-implementation
def ref_orthogonalize(X: torch.Tensor, steps: int) -> torch.Tensor:
    """NanoChat's Polar Express iteration on one matrix, float64."""
    X = X / (torch.linalg.matrix_norm(X) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS[:steps]:
        if X.size(0) > X.size(1):
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


def ref_muon_update(x, g, m, v, *, lr, momentum, weight_decay, beta2, ns_steps=5, flags=ALL_ON):
    """One NanoChat Muon step for one matrix (float64, in place on x, m, v); v is the
    NorMuon statistic per row (tall/square) or per column (wide)."""
    rows, cols = x.shape
    m.mul_(momentum).add_(g, alpha=1 - momentum)
    u = momentum * m + (1 - momentum) * g
    if flags["row_equilibration"]:
        u = u * (torch.linalg.matrix_norm(u) / rows**0.5) / u.norm(dim=1, keepdim=True).clamp_min(1e-6)
    o = ref_orthogonalize(u, ns_steps)
    if flags["renormalize"]:
        o = o * min(rows, cols) ** 0.5 / torch.linalg.matrix_norm(o)
    if flags["variance_reduction"]:
        dim = 1 if rows >= cols else 0
        v.mul_(beta2).add_(o.square().mean(dim=dim, keepdim=True), alpha=1 - beta2)
        scaled = o / v.sqrt()
        o = scaled * torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(scaled)
    s = lr * max(1.0, rows / cols) ** 0.5
    mask = (o * x >= 0).double() if flags["cautious_weight_decay"] else 1.0
    x.sub_(s * o + s * weight_decay * x * mask)


def muon_params(shape, k, seed, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        t = torch.randn(shape, generator=g) * 0.3
        if not contiguous:  # a transposed view: same values, other strides
            t = t.mT.contiguous().mT
        out.append(nn.Parameter(t))
    return out


@pytest.mark.parametrize("flags", [ALL_ON, ALL_OFF, {**ALL_OFF, "variance_reduction": True},
                                   {**ALL_ON, "cautious_weight_decay": False}],
                         ids=["nanochat", "plain", "normuon_only", "no_cautious"])
@pytest.mark.parametrize("shape", [(7, 13), (13, 7), (9, 9), (5, 3, 4)], ids=["wide", "tall", "square", "3d"])
def test_muon_group_matches_float64_nanochat_step(flags, shape):
    """Three steps with the loop's lr/momentum/weight-decay rewrites, vs the float64 formula."""
    params = muon_params(shape, 3, seed=1, contiguous=shape != (13, 7))
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    xs = [p.detach().double().reshape(rows, cols).clone() for p in params]
    ms = [torch.zeros_like(x) for x in xs]
    vs = [torch.zeros(rows, 1, dtype=torch.float64) if rows >= cols else torch.zeros(1, cols, dtype=torch.float64)
          for _ in xs]
    opt = RingmasterMuonAdamW([dict(kind="muon", params=params, lr=0.05, momentum=0.9, ns_steps=5,
                                    beta2=0.9, weight_decay=0.3, initial_lr=0.05)], **flags)
    x0 = [x.clone() for x in xs]
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        grads = [torch.randn(shape, generator=g) * 10.0 ** (step - 1) for _ in params]
        for p, gr in zip(params, grads):
            p.grad = gr
        schedule(opt, step)
        opt.step()
        hyper = {k: opt.param_groups[0][k] for k in ("lr", "momentum", "weight_decay", "beta2")}
        for x, gr, m, v in zip(xs, grads, ms, vs):
            ref_muon_update(x, gr.double().reshape(rows, cols), m, v, flags=flags, **hyper)
    for p, x, start in zip(params, xs, x0):
        moved = (x - start).abs().max()
        assert moved > 1e-3
        torch.testing.assert_close(p.detach().double().reshape(rows, cols), x, atol=2e-5 * float(moved), rtol=0)
    momentum = opt.state[params[0]]["momentum_buffer"]
    assert momentum.dtype == torch.float32 and momentum.shape == (3, rows, cols)
    torch.testing.assert_close(momentum.double(), torch.stack(ms), atol=1e-5, rtol=1e-5)


def test_plain_muon_is_keller_formula():
    """Extras off: x <- x - lr sqrt(max(1, r/c)) NS(nesterov) - lr sqrt(max(1, r/c)) wd x, written out."""
    (p,) = muon_params((6, 4), 1, seed=3)
    x = p.detach().double().clone()
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    p.grad = g.clone()
    RingmasterMuonAdamW([dict(kind="muon", params=[p], lr=0.1, momentum=0.8, ns_steps=5, beta2=0.9,
                              weight_decay=0.5)], **ALL_OFF).step()
    u = 0.8 * 0.2 * g.double() + 0.2 * g.double()
    s = 0.1 * 1.5**0.5
    torch.testing.assert_close(p.detach().double(), x - s * ref_orthogonalize(u, 5) - s * 0.5 * x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flags", [ALL_ON, ALL_OFF], ids=["staged", "fused"])
def test_triton_kernels_match_torch_twin(flags):
    """The muon step through the Triton kernels (interpreter on CPU) equals the twin path."""
    a = muon_params((8, 24), 2, seed=5)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for p, q, seed in zip(a, b, (6, 7)):
        p.grad = torch.randn(8, 24, generator=torch.Generator().manual_seed(seed))
        q.grad = p.grad.clone()
    group = dict(kind="muon", lr=0.05, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.2)
    RingmasterMuonAdamW([dict(group, params=a)], backend="triton", **flags).step()
    RingmasterMuonAdamW([dict(group, params=b)], backend="torch", **flags).step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), atol=2e-5, rtol=0)


@pytest.mark.cuda
def test_bf16_cuda_model_tracks_fp32_cpu():
    """On CUDA (bf16 Newton–Schulz, Triton) one step of the fake GPT stays near the CPU fp32 step."""
    torch.manual_seed(0)
    cpu = FakeGPT()
    gpu = copy.deepcopy(cpu).cuda()
    backward(cpu, 1)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        q.grad = p.grad.cuda()
    make_optimizer(cpu).step()
    make_optimizer(gpu).step()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.cpu(), p, atol=5e-3, rtol=5e-2)


def test_adamw_groups_match_torch_adamw():
    """Every AdamW group, with the loop's lr rewrites, against torch.optim.AdamW (for-loop
    implementation) on a copy of the model."""
    torch.manual_seed(0)
    model = FakeGPT()
    twin = copy.deepcopy(model)
    opt = make_optimizer(model)
    twin_of = {id(p): q for p, q in zip(model.parameters(), twin.parameters())}
    ref = torch.optim.AdamW(
        [dict(params=[twin_of[id(p)] for p in g["params"]], lr=g["lr"], initial_lr=g["lr"], kind="adamw",
              betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
         for g in opt.param_groups if g["kind"] == "adamw"],
        foreach=False,
    )
    start = {n: p.detach().clone() for n, p in twin.named_parameters()}
    for step in range(3):
        backward(model, step)
        for p in model.parameters():  # the same gradients (the twin's matrices do not step)
            twin_of[id(p)].grad = p.grad.clone()
        for o in (opt, ref):
            schedule(o, step)
            o.step()
        model.zero_grad(set_to_none=True)
    for n in ("lm_head.weight", "transformer.wte.weight", "resid_lambdas", "x0_lambdas"):
        p, q = dict(model.named_parameters())[n], dict(twin.named_parameters())[n]
        assert not torch.equal(q, start[n])
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_lr_zero_freezes_and_lr_rewrite_reaches_every_group():
    torch.manual_seed(0)
    model = FakeGPT()
    opt = make_optimizer(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model, 0)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert any(s["momentum_buffer"].abs().sum() > 0 for s in opt.state.values() if "momentum_buffer" in s)
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"]
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)


def test_state_dict_round_trip_is_bitwise():
    torch.manual_seed(0)
    model = FakeGPT()
    opt = make_optimizer(model)
    train(model, opt, range(2))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    clone = FakeGPT()
    clone.load_state_dict(saved["model"])
    opt2 = make_optimizer(clone)
    opt2.load_state_dict(saved["opt"])
    for m, o in ((model, opt), (clone, opt2)):
        train(m, o, range(2, 4))
    for (n, p), q in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(p, q), n
    for s in opt2.state.values():
        for key in ("momentum_buffer", "second_momentum_buffer"):
            if key in s:
                assert s[key].dtype == torch.float32


def test_loads_a_nanochat_format_state_dict():
    """NanoChat's own checkpoints: groups without our keys, AdamW step counts as ints."""
    torch.manual_seed(0)
    model = FakeGPT()
    opt = make_optimizer(model)
    train(model, opt, range(2), scheduled=False)
    saved = copy.deepcopy(opt.state_dict())
    nanochat_keys = {"params", "kind", "lr", "initial_lr", "betas", "eps", "weight_decay", "momentum", "ns_steps", "beta2"}
    saved["param_groups"] = [{k: v for k, v in g.items() if k in nanochat_keys} for g in saved["param_groups"]]
    for st in saved["state"].values():
        if "step" in st:
            st["step"] = int(st["step"])
    clone = copy.deepcopy(model)
    opt2 = make_optimizer(clone)
    opt2.load_state_dict(saved)
    for m, o in ((model, opt), (clone, opt2)):
        backward(m, 5)
        o.step()
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("flags", [ALL_ON, ALL_OFF], ids=["staged", "fused"])
def test_partial_gradients_leave_the_rest_alone(flags):
    params = muon_params((5, 8), 3, seed=8)
    solo = [nn.Parameter(params[i].detach().clone()) for i in (0, 2)]
    before = params[1].detach().clone()
    for p, q, seed in zip((params[0], params[2]), solo, (9, 10)):
        p.grad = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
        q.grad = p.grad.clone()
    group = dict(kind="muon", lr=0.05, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.2)
    opt = RingmasterMuonAdamW([dict(group, params=params)], **flags)
    opt.step()
    RingmasterMuonAdamW([dict(group, params=solo)], **flags).step()
    assert torch.equal(params[1], before)
    state = opt.state[params[0]]
    assert state["momentum_buffer"][0].abs().sum() > 0 and state["momentum_buffer"][1].abs().sum() == 0
    assert "second_momentum_buffer" not in state or state["second_momentum_buffer"][1].abs().sum() == 0
    torch.testing.assert_close(params[0].detach(), solo[0].detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(params[2].detach(), solo[1].detach(), atol=1e-6, rtol=0)


def test_nonfinite_gradient_skips_the_step():
    torch.manual_seed(0)
    model = FakeGPT()
    opt = make_optimizer(model)
    backward(model, 0)
    model.lm_head.weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.skipped_steps == 1 and not opt.state
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(FloatingPointError):
        make_optimizer(model, nonfinite="raise").step()


@pytest.mark.parametrize("edit, match", [
    (lambda gs: gs[0].update(kind="sgd"), "kind"),
    (lambda gs: gs[-1].pop("beta2"), "beta2"),
    (lambda gs: gs[-1]["params"].append(nn.Parameter(torch.randn(2, 2))), "one shape"),
    (lambda gs: gs[-1].update(params=[nn.Parameter(torch.randn(4))]), "matrices"),
    (lambda gs: gs[-1].update(ns_steps=7), "ns_steps"),
    (lambda gs: gs[-1].update(momentum=1.0), "momentum"),
    (lambda gs: gs[-1].update(params=[]), "empty"),
])
def test_bad_groups_raise_naming_the_field(edit, match):
    groups = nanochat_groups(FakeGPT())
    edit(groups)
    with pytest.raises(ValueError, match=match):
        RingmasterMuonAdamW(groups)


@pytest.mark.parametrize("key, value", [("lr", -1.0), ("weight_decay", float("nan")), ("momentum", 1.5)])
def test_bad_rewrite_by_the_loop_raises_at_step(key, value):
    model = FakeGPT()
    opt = make_optimizer(model)
    backward(model, 0)
    opt.param_groups[-1][key] = value
    with pytest.raises(ValueError, match=key):
        opt.step()


def test_bad_extra_option_type():
    with pytest.raises(TypeError, match="cautious_weight_decay"):
        RingmasterMuonAdamW(nanochat_groups(FakeGPT()), cautious_weight_decay="yes")


def test_sharded_checkpoint_state_is_refused():
    model = FakeGPT()
    opt = make_optimizer(model)
    group = opt.param_groups[-1]
    p0 = group["params"][0]
    opt.state[p0]["momentum_buffer"] = torch.zeros(1, *p0.shape)  # a rank's chunk, not all K
    backward(model, 0)
    assert len(group["params"]) == 2
    with pytest.raises(ValueError, match="sharded"):
        opt.step()


def test_load_state_dict_checks_the_stacked_muon_state():
    """Muon groups keep (K, rows, cols) state under their first parameter: a state_dict
    of that layout loads, a per-parameter or NaN one is refused at load time."""
    model = FakeGPT()
    opt = make_optimizer(model)
    backward(model, 0)
    opt.step()
    good = opt.state_dict()
    make_optimizer(FakeGPT()).load_state_dict(good)
    gi = len(opt.param_groups) - 1
    k = good["param_groups"][gi]["params"][0]
    for bad, match in [(good["state"][k]["momentum_buffer"][0], "expected"),
                       (torch.full_like(good["state"][k]["momentum_buffer"], float("nan")), "NaN or inf")]:
        damaged = {**good, "state": {**good["state"], k: {**good["state"][k], "momentum_buffer": bad}}}
        with pytest.raises(ValueError, match=match):
            make_optimizer(FakeGPT()).load_state_dict(damaged)


# ---------------------------------------------------------------- distributed
def _rank_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        model = FakeGPT()
        opt = make_optimizer(model)
        for step in range(2):
            backward(model, seed=10 * step + rank)  # each rank its own batch
            schedule(opt, step)
            opt.step()
            model.zero_grad(set_to_none=True)
        torch.save([p.detach() for p in model.parameters()], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_over_two_gloo_ranks(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    out = str(tmp_path / "params")
    procs = [ctx.Process(target=_rank_worker, args=(r, str(tmp_path / "rdv"), out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    assert not alive, "a rank hung"
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    # single process, gradient = mean of the two ranks' gradients
    torch.manual_seed(0)
    model = FakeGPT()
    opt = make_optimizer(model)
    for step in range(2):
        grads = []
        for r in range(2):
            backward(model, seed=10 * step + r)
            grads.append([p.grad.clone() for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        schedule(opt, step)
        opt.step()
        model.zero_grad(set_to_none=True)
    for a, b, p in zip(*ranks, model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, p.detach(), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- patching NanoChat
@pytest.fixture
def fake_nanochat(monkeypatch):
    """A ``nanochat.gpt`` module whose setup_optimizer calls its global MuonAdamW, as NanoChat's does."""
    pkg = types.ModuleType("nanochat")
    gpt = types.ModuleType("nanochat.gpt")

    class MuonAdamW(torch.optim.Optimizer):
        def __init__(self, param_groups):
            super().__init__(param_groups, defaults={})

    exec("def setup_optimizer(groups):\n    return MuonAdamW(groups)\n", gpt.__dict__)
    gpt.MuonAdamW = MuonAdamW
    pkg.gpt = gpt
    monkeypatch.setitem(sys.modules, "nanochat", pkg)
    monkeypatch.setitem(sys.modules, "nanochat.gpt", gpt)
    return gpt


def test_patch_swaps_and_restores(fake_nanochat):
    original = fake_nanochat.MuonAdamW
    with patch():
        opt = fake_nanochat.setup_optimizer(nanochat_groups(FakeGPT()))
        assert type(opt) is RingmasterMuonAdamW
    assert fake_nanochat.MuonAdamW is original
    assert type(fake_nanochat.setup_optimizer(nanochat_groups(FakeGPT()))) is original
    with pytest.raises(RuntimeError), patch():
        raise RuntimeError("boom")
    assert fake_nanochat.MuonAdamW is original


def test_install_binds_options_and_restores(fake_nanochat):
    original = fake_nanochat.MuonAdamW
    restore = install(variance_reduction=False, backend="torch")
    try:
        opt = fake_nanochat.setup_optimizer(nanochat_groups(FakeGPT()))
        assert isinstance(opt, RingmasterMuonAdamW) and opt.backend == "torch"
        assert all(not g["variance_reduction"] for g in opt.param_groups if g["kind"] == "muon")
    finally:
        restore()
    assert fake_nanochat.MuonAdamW is original
    with pytest.raises(TypeError, match="unknown"):
        install(momentum=0.9)
    assert fake_nanochat.MuonAdamW is original


def test_install_refuses_a_module_without_muonadamw(monkeypatch):
    monkeypatch.setitem(sys.modules, "not_nanochat", types.ModuleType("not_nanochat"))
    with pytest.raises(ValueError, match="MuonAdamW"):
        install("not_nanochat")


def test_launcher_runs_base_train_with_ours(tmp_path):
    """python/nanochat_train.py on a fake checkout: the script sees our class and its own args."""
    (tmp_path / "nanochat").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / "nanochat" / "__init__.py").write_text("")
    (tmp_path / "scripts" / "__init__.py").write_text("")
    (tmp_path / "nanochat" / "gpt.py").write_text("class MuonAdamW:\n    pass\n")
    (tmp_path / "scripts" / "base_train.py").write_text(textwrap.dedent("""
        import sys
        from nanochat import gpt
        target = gpt.MuonAdamW.func if hasattr(gpt.MuonAdamW, "func") else gpt.MuonAdamW
        print("OPTIMIZER", target.__name__, getattr(gpt.MuonAdamW, "keywords", {}))
        print("ARGV", sys.argv[1:], __name__)
    """))
    env = dict(os.environ, PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "python", "nanochat_train.py"), "--nanochat-dir", str(tmp_path),
         "--without", "cautious_weight_decay", "--", "--depth=4", "--device-type", "cpu"],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path.parent),
    )
    assert done.returncode == 0, done.stderr
    assert "OPTIMIZER RingmasterMuonAdamW {'cautious_weight_decay': False}" in done.stdout
    assert "ARGV ['--depth=4', '--device-type', 'cpu'] __main__" in done.stdout


def test_coefficients_fold_the_safety_factor():
    """Step one on X/||X|| with the folded triple equals NanoChat's step on X/(1.01 ||X||)."""
    X = torch.randn(5, 7, dtype=torch.float64)

    def quintic(Y, a, b, c):
        A = Y @ Y.T
        return a * Y + b * A @ Y + c * A @ A @ Y

    Z = X / (torch.linalg.matrix_norm(X) + nc.NANOCHAT_NS_EPS)
    Y = X / (torch.linalg.matrix_norm(X) * 1.01 + 1e-6)
    torch.testing.assert_close(quintic(Z, *nc.nanochat_coefficients(1)[0]), quintic(Y, *POLAR_EXPRESS[0]))
    assert nc.nanochat_coefficients(5)[1:] == list(POLAR_EXPRESS[1:5])
