"""The momentum estimators inside the fused step: kernels (TRITON_INTERPRET on CPU) vs the
plain-torch twin, the twin vs float64 formulas, and bad input."""
import pytest
import torch

from ringmaster_kernels import ops

HYPER = dict(lr=0.05, beta=0.8, weight_decay=0.1, radius=1.5, q=0.3)
CASES = [("difference", False), ("vector", False), (None, True), ("difference", True)]  # mvr1, hcm, mvr2, mvr3
SHAPES = [(5, 7), (3, 9), (1, 4)]  # odd shapes, a one-row matrix


def _state(dtype, seed, spectral=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (5, 7)] if spectral else SHAPES  # Newton–Schulz is slow in the interpreter
    make = lambda: [torch.randn(s, generator=gen) for s in shapes]  # noqa: E731
    xs, gs, es = ([t.to(dtype) for t in make()] for _ in range(3))
    ms, hs = make(), make()
    return xs, gs, ms, es, hs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("correction,recursion", CASES)
@pytest.mark.parametrize("norm", ["sign", "l2", "colnorm", "spectral"])
def test_kernel_matches_twin(norm, correction, recursion, dtype, kernel_device):
    xs, gs, ms, es, hs = _state(dtype, seed=3, spectral=norm == "spectral")
    xs, gs, ms, es, hs = ([t.to(kernel_device) for t in ts] for ts in (xs, gs, ms, es, hs))
    # a strided gradient and extra: the launcher copies them contiguous
    gs[0] = gs[0].t().contiguous().t()
    es[1] = torch.cat([es[1], es[1]], dim=1)[:, ::2]
    ref = [[t.clone() for t in ts] for ts in (xs, ms, hs)]
    for _ in range(2):  # the second step starts from the state (m, h) the first one wrote
        for (x, m, h), backend in (((xs, ms, hs), "triton"), (ref, "torch")):
            ops.lmo_step_(x, gs, m, norm=norm, correction=correction, extras=es, recursion=h if recursion else None,
                          backend=backend, **HYPER)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for got, want in zip(xs + ms + hs, ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("correction,recursion", CASES)
def test_twin_matches_float64_formula(correction, recursion):
    xs, gs, ms, es, hs = _state(torch.float32, seed=4)
    x64, g64, m64, e64, h64 = ([t.double() for t in ts] for ts in (xs, gs, ms, es, hs))
    ops.lmo_step_(xs, gs, ms, norm="l2", correction=correction, extras=es, recursion=hs if recursion else None,
                  backend="torch", **HYPER)
    b, q, lr, wd, r = HYPER["beta"], HYPER["q"], HYPER["lr"], HYPER["weight_decay"], HYPER["radius"]
    for x, m, h, x0, g, m0, e, h0 in zip(xs, ms, hs, x64, g64, m64, e64, h64):
        s = g + (1 - q) * (h0 - e) if recursion else g
        m_new = b * m0 + (1 - b) * s + (b * (g - e) if correction == "difference" else b * e if correction else 0)
        x_new = (1 - lr * wd) * x0 - lr * r * m_new / m_new.norm()
        torch.testing.assert_close(m.double(), m_new, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.double(), x_new, rtol=1e-6, atol=1e-6)
        if recursion:
            torch.testing.assert_close(h.double(), s, rtol=1e-6, atol=1e-6)


def test_bad_estimator_inputs():
    xs, gs, ms, es, hs = _state(torch.float32, seed=5)
    step = dict(norm="l2", lr=0.1, beta=0.9, backend="torch")
    with pytest.raises(ValueError, match="correction must be one of"):
        ops.lmo_step_(xs, gs, ms, correction="storm", extras=es, **step)
    with pytest.raises(ValueError, match="extras .* are required"):
        ops.lmo_step_(xs, gs, ms, correction="vector", **step)
    with pytest.raises(ValueError, match="read only with correction or recursion"):
        ops.lmo_step_(xs, gs, ms, extras=es, **step)
    with pytest.raises(ValueError, match=r"extras\[1\] must be"):
        ops.lmo_step_(xs, gs, ms, correction="vector", extras=[es[0], es[0], es[2]], **step)
    with pytest.raises(ValueError, match=r"recursion\[0\] must be a contiguous float32"):
        ops.lmo_step_(xs, gs, ms, extras=es, recursion=[h.double() for h in hs], **step)
    with pytest.raises(ValueError, match="share memory"):
        ops.lmo_step_(xs, gs, ms, extras=es, recursion=[ms[0], hs[1], hs[2]], **step)
    with pytest.raises(ValueError, match="nesterov"):
        ops.lmo_step_(xs, gs, ms, correction="vector", extras=es, nesterov=True, **step)
    with pytest.raises(ValueError, match="q must"):
        ops.lmo_step_(xs, gs, ms, extras=es, recursion=hs, q=1.5, **step)
