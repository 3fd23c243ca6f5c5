"""The fused momentum -> LMO -> update step: twin vs float64, kernels vs twin, edge cases."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ringmaster_kernels import norms, ops, reference
from ringmaster_kernels.kernels import lmo as lmo_kernels

HYPER = dict(lr=0.05, beta=0.9, weight_decay=0.3, radius=1.5)


def _shapes(name):
    """A mixed list: odd shapes, a batched 3-D tensor, vectors where the norm takes them."""
    if name == "bias_rms":
        return [(13,), (4, 7), (1,), (2, 3, 5)]
    shapes = [(7, 5), (3, 6, 9), (33, 17), (1, 4)]
    if norms.get(name).min_dim == 1:
        shapes += [(13,), (1,)]
    if name == "spectral":  # the Newton–Schulz kernels are slow in the interpreter
        shapes = [(7, 5), (2, 6, 9), (7, 5)]
    return shapes


def _state(shapes, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    ms = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return xs, gs, ms


def _x_tol(name, device):
    """On CUDA spectral iterates in bf16, and the kernel rounds u to bf16 before the
    normalization while the twin rounds after it: agreement to bf16 Newton–Schulz noise."""
    return 0.03 * HYPER["lr"] * HYPER["radius"] if name == "spectral" and device.type == "cuda" else 2e-5


def _clone(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("name", norms.KNOWN)
def test_twin_matches_float64_formula(name, nesterov):
    xs, gs, ms = _state(_shapes(name), seed=1)
    x64, g64, m64 = ([t.double() for t in ts] for ts in (xs, gs, ms))
    ops.lmo_step_(xs, gs, ms, norm=name, nesterov=nesterov, backend="torch", **HYPER)
    b, lr = HYPER["beta"], HYPER["lr"]
    for x, m, x0, g, m0 in zip(xs, ms, x64, g64, m64):
        m_new = b * m0 + (1 - b) * g
        u = b * m_new + (1 - b) * g if nesterov else m_new
        x_new = (1 - lr * HYPER["weight_decay"]) * x0 + lr * norms.lmo(u, name, HYPER["radius"], backend="torch")
        torch.testing.assert_close(m.double(), m_new, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.double(), x_new, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("name", norms.KNOWN)
def test_kernel_matches_twin_on_mixed_list(name, nesterov, tiles, kernel_device):
    if tiles == "tiny" and name == "spectral":
        pytest.skip("tile size does not reach Newton–Schulz")
    xs, gs, ms = _state(_shapes(name), kernel_device, seed=2)
    xr, mr = _clone(xs), _clone(ms)
    for _ in range(2):  # the second step starts from the state the first one wrote
        ops.lmo_step_(xs, gs, ms, norm=name, nesterov=nesterov, backend="triton", **HYPER)
        ops.lmo_step_(xr, gs, mr, norm=name, nesterov=nesterov, backend="torch", **HYPER)
    for x, m, x_ref, m_ref in zip(xs, ms, xr, mr):
        torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-6)
        tol = _x_tol(name, kernel_device)
        torch.testing.assert_close(x, x_ref, rtol=tol, atol=tol)


@pytest.fixture
def aligned_flags(monkeypatch):
    """The ALIGNED constexpr of every LMO-kernel launch, in order."""
    flags = []
    launch = lmo_kernels.launch

    def spy(kernel, grid, device, *args, **kwargs):
        flags.append(kwargs["ALIGNED"])
        launch(kernel, grid, device, *args, **kwargs)

    monkeypatch.setattr(lmo_kernels, "launch", spy)
    return flags


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "pointer-off-by-one"])
@pytest.mark.parametrize("name", ["sign", "l2", "rownorm", "colnorm", "bias_rms"])
def test_aligned_variant_matches_twin(name, offset, tiles, kernel_device, aligned_flags):
    # rows of 8k elements and 16-byte aligned storage: the vector-load variant; one
    # element into a buffer breaks the pointer's alignment and must fall back
    shapes = [(16, 24), (2, 8, 32)] if name != "bias_rms" else [(24,), (3, 16)]
    xs, gs, ms = _state(shapes, kernel_device, seed=4)
    gs = [torch.cat([torch.zeros(offset, device=kernel_device), g.flatten()])[offset:].view(g.shape) for g in gs]
    xr, mr = _clone(xs), _clone(ms)
    ops.lmo_step_(xs, gs, ms, norm=name, nesterov=True, backend="triton", **HYPER)
    ops.lmo_step_(xr, gs, mr, norm=name, nesterov=True, backend="torch", **HYPER)
    # the tiny tiles are 4 columns wide: tile starts are not multiples of 8, no vector loads
    assert aligned_flags and set(aligned_flags) == {offset == 0 and tiles == "default"}
    for x, m, x_ref, m_ref in zip(xs, ms, xr, mr):
        torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x, x_ref, rtol=2e-5, atol=2e-5)


_ELEMENTWISE = [n for n in norms.KNOWN if norms.get(n).mode != "direction"]
_shape = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(_ELEMENTWISE), shapes=st.lists(_shape, min_size=1, max_size=4),
       tile=st.sampled_from([16, 64, 4096]), nesterov=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_twin_on_random_lists(name, shapes, tile, nesterov, seed):
    """Random shapes and tile sizes: ragged tiles, units split across tiles, both atomics paths."""
    shapes = [s if len(s) >= norms.get(name).min_dim else s + (3,) for s in shapes]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xs, gs, ms = _state(shapes, device, seed=seed % 1000)
    xr, mr = _clone(xs), _clone(ms)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lmo_kernels, "_TILE_INTERPRET", tile)
        patch.setattr(lmo_kernels, "_TILE", tile)
        ops.lmo_step_(xs, gs, ms, norm=name, nesterov=nesterov, backend="triton", **HYPER)
    ops.lmo_step_(xr, gs, mr, norm=name, nesterov=nesterov, backend="torch", **HYPER)
    for x, m, x_ref, m_ref in zip(xs, ms, xr, mr):
        torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x, x_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", norms.KNOWN)
def test_bf16_params_keep_fp32_state(name, kernel_device):
    """bf16 params, bf16 grads, fp32 momenta: kernel and twin agree to bf16 rounding."""
    xs, gs, ms = _state(_shapes(name)[:2], kernel_device, torch.bfloat16, seed=3)
    xr, mr = _clone(xs), _clone(ms)
    ops.lmo_step_(xs, gs, ms, norm=name, backend="triton", **HYPER)
    ops.lmo_step_(xr, gs, mr, norm=name, backend="torch", **HYPER)
    for x, m, x_ref, m_ref in zip(xs, ms, xr, mr):
        assert x.dtype == torch.bfloat16 and m.dtype == torch.float32
        torch.testing.assert_close(m, m_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x, x_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", norms.KNOWN)
def test_zero_gradient_and_state_only_decays(name, backend, kernel_device):
    xs, gs, ms = _state(_shapes(name)[:2], kernel_device, seed=4)
    gs, ms = [torch.zeros_like(g) for g in gs], [torch.zeros_like(m) for m in ms]
    x0 = _clone(xs)
    ops.lmo_step_(xs, gs, ms, norm=name, backend=backend, **HYPER)
    for x, m, before in zip(xs, ms, x0):
        assert (m == 0).all()
        torch.testing.assert_close(x, before * (1 - HYPER["lr"] * HYPER["weight_decay"]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", norms.KNOWN)
def test_nan_gradient_poisons_only_its_tensor(name, backend, kernel_device):
    shapes = _shapes(name)[:2]
    xs, gs, ms = _state(shapes, kernel_device, seed=5)
    clean_x, clean_m = _clone(xs), _clone(ms)
    ops.lmo_step_(clean_x, gs, clean_m, norm=name, backend="torch", **HYPER)
    gs[1].view(-1)[0] = float("nan")
    ops.lmo_step_(xs, gs, ms, norm=name, backend=backend, **HYPER)
    assert ms[1].isnan().any() and xs[1].isnan().any()
    tol = _x_tol(name, kernel_device)
    torch.testing.assert_close(xs[0], clean_x[0], rtol=tol, atol=tol)
    torch.testing.assert_close(ms[0], clean_m[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_muon_is_spectral_with_muon_scale_and_nesterov(backend, kernel_device):
    xs, gs, ms = _state([(12, 5), (4, 10)], kernel_device, seed=6)
    x0, m0 = _clone(xs), _clone(ms)
    lr, b = 0.02, 0.95
    ops.lmo_step_(xs, gs, ms, norm="spectral", scale="muon", lr=lr, beta=b, nesterov=True, backend=backend)
    for x, x_before, g, m_before in zip(xs, x0, gs, m0):
        m = b * m_before + (1 - b) * g
        u = b * m + (1 - b) * g
        rows, cols = x.shape
        expected = x_before - lr * max(1.0, rows / cols) ** 0.5 * reference.orthogonalize(u)
        tol = _x_tol("spectral", kernel_device)
        torch.testing.assert_close(x, expected, rtol=tol, atol=tol)


def test_bf16_newton_schulz_twin_matches_float64_to_bf16():
    """compute_dtype=bf16 with Muon's settings (torch.optim.Muon's math, on the CPU twin): the
    step's LMO part is the float64 one to bf16 accuracy; the momentum is untouched by it."""
    shapes = [(48, 32), (2, 32, 40), (48, 32)]
    xs, gs, ms = _state(shapes, seed=12)
    x64, g64, m64 = ([t.double() for t in ts] for ts in (xs, gs, ms))
    muon = dict(scale="muon", coefficients="quintic")
    ops.lmo_step_(xs, gs, ms, norm="spectral", nesterov=True, compute_dtype=torch.bfloat16, backend="torch",
                  **muon, **HYPER)
    b, lr, decay = HYPER["beta"], HYPER["lr"], 1 - HYPER["lr"] * HYPER["weight_decay"]
    u = 2.0 ** -8  # bf16 unit roundoff
    for x, m, x0, g, m0 in zip(xs, ms, x64, g64, m64):
        m_new = b * m0 + (1 - b) * g
        step = lr * norms.lmo(b * m_new + (1 - b) * g, "spectral", HYPER["radius"], compute_dtype=torch.float64,
                              **muon)
        torch.testing.assert_close(m.double(), m_new, rtol=1e-6, atol=1e-6)
        rel = float((x.double() - decay * x0 - step).norm() / step.norm())
        # a few u: rounding is amplified where the polynomial is steep (small singular
        # values); > 1e-4 shows the iteration did run in bf16
        assert 1e-4 < rel < 8 * u, rel


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compute_dtype_reaches_newton_schulz_batched_by_shape(backend, monkeypatch, kernel_device):
    """One Newton–Schulz call per shape on both paths, iterating in the dtype asked for."""
    calls = []
    module = reference if backend == "torch" else ops  # the twin calls its own orthogonalize
    real = module.orthogonalize
    monkeypatch.setattr(module, "orthogonalize",
                        lambda G, *a, **k: (calls.append((tuple(G.shape), k.get("compute_dtype"))), real(G, *a, **k))[1])
    xs, gs, ms = _state(_shapes("spectral"), kernel_device, seed=13)
    xr, mr = _clone(xs), _clone(ms)
    ops.lmo_step_(xs, gs, ms, norm="spectral", compute_dtype=torch.float16, backend=backend, **HYPER)
    assert sorted(calls) == [((1, 2, 6, 9), torch.float16), ((2, 7, 5), torch.float16)]
    monkeypatch.setattr(module, "orthogonalize", real)
    ops.lmo_step_(xr, gs, mr, norm="spectral", compute_dtype=torch.float16, backend="torch", **HYPER)
    tol = 3e-2 * HYPER["lr"] * HYPER["radius"]  # fp16 Newton–Schulz noise on the LMO part
    for x, x_ref in zip(xs, xr):
        torch.testing.assert_close(x, x_ref, rtol=tol, atol=tol)
    x32, m32 = _state(_shapes("spectral"), kernel_device, seed=13)[0::2]
    ops.lmo_step_(x32, gs, m32, norm="spectral", compute_dtype=torch.float32, backend=backend, **HYPER)
    assert not all(torch.equal(a, b) for a, b in zip(xs, x32))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_grads_are_copied(backend, kernel_device):
    xs, gs, ms = _state([(6, 9), (2, 5, 4)], kernel_device, seed=7)
    strided = [g.mT.contiguous().mT for g in gs]
    assert not any(g.is_contiguous() for g in strided)
    xr, mr = _clone(xs), _clone(ms)
    ops.lmo_step_(xs, strided, ms, norm="rownorm", backend=backend, **HYPER)
    ops.lmo_step_(xr, gs, mr, norm="rownorm", backend=backend, **HYPER)
    for a, b in zip(xs + ms, xr + mr):
        torch.testing.assert_close(a, b)


