"""Norm-ball LMOs: catalogue, float64 direct formulas, identities, kernels vs twin."""
import math

import pytest
import torch
from conftest import poison_like
from hypothesis import given, settings
from hypothesis import strategies as st

from ringmaster_kernels import norms

ELEMENTWISE = [n for n in norms.KNOWN if norms.get(n).mode != "direction"]  # the norms with Triton kernels


def _shapes(name):
    """Odd shapes, a batch, and a vector where the norm takes one."""
    shapes = [(7, 5), (1, 9), (3, 6, 9), (2, 2, 4, 3)]
    if norms.get(name).min_dim == 1:
        shapes.append((11,))
    return shapes


def _well_conditioned(m, n, lo=0.1, batch=(), dtype=torch.float64, gen=None):
    """U diag(s) V^T with singular values in [lo, 1] * 3, so Newton–Schulz converges."""
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, dtype=dtype, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, dtype=dtype, generator=gen))
    s = 3 * torch.linspace(lo, 1.0, k, dtype=dtype)
    return U @ torch.diag_embed(s.expand(*batch, k)) @ V.mT, U @ V.mT


# ---------------------------------------------------------------- direct float64 formulas
def _direct(G, name, r):
    """Loop-by-loop textbook formulas (independent of the vectorized twin)."""
    if name in ("sign", "l2", "l1") and G.dim() == 1:
        return _direct(G[None], name, r)[0] if name != "l2" else -r * G / G.norm()
    if name == "bias_rms":
        return torch.stack([-r * math.sqrt(g.numel()) * g / g.norm() for g in G.reshape(-1, G.shape[-1])]).view_as(G)
    out = torch.empty_like(G)
    for b, M in enumerate(G.reshape(-1, *G.shape[-2:])):
        m, n = M.shape
        O = out.view(-1, m, n)[b]
        if name == "sign":
            O.copy_(-r * torch.sign(M))
        elif name == "l2":
            O.copy_(-r * M / torch.sqrt((M * M).sum()))
        elif name == "l1":
            O.zero_()
            i, j = divmod(int(M.abs().argmax()), n)
            O[i, j] = -r * torch.sign(M[i, j])
        elif name == "colnorm":
            for j in range(n):
                O[:, j] = -r * math.sqrt(m) * M[:, j] / M[:, j].norm()
        elif name == "rownorm":
            for i in range(m):
                O[i] = -r * M[i] / (math.sqrt(n) * M[i].norm())
    return out


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_lmo_matches_float64_direct_formula(name):
    gen = torch.Generator().manual_seed(1)
    for shape in _shapes(name):
        G = torch.randn(shape, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(norms.lmo(G, name, 1.7, backend="torch"), _direct(G, name, 1.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale,factor", [("none", lambda m, n: 1.0), ("scion", lambda m, n: math.sqrt(m / n)),
                                          ("muon", lambda m, n: math.sqrt(max(1.0, m / n)))])
@pytest.mark.parametrize("m,n", [(9, 5), (4, 11)])
def test_spectral_matches_svd(m, n, scale, factor):
    gen = torch.Generator().manual_seed(2)
    G, UVt = _well_conditioned(m, n, batch=(2,), gen=gen)
    r, s = 0.7, factor(m, n)
    # Cubic Newton–Schulz iterated to convergence: the LMO equals -r s U V^T from the SVD.
    cubic = [(1.5, -0.5, 0.0)] * 40
    D = norms.lmo(G, "spectral", r, scale=scale, steps=40, coefficients=cubic, backend="torch")
    torch.testing.assert_close(D, -r * s * UVt, rtol=0, atol=1e-6)  # iterates in fp32 on CPU
    # Default Polar Express (5 steps) leaves singular values near, not at, 1.
    sv = torch.linalg.svdvals(norms.lmo(G, "spectral", r, scale=scale, backend="torch")) / (r * s)
    assert sv.min() > 0.85 and sv.max() < 1.15
    torch.testing.assert_close(norms.dual_norm(G, "spectral", scale=scale), s * torch.linalg.svdvals(G).sum(-1))


@pytest.mark.parametrize("m,n", [(9, 5), (4, 11), (64, 48)])
def test_spectral_bf16_newton_schulz_matches_svd_to_bf16(m, n):
    """compute_dtype=bf16 (torch.optim.Muon's math, on the CPU twin): converged Newton–Schulz
    lands on the SVD polar factor to bf16 accuracy, fp32 to fp32 accuracy."""
    gen = torch.Generator().manual_seed(9)
    G, UVt = _well_conditioned(m, n, batch=(2,), gen=gen)
    G, target = G.float(), -0.7 * UVt
    cubic = [(1.5, -0.5, 0.0)] * 40  # c = 0 also covers the twin's zero-alpha path
    u = 2.0 ** -8  # bf16 unit roundoff
    rel = {}
    for dtype in (torch.bfloat16, torch.float32):
        D = norms.lmo(G, "spectral", 0.7, steps=40, coefficients=cubic, compute_dtype=dtype, backend="torch")
        assert D.dtype == torch.float32
        rel[dtype] = (D.double() - target).norm(dim=(-2, -1)) / target.norm(dim=(-2, -1))
        # Polar Express (5 steps) in this dtype: singular values near 1, as in fp32
        sv = torch.linalg.svdvals(norms.lmo(G, "spectral", compute_dtype=dtype, backend="torch").double())
        assert sv.min() > 0.85 and sv.max() < 1.15
    assert (rel[torch.bfloat16] < 4 * u).all(), rel
    assert (rel[torch.float32] < 1e-5).all(), rel
    assert (rel[torch.bfloat16] > 10 * rel[torch.float32]).all()  # the option reached the iteration


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compute_dtype_reaches_orthogonalize(backend, monkeypatch, kernel_device):
    from ringmaster_kernels import ops

    seen, real = [], ops.orthogonalize
    monkeypatch.setattr(ops, "orthogonalize", lambda G, *a, **k: (seen.append(k["compute_dtype"]), real(G, *a, **k))[1])
    G = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(10)).to(kernel_device)
    Z = norms.lmo(G, "spectral", 0.5, compute_dtype=torch.float16, out=poison_like(G), backend=backend)
    assert seen == [torch.float16]
    # fp16 iteration: matches the fp16 twin to fp16 noise, and is not the fp32 result
    torch.testing.assert_close(Z, norms.lmo(G, "spectral", 0.5, compute_dtype=torch.float16, backend="torch"),
                               rtol=3e-2, atol=3e-2)
    assert not torch.equal(Z, norms.lmo(G, "spectral", 0.5, compute_dtype=torch.float32, backend=backend))


