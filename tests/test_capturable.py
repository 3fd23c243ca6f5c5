"""Capturable steps (Gluon and the NanoChat drop-in with ``capturable=True``): lr, momentum
and weight decay live in 0-dim device tensors that the kernels read, so a step can be
captured in a CUDA graph.

On the CPU the kernels run under TRITON_INTERPRET=1 in fp32. What is checked here: the
same results as the eager optimizer under a scheduler, no host synchronization in a warm
step (``forbid_host_sync``: a dispatch mode failing on ``_local_scalar_dense`` and the
other syncing operators), the kernels reading the tensors' current values, checkpoints,
refusals; the graph capture itself needs CUDA (last tests, skipped without one).
"""
from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
from torch import nn

from conftest import KERNEL_DEVICE
from ringmaster_kernels.integrations.nanochat import EXTRAS
from ringmaster_kernels.kernels.launches import HostSyncError, forbid_host_sync
from ringmaster_kernels.optim import Gluon

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_nanochat_integration import FakeGPT, backward, make_optimizer, schedule  # noqa: E402


def _backward_on(model, seed):
    """``backward`` with the batch on the model's device."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    idx, targets = (torch.randint(0, 37, (2, 9), generator=g).to(device) for _ in range(2))
    model(idx, targets).backward()

DEV = KERNEL_DEVICE
SHAPES = [(20, 36), (36, 20), (20, 36), (36,)]  # two shape groups for Newton–Schulz, a vector
CAPTURABLE = dict(capturable=True, nonfinite="ignore")


def _params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(DEV)) for s in shapes]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(DEV) for p in params]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _pair(norm, backend, **options):
    """An eager Gluon and a capturable one over equal copies of the same parameters."""
    ps, qs = _params(), _params()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, norm=norm, radius=1.5, backend=backend, **options)
    return ps, Gluon(ps, **kw), qs, Gluon(qs, **kw, **CAPTURABLE)


NORMS = ["spectral", "sign", "l2", "colnorm", "l1"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("norm", NORMS)
def test_capturable_steps_match_eager_steps_under_schedulers(backend, norm):
    """Several steps with an LR scheduler (it fills the capturable group's tensor in place)
    and momentum / weight decay written as numbers (copied in at the next step)."""
    ps, eager, qs, capt = _pair(norm, backend)
    assert all(isinstance(capt.param_groups[0][k], torch.Tensor) for k in ("lr", "momentum", "weight_decay"))
    lr_tensor = capt.param_groups[0]["lr"]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1)) for o in (eager, capt)]
    for step in range(4):
        grads = _grads(ps, step)
        _set_grads(ps, grads), _set_grads(qs, grads)
        if step == 2:
            for opt in (eager, capt):
                opt.param_groups[0]["momentum"] = 0.8
                opt.param_groups[0]["weight_decay"] = 0.3
        eager.step(), capt.step()
        for s in scheds:
            s.step()
        # fp32 kernels; -lr*radius and 1 - lr*wd are formed in fp32 on the device, in
        # float64 then rounded on the eager path: an ulp of the coefficient at most
        for p, q in zip(ps, qs):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert capt.param_groups[0]["lr"] is lr_tensor  # the scheduler filled it, never replaced it
    assert capt.param_groups[0]["momentum"].item() == pytest.approx(0.8)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("options", [{}, {"maximize": True, "nesterov": False}, {"ns_update": "cublas"}],
                         ids=["default", "maximize_ema", "cublas"])
def test_a_warm_capturable_step_never_waits_for_the_device(backend, norm, options):
    ps, eager, qs, capt = _pair(norm, backend, **options)
    _set_grads(qs, _grads(qs, 0))
    capt.step()  # cold: autotuning, address tables and direction buffers are made here
    _set_grads(qs, _grads(qs, 1))
    capt.param_groups[0]["lr"].fill_(0.02)  # a scheduler's in-place update, between steps
    with forbid_host_sync():
        capt.step()
    # the guard does catch what the eager optimizer does: its non-finite check
    _set_grads(ps, _grads(ps, 1))
    with pytest.raises(HostSyncError, match="_local_scalar_dense"):
        with forbid_host_sync():
            eager.step()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_step_reads_the_lr_tensors_current_value(backend):
    ps, eager, qs, capt = _pair("spectral", backend)
    lr = capt.param_groups[0]["lr"]
    _set_grads(qs, _grads(qs, 0))
    before = [q.detach().clone() for q in qs]
    lr.fill_(0.0)
    capt.step()  # momentum moves, the parameters do not (decay 1 - 0 * wd = 1, step 0)
    assert all(torch.equal(q, b) for q, b in zip(qs, before))
    # the same step from the same state at lr 0.05, written in place
    with torch.no_grad():
        for p, q in zip(ps, qs):
            p.copy_(q)
    lr.fill_(0.05)
    eager.load_state_dict(capt.state_dict())  # the momenta, and lr 0.05 as a number
    assert eager.param_groups[0]["lr"] == pytest.approx(0.05)
    grads = _grads(ps, 1)
    _set_grads(ps, grads), _set_grads(qs, grads)
    eager.step(), capt.step()
    moved = max((q - b).abs().max().item() for q, b in zip(qs, before))
    assert moved > 1e-3
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_keeps_the_device_tensors():
    ps, _, qs, capt = _pair("spectral", "triton")
    _set_grads(qs, _grads(qs, 0))
    capt.step()
    saved = capt.state_dict()
    assert isinstance(saved["param_groups"][0]["lr"], torch.Tensor)
    capt.param_groups[0]["lr"].fill_(1.0)  # the saved copy does not follow the live tensor
    assert saved["param_groups"][0]["lr"].item() == pytest.approx(0.05)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    other = Gluon(ps, lr=0.7, momentum=0.5, weight_decay=0.0, radius=1.5, backend="triton", **CAPTURABLE)
    tensors = {k: other.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")}
    with torch.no_grad():
        for p, q in zip(ps, qs):
            p.copy_(q)
    other.load_state_dict(torch.load(buffer))
    for key, tensor in tensors.items():  # the same objects (a captured graph keeps reading them), loaded values
        assert other.param_groups[0][key] is tensor
        assert tensor.item() == pytest.approx(saved["param_groups"][0][key].item())
    capt.param_groups[0]["lr"].fill_(0.05)
    grads = _grads(ps, 1)
    _set_grads(ps, grads), _set_grads(qs, grads)
    other.step(), capt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    # an eager optimizer loads the same checkpoint with numbers
    eager = Gluon(_params(), lr=0.1, backend="triton")
    eager.load_state_dict(saved)
    assert all(isinstance(eager.param_groups[0][k], float) for k in ("lr", "momentum", "weight_decay"))
    assert eager.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(capturable=True), "nonfinite='ignore'"),
        (dict(capturable=True, nonfinite="raise"), "nonfinite='ignore'"),
        (dict(L0=1.0, L1=0.5, **CAPTURABLE), "step_rule 'l0l1'"),
        (dict(step_rule="theorem2", **CAPTURABLE), "step_rule 'theorem2'"),
        (dict(momentum_estimator="mvr1", **CAPTURABLE), "momentum_estimator 'mvr1'"),
        (dict(lr=-1.0, **CAPTURABLE), "lr must be a finite number >= 0"),
        (dict(momentum=1.0, **CAPTURABLE), r"momentum must be in \[0, 1\)"),
    ],
)
def test_what_a_capturable_step_cannot_do_is_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        Gluon(_params(), **options)


def test_tensors_given_to_the_constructor_are_the_groups_own_unless_shared():
    lr, momentum, wd = (torch.tensor(v, device=DEV) for v in (0.05, 0.9, 0.1))
    qs = _params()
    opt = Gluon([{"params": qs[:2]}, {"params": qs[2:], "lr": torch.tensor(0.5, dtype=torch.float64)}],
                lr=lr, momentum=momentum, weight_decay=wd, **CAPTURABLE)
    first, second = opt.param_groups
    assert first["lr"] is lr and first["momentum"] is momentum and first["weight_decay"] is wd
    # the second group got the defaults' tensors too (torch fills them in): copies of its own;
    # its float64 lr became fp32
    assert second["momentum"] is not momentum and second["momentum"].item() == pytest.approx(0.9)
    assert second["lr"].dtype == torch.float32 and second["lr"].item() == pytest.approx(0.5)


def test_refusals_at_step_after_a_group_edit():
    qs = _params()
    capt = Gluon(qs, **CAPTURABLE)
    _set_grads(qs, _grads(qs, 0))
    capt.param_groups[0]["step_rule"] = "theorem2"
    with pytest.raises(ValueError, match="capturable=True supports step_rule 'constant'"):
        capt.step()
    capt.param_groups[0]["step_rule"] = None
    capt.param_groups[0]["lr"] = float("nan")  # a number written over the tensor is checked
    with pytest.raises(ValueError, match="lr must be"):
        capt.step()
    with pytest.raises(TypeError, match="capturable must be a bool"):
        Gluon(_params(), capturable=1, nonfinite="ignore")


# --------------------------------------------------------------------- the NanoChat drop-in
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("flags", [{k: True for k in EXTRAS}, {k: False for k in EXTRAS}], ids=["nanochat", "plain"])
def test_nanochat_drop_in_capturable_matches_eager_under_its_training_loop(backend, flags):
    """NanoChat's loop writes lr (from ``initial_lr``, which setup_optimizer aliases to the
    group's lr tensor), momentum and weight decay as numbers before every step."""
    torch.manual_seed(0)
    a = FakeGPT()
    b = copy.deepcopy(a)
    eager = make_optimizer(a, backend=backend, **flags)
    capt = make_optimizer(b, backend=backend, **CAPTURABLE, **flags)
    assert all(isinstance(g["lr"], torch.Tensor) for g in capt.param_groups)
    for step in range(4):
        backward(a, step), backward(b, step)
        schedule(eager, step), schedule(capt, step)
        eager.step(), capt.step()
        a.zero_grad(set_to_none=True), b.zero_grad(set_to_none=True)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # a warm step whose groups hold their tensors (the last step put them back): nothing waits
    backward(b, 9)
    with forbid_host_sync():
        capt.step()


def test_nanochat_drop_in_reads_its_lr_tensors_and_round_trips():
    torch.manual_seed(0)
    model = FakeGPT()
    opt = make_optimizer(model, **CAPTURABLE, **{k: False for k in EXTRAS})
    tensors = [g["lr"] for g in opt.param_groups]
    for lr in tensors:
        lr.fill_(0.0)
    backward(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # lr 0 everywhere: AdamW and Muon both leave the weights alone
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    saved = opt.state_dict()
    for lr in tensors:
        lr.fill_(0.02)
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.load_state_dict(saved)
    for group, lr in zip(opt.param_groups, tensors):  # the loaded value, in the same tensor
        assert group["lr"] is lr and lr.item() == 0.0


# ------------------------------------------------------------------ CUDA graphs (need a GPU)
def _capture(step):
    """Warm ``step`` up on a side stream (autotuning, tables, buffers), then capture it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@pytest.mark.cuda
@pytest.mark.parametrize("norm", ["spectral", "sign"])
def test_a_captured_gluon_step_replays_like_eager_steps(norm):
    ps, qs = _params(), _params()
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, norm=norm, **CAPTURABLE)
    graphed, eager = Gluon(ps, **kw), Gluon(qs, **kw)
    static = _grads(ps, 0)
    for p, g in zip(ps, static):
        p.grad = g
    graph = _capture(graphed.step)
    _set_grads(qs, static)
    for _ in range(3):  # the warm-up and the captured step ran on ps
        eager.step()
    for step in range(1, 4):
        grads = _grads(ps, step)
        for g, new in zip(static, grads):
            g.copy_(new)
        _set_grads(qs, grads)
        for opt in (graphed, eager):
            opt.param_groups[0]["lr"].fill_(0.05 / (step + 1))  # what a scheduler does
        graph.replay()
        eager.step()
        torch.cuda.synchronize()
        # the same kernels and configs; spectral and sign use no atomics, so the replay
        # should match to the bit; the tolerance only absorbs an fp32 ulp
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("flags", [{k: True for k in EXTRAS}, {k: False for k in EXTRAS}], ids=["nanochat", "plain"])
def test_a_captured_nanochat_step_replays_like_eager_steps(flags):
    torch.manual_seed(0)
    a = FakeGPT().cuda()
    b = copy.deepcopy(a)
    graphed = make_optimizer(a, **CAPTURABLE, **flags)
    eager = make_optimizer(b, **CAPTURABLE, **flags)
    _backward_on(a, 0)
    static = [p.grad for p in a.parameters()]
    graph = _capture(graphed.step)
    for p, g in zip(b.parameters(), static):
        p.grad = g.clone()
    for _ in range(3):
        eager.step()
    for step in range(1, 4):
        b.zero_grad(set_to_none=True)
        _backward_on(b, step)
        for g, p in zip(static, b.parameters()):
            g.copy_(p.grad)
        for opt in (graphed, eager):
            for group in opt.param_groups:
                group["lr"].fill_(group["initial_lr"] * (1.0 - 0.2 * step))
        graph.replay()
        eager.step()
        torch.cuda.synchronize()
        # fused AdamW and the NorMuon reductions are deterministic for a fixed launch;
        # the tolerance absorbs fp32 ulps
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