def test_one_launch_per_pass_for_a_long_list(monkeypatch, kernel_device):
    """Sixty mixed-size tensors cost one launch per pass per (param, grad) dtype pair."""
    calls = []
    for method in ("stats_pass", "update_pass"):
        original = getattr(lmo_kernels._Launch, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(lmo_kernels._Launch, method, counted)
    shapes = [(1 + i % 7, 3 + i % 5) for i in range(60)]
    for name, passes in (("sign", 1), ("l2", 2), ("colnorm", 2)):
        xs, gs, ms = _state(shapes, kernel_device, seed=8)
        xs[::2] = [x.half() for x in xs[::2]]
        gs[::2] = [g.half() for g in gs[::2]]
        calls.clear()
        ops.lmo_step_(xs, gs, ms, norm=name, backend="triton", **HYPER)
        assert calls.count("update_pass") == 2  # fp16 and fp32 groups
        assert len(calls) == 2 * passes


def test_empty_list_and_empty_tensors_are_noops(kernel_device):
    ops.lmo_step_([], [], [], norm="sign", backend="triton", **HYPER)
    xs, gs, ms = _state([(0, 5), (3, 4)], kernel_device, seed=9)
    xr, mr = _clone(xs), _clone(ms)
    ops.lmo_step_(xs, gs, ms, norm="l2", backend="triton", **HYPER)
    ops.lmo_step_(xr, gs, mr, norm="l2", backend="torch", **HYPER)
    torch.testing.assert_close(xs[1], xr[1])


def test_bad_input_names_the_argument():
    xs, gs, ms = _state([(4, 5), (3, 3)], seed=10)
    step = ops.lmo_step_
    with pytest.raises(ValueError, match="same length"):
        step(xs, gs[:1], ms, norm="sign", **HYPER)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        step(xs, [gs[0], gs[1][:2]], ms, norm="sign", **HYPER)
    with pytest.raises(TypeError, match=r"momenta\[0\] must be float32"):
        step(xs, gs, [ms[0].double(), ms[1]], norm="sign", **HYPER)
    with pytest.raises(ValueError, match=r"params\[0\] must be contiguous"):
        step([xs[0].mT, xs[1]], [gs[0].mT, gs[1]], [ms[0].mT, ms[1]], norm="sign", **HYPER)
    with pytest.raises(TypeError, match="params must be a list"):
        step(xs[0], gs, ms, norm="sign", **HYPER)
    with pytest.raises(TypeError, match=r"grads\[0\] must be a torch.Tensor"):
        step(xs, [None, gs[1]], ms, norm="sign", **HYPER)
    with pytest.raises(ValueError, match="beta"):
        step(xs, gs, ms, norm="sign", **{**HYPER, "beta": 1.5})
    with pytest.raises(ValueError, match="lr"):
        step(xs, gs, ms, norm="sign", **{**HYPER, "lr": float("inf")})
    with pytest.raises(ValueError, match="radius"):
        step(xs, gs, ms, norm="sign", **{**HYPER, "radius": -1})
    with pytest.raises(TypeError, match="nesterov"):
        step(xs, gs, ms, norm="sign", nesterov=1, **HYPER)
    with pytest.raises(ValueError, match="norm must be one of"):
        step(xs, gs, ms, norm="frobenius", **HYPER)
    with pytest.raises(TypeError, match="unexpected option"):
        step(xs, gs, ms, norm="l2", steps=3, **HYPER)
    with pytest.raises(TypeError, match="compute_dtype"):
        step(xs, gs, ms, norm="spectral", compute_dtype=torch.int8, **HYPER)
    with pytest.raises(ValueError, match=r"params\[0\] must have shape"):
        step([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], norm="spectral", **HYPER)


def test_aliased_lists_are_refused_before_any_write():
    """A param listed twice was stepped twice; a param as its own momentum (or
    gradient) was overwritten mid-step. Disjoint views of one buffer are fine, and
    gradients may share memory (they are only read)."""
    xs, gs, ms = _state([(4, 5), (4, 5)], seed=11)
    before = _clone(xs) + _clone(ms)
    cases = [
        ([xs[0], xs[0]], gs, ms, r"params\[1\] and params\[0\] share memory"),
        ([xs[0]], [gs[0]], [xs[0]], r"momenta\[0\] and params\[0\] share memory"),
        ([xs[0]], [xs[0]], [ms[0]], r"grads\[0\] and params\[0\] share memory"),
        (xs, gs, [ms[0], ms[0]], r"momenta\[1\] and momenta\[0\] share memory"),
    ]
    flat = torch.zeros(40)
    cases.append(([flat[:20].view(4, 5)], [gs[0]], [flat[10:30].view(4, 5)], r"momenta\[0\] and params\[0\]"))
    for params, grads, momenta, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.lmo_step_(params, grads, momenta, norm="sign", **HYPER)
    for t, b in zip(xs + ms, before):
        assert torch.equal(t, b)  # nothing was written
    ops.lmo_step_([flat[:20].view(4, 5)], [gs[0]], [flat[20:].view(4, 5)], norm="sign", **HYPER)
    ops.lmo_step_(xs, [gs[0], gs[0]], ms, norm="sign", **HYPER)


@pytest.mark.cuda
@pytest.mark.parametrize("name", norms.KNOWN)
def test_cuda_bf16_step(name):
    xs, gs, ms = _state([(256, 384), (3, 64, 96), (1000, 33)] if name != "bias_rms" else [(768,), (5, 33)],
                        "cuda", torch.bfloat16, seed=11)
    xr, mr = _clone(xs), _clone(ms)
    ops.lmo_step_(xs, gs, ms, norm=name, nesterov=True, backend="triton", **HYPER)
    ops.lmo_step_(xr, gs, mr, norm=name, nesterov=True, backend="torch", **HYPER)
    for x, m, x_ref, m_ref in zip(xs, ms, xr, mr):
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x, x_ref, rtol=2e-2, atol=2e-2)