# ---------------------------------------------------------------- identities, as properties
_dims = st.integers(1, 9)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(ELEMENTWISE), m=_dims, n=_dims, batch=st.integers(0, 2), vector=st.booleans(),
       r=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1))
def test_identities(name, m, n, batch, vector, r, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if vector and norms.get(name).min_dim == 1 else (batch,) * (batch > 0) + (m, n)
    G = torch.randn(shape, dtype=torch.float64, generator=gen)
    Z = norms.lmo(G, name, r, backend="torch")
    inner = _unit_inner(G, Z, name)
    torch.testing.assert_close(inner, -r * norms.dual_norm(G, name), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(norms.primal_norm(Z, name), torch.full_like(inner, r), rtol=1e-10, atol=0)
    # optimality: no random point of the ball does better
    W = torch.randn((16, *shape), dtype=torch.float64, generator=gen)
    W = W * (r / norms.primal_norm(W, name))[(...,) + (None,) * (G.dim() - inner.dim())]
    assert (_unit_inner(G, W, name) >= inner - 1e-9).all()


def _unit_inner(G, Z, name):
    """<G, Z> per unit of the norm (Z may carry extra leading batch dims)."""
    return (G * Z).sum(dim=(-2, -1) if G.dim() >= 2 and name != "bias_rms" else -1)


def test_spectral_identities_on_well_conditioned_input():
    gen = torch.Generator().manual_seed(3)
    G, _ = _well_conditioned(6, 10, lo=0.3, batch=(3,), gen=gen)
    for scale in norms.SPECTRAL_SCALES:
        Z = norms.lmo(G, "spectral", 2.0, scale=scale, backend="torch")
        inner = _unit_inner(G, Z, "spectral")
        torch.testing.assert_close(inner, -2.0 * norms.dual_norm(G, "spectral", scale=scale), rtol=0.1, atol=0)
        assert (norms.primal_norm(Z, "spectral", scale=scale) <= 2.0 * 1.15).all()


# ---------------------------------------------------------------- zero and non-finite input
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", norms.KNOWN)
def test_zero_unit_gives_zero_and_leaves_others(name, backend, kernel_device):
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(3, 5, 4, generator=gen).to(kernel_device)
    G[1] = 0.0
    if name == "bias_rms":
        G[0, 2] = 0.0
    Z = norms.lmo(G, name, 1.0, backend=backend)
    assert torch.isfinite(Z).all()
    assert (Z[1] == 0).all()
    ref = norms.lmo(G, name, 1.0, backend="torch")
    tol = 2e-2 if name == "spectral" and Z.is_cuda else 1e-5
    torch.testing.assert_close(Z, ref, rtol=tol, atol=tol)
    assert (Z[0] != 0).any() and (Z[2] != 0).any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_non_finite_input_is_confined_to_its_unit(name, backend, kernel_device):
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(3, 6, 5, generator=gen).to(kernel_device)
    G[1, 2, 3] = float("nan")
    G[2, 4, 1] = float("inf")
    Z = norms.lmo(G, name, 1.0, backend=backend)
    clean = norms.lmo(G[:1], name, 1.0, backend="torch")
    torch.testing.assert_close(Z[:1], clean)  # other units untouched
    assert Z[1].isnan().any()  # NaN in, NaN out for its unit
    # inf: sign/l1 give a finite direction, the normalizing norms NaN (inf/inf)
    assert torch.isfinite(Z[2]).all() == (name in ("sign", "l1"))
    torch.testing.assert_close(Z, norms.lmo(G, name, 1.0, backend="torch"), equal_nan=True)


# ---------------------------------------------------------------- kernels against the twin
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_kernel_matches_twin(name, dtype, tiles, kernel_device):
    gen = torch.Generator().manual_seed(6)
    for shape in _shapes(name) + [(19, 37)]:
        G = torch.randn(shape, generator=gen).to(dtype).to(kernel_device)
        out = poison_like(G)
        Z = norms.lmo(G, name, 1.3, out=out, backend="triton")
        assert Z is out
        ref = norms.lmo(G, name, 1.3, backend="torch")
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(Z, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_kernel_non_contiguous_input(name, kernel_device):
    gen = torch.Generator().manual_seed(7)
    G = torch.randn(4, 9, 6, generator=gen, device="cpu").to(kernel_device).transpose(-2, -1)
    if name == "bias_rms":
        G = G[..., ::2]
    assert not G.is_contiguous()
    torch.testing.assert_close(norms.lmo(G, name, backend="triton"), norms.lmo(G.contiguous(), name, backend="torch"))


def test_kernel_spectral_matches_twin(kernel_device):
    gen = torch.Generator().manual_seed(8)
    G = torch.randn(2, 20, 12, generator=gen).to(kernel_device)
    Z = norms.lmo(G, "spectral", 0.5, scale="scion", out=poison_like(G), backend="triton")
    tol = 2e-2 if kernel_device.type == "cuda" else 1e-4  # CUDA iterates in bf16
    torch.testing.assert_close(Z, norms.lmo(G, "spectral", 0.5, scale="scion", backend="torch"), rtol=tol, atol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_kernel_bf16_cuda(name):
    G = torch.randn(5, 33, 17, device="cuda").bfloat16()
    torch.testing.assert_close(norms.lmo(G, name, backend="triton"), norms.lmo(G, name, backend="torch"),
                               rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- shapes and bad input
def test_dual_norm_shapes():
    assert norms.dual_norm(torch.randn(3, 4, 5), "l2").shape == (3,)
    assert norms.dual_norm(torch.randn(4, 5), "spectral").shape == ()
    assert norms.dual_norm(torch.randn(7), "sign").shape == ()
    assert norms.dual_norm(torch.randn(3, 4, 5), "bias_rms").shape == (3, 4)
    assert norms.dual_norm(torch.randn(3, 4).double(), "colnorm").dtype == torch.float64
    assert norms.dual_norm(torch.randn(3, 4).half(), "rownorm").dtype == torch.float32


@pytest.mark.parametrize("name", norms.KNOWN)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0), (0, 2, 3), (3, 0, 2)])
def test_empty_units_give_zeros(name, shape):
    """An empty unit has a zero LMO and zero norms (l1's argmax and sign/colnorm/rownorm's
    amax used to raise IndexError on it, rownorm divided by sqrt(0))."""
    G = torch.empty(shape)
    if G.dim() < norms.get(name).min_dim:
        return
    out = norms.lmo(G, name)
    assert out.shape == G.shape
    for f in (norms.dual_norm, norms.primal_norm):
        value = f(G, name)
        assert torch.equal(value, torch.zeros_like(value)), (f.__name__, value)


@pytest.mark.parametrize("f", [norms.dual_norm, norms.primal_norm])
def test_spectral_norms_of_non_finite_matrices_are_nan_or_inf(f):
    """SVD refuses NaN input with a LinAlgError; the norms give NaN for that matrix
    (inf for one holding inf) and leave the other matrices of the batch alone."""
    G = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))
    G[1, 2, 0] = math.nan
    G[2, 0, 1] = math.inf
    G[3, 1, 1], G[3, 0, 0] = math.inf, math.nan
    value = f(G, "spectral", scale="scion")
    clean = f(G[[0]], "spectral", scale="scion")
    assert value[0] == clean[0] and torch.isfinite(clean).all()
    assert math.isnan(value[1]) and value[2] == math.inf and math.isnan(value[3])


def test_bad_input_names_the_argument():
    G = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"norm must be one of .*'spectral'.*'bias_rms'"):
        norms.lmo(G, "nuclear")
    with pytest.raises(TypeError, match="norm must be a str"):
        norms.dual_norm(G, 3)
    with pytest.raises(ValueError, match="radius"):
        norms.lmo(G, "sign", -1.0)
    with pytest.raises(ValueError, match="radius"):
        norms.lmo(G, "sign", float("nan"))
    with pytest.raises(TypeError, match="unexpected option.*'scale'"):
        norms.lmo(G, "sign", scale="scion")
    with pytest.raises(ValueError, match="scale must be one of"):
        norms.lmo(G, "spectral", scale="rms")
    for bad in (torch.int32, "bfloat16"):
        with pytest.raises(TypeError, match="compute_dtype must be None or one of"):
            norms.lmo(G, "spectral", compute_dtype=bad)
    with pytest.raises(TypeError, match="unexpected option.*'compute_dtype'"):
        norms.lmo(G, "l2", compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"G must have shape \(m, n\)"):
        norms.lmo(torch.randn(5), "colnorm")
    with pytest.raises(TypeError, match="G must be a torch.Tensor"):
        norms.lmo([[1.0]], "sign")
    with pytest.raises(TypeError, match="G must be a floating tensor"):
        norms.lmo(torch.ones(3, 3, dtype=torch.int32), "l2")
    with pytest.raises(ValueError, match="out must match"):
        norms.lmo(G, "l2", out=torch.empty(5, 4))
    with pytest.raises(ValueError, match="backend"):
        norms.lmo(G, "l2", backend="cuda")
