"""Public tensor ops. The only module that chooses between a Triton kernel and its twin."""
from __future__ import annotations

import math
import numbers

import torch

from . import catalogue, reference
from .backend import resolve_backend
from .catalogue import FLOAT_DTYPES
from .coefficients import Coefficients, schedule


def _check_real(name: str, value: object, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
    return float(value)


def check_hyper(name: str, value: object, device: torch.device, low: float | None = None,
                high: float | None = None) -> float | torch.Tensor:
    """A hyperparameter as a float (finite, in [low, high]), or a 0-dim fp32 tensor on
    ``device``, whose value is not checked: reading it would synchronize with the device,
    which a capturable step must never do."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype != torch.float32 or value.device != device:
            raise ValueError(f"{name} as a tensor must be a 0-dim float32 tensor on {device}, got "
                             f"shape {tuple(value.shape)}, {value.dtype} on {value.device}")
        return value
    return _check_real(name, value, low, high)


def check_hyper_kinds(**values: float | torch.Tensor) -> bool:
    """Whether the (checked) hyperparameters are device tensors: all of them or none (the
    kernels read one flag per launch); TypeError naming them otherwise."""
    kinds = {isinstance(v, torch.Tensor) for v in values.values()}
    if len(kinds) > 1:
        *first, last = values
        each = "both" if len(values) == 2 else "all"
        raise TypeError(f"{', '.join(first)} and {last} must {each} be numbers or {each} 0-dim tensors "
                        "(a capturable step)")
    return kinds.pop() if kinds else False


def check_newton_schulz(
    steps: object, coefficients: object, eps: object, *, names: tuple[str, str, str] = ("steps", "coefficients", "eps")
) -> None:
    """TypeError/ValueError unless the Newton–Schulz settings are valid, naming the bad
    one as ``names`` (steps, coefficients, eps) give it: callers check before any work."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{names[2]} must be a finite number >= 0, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{names[2]} must be a finite number >= 0, got {eps!r}")
    schedule(coefficients, steps, steps_name=names[0], coefficients_name=names[1])  # type: ignore[arg-type]


def _check_out(out: torch.Tensor | None, like: torch.Tensor) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must match G's shape/dtype/device {tuple(like.shape)}/{like.dtype}/{like.device}, "
            f"got {tuple(out.shape)}/{out.dtype}/{out.device}"
        )


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
    out: torch.Tensor | None = None,
    *,
    compute_dtype: torch.dtype | None = None,
    scale: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 0.0,
    ns_update: str = "triton",
    backend: str | None = "auto",
) -> torch.Tensor:
    """Approximate the polar factor ``U V^T`` of ``G = U S V^T`` by Newton–Schulz.

    Args:
        G: (m, n) or a batch (..., m, n) of same-shape matrices; fp32, fp16, bf16 or fp64,
            any strides. Tall matrices iterate on the small Gram matrix X^T X (the kernels
            read them through a transposed view, the twin multiplies in their own layout).
        steps: number of iterations.
        coefficients: ``"quintic"`` (Muon), ``"polar_express"`` or one (a, b, c) per step.
        eps: added to the Frobenius norm before normalizing (done in fp32); a zero
            matrix maps to zero, not NaN.
        out: optional tensor of G's shape, dtype and device to write into (may be G).
        compute_dtype: dtype of the iteration math; bf16 on CUDA, fp32 on CPU by default.
        scale: the result is ``scale * U V^T``, applied in the last kernel's epilogue
            (e.g. ``-lr * rho`` for a spectral LMO step).
        beta: when nonzero, ``out`` (required) becomes ``beta * out + scale * U V^T`` in
            the same epilogue (e.g. ``1 - lr * weight_decay``: a fused parameter update).
            With ``beta = 0`` ``out`` is never read.
            ``scale`` and ``beta`` may instead both be 0-dim fp32 tensors on G's device
            (a capturable step): the kernel reads them, nothing is read on the host, and
            ``out`` is then always read (give it).
        ns_update: ``"triton"`` (default) or ``"cublas"``: what computes the non-final
            updates ``X <- a X + B X`` on the kernel path (the fused update kernel, or
            ``torch.baddbmm``: cuBLAS on a GPU, after one normalization pass); the last
            update is always the fused epilogue. Unmeasured on a GPU so far; choose by
            ``benchmarks/gpu_check.py``. The twin ignores it.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; ``$RINGMASTER_BACKEND`` applies
            when this is ``"auto"``.

    Returns:
        A tensor of G's shape and dtype (``out`` if given). Non-finite input propagates
        NaN to the output of that matrix only; nothing raises or hangs on it.
    """
    catalogue.check_float_tensor("G", G)
    _check_out(out, G)
    check_newton_schulz(steps, coefficients, eps)
    scale = check_hyper("scale", scale, G.device)
    beta = check_hyper("beta", beta, G.device)
    if (check_hyper_kinds(scale=scale, beta=beta) or beta != 0.0) and out is None:
        raise ValueError("beta != 0 (or a tensor beta) accumulates into out, so out must be given")
    catalogue.check_ns_update(ns_update)
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be one of {FLOAT_DTYPES}, got {compute_dtype}")
    if resolve_backend(backend, G) == "triton":
        from .kernels import newton_schulz

        return newton_schulz.orthogonalize(G, steps, coefficients, eps, out, compute_dtype, scale, beta, ns_update)
    return reference.orthogonalize(G, steps, coefficients, eps, out, compute_dtype, scale, beta, ns_update)


# ---------------------------------------------------------------- fused LMO step
def _check_lists(spec, params, grads, momenta) -> list[torch.Tensor]:
    """Validate the three lists; return grads, made contiguous where they were not."""
    lists = {"params": params, "grads": grads, "momenta": momenta}
    for name, seq in lists.items():
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if not len(params) == len(grads) == len(momenta):
        raise ValueError(
            f"params, grads and momenta must have the same length, got {len(params)}, {len(grads)}, {len(momenta)}"
        )
    device = params[0].device if params and isinstance(params[0], torch.Tensor) else None
    for i, (x, g, m) in enumerate(zip(params, grads, momenta)):
        for name, t in (("params", x), ("grads", g), ("momenta", m)):
            catalogue.check_tensor(f"{name}[{i}]", t, spec)
            if t.shape != x.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, params[{i}] has {tuple(x.shape)}")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, params[0] on {device}: one device per call")
        if m.dtype != torch.float32:
            raise TypeError(f"momenta[{i}] must be float32 (fp32 state for every param dtype), got {m.dtype}")
        for name, t in (("params", x), ("momenta", m)):
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous: it is updated in place")
    _check_no_aliasing(params, grads, momenta)
    return [g.contiguous() for g in grads]


def _check_estimator(params, momenta, correction, extras, recursion, nesterov):
    """Validate the estimator inputs of ``lmo_step_``; returns (extras made contiguous, recursion)."""
    if correction not in reference.CORRECTIONS:
        raise ValueError(f"correction must be one of {reference.CORRECTIONS}, got {correction!r}")
    if extras is None:
        if correction is not None or recursion is not None:
            raise ValueError("extras (the gradients at the previous iterate, or the Hessian-vector products) "
                             "are required with correction or recursion")
        return None, None
    if correction is None and recursion is None:
        raise ValueError("extras are read only with correction or recursion; pass one")
    if nesterov:
        raise ValueError("nesterov is the ema estimator's; it does not combine with correction or recursion")
    for name, seq in (("extras", extras), ("recursion", recursion)):
        if seq is None:
            continue
        if not isinstance(seq, (list, tuple)) or len(seq) != len(params):
            raise ValueError(f"{name} must be a list of {len(params)} tensors, got {type(seq).__name__}")
        for i, (t, x) in enumerate(zip(seq, params)):
            if not isinstance(t, torch.Tensor) or t.shape != x.shape or t.device != x.device or not t.is_floating_point():
                raise ValueError(f"{name}[{i}] must be a float tensor of params[{i}]'s shape {tuple(x.shape)} "
                                 f"on {x.device}")
    if recursion is not None:
        for i, h in enumerate(recursion):
            if h.dtype != torch.float32 or not h.is_contiguous():
                raise ValueError(f"recursion[{i}] must be a contiguous float32 tensor: it is updated in place")
        _check_no_aliasing([*params, *recursion], list(extras), [*momenta])
    return [e.contiguous() for e in extras], recursion


def _check_no_aliasing(params, grads, momenta) -> None:
    """ValueError when a tensor written in place (a param or a momentum) shares memory
    with any other tensor of the call: a param listed twice would be stepped twice, a
    param that is its own momentum (or gradient) would be overwritten mid-step.
    Gradients may share memory with each other: they are only read."""
    spans = []  # (start byte, end byte, written, label) of every non-empty tensor
    for name, seq, written in (("params", params, True), ("momenta", momenta, True), ("grads", grads, False)):
        for i, t in enumerate(seq):
            if t.numel() == 0:
                continue
            last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # the farthest element
            start = t.data_ptr()
            spans.append((start, start + (last + 1) * t.element_size(), written, f"{name}[{i}]"))
    spans.sort(key=lambda s: s[0])
    reach_any = reach_written = (0, "")  # the farthest end so far, and whose
    for start, end, written, label in spans:
        if start < reach_written[0] or (written and start < reach_any[0]):
            other = reach_written[1] if start < reach_written[0] else reach_any[1]
            raise ValueError(
                f"{label} and {other} share memory; lmo_step_ updates params and momenta in place, "
                "so each must be a tensor of its own (and no gradient may alias them)"
            )
        reach_any = max(reach_any, (end, label))
        if written:
            reach_written = max(reach_written, (end, label))


def lmo_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momenta: list[torch.Tensor],
    *,
    norm: str,
    lr: float | torch.Tensor,
    beta: float | torch.Tensor,
    nesterov: bool = False,
    weight_decay: float | torch.Tensor = 0.0,
    radius: float = 1.0,
    backend: str | None = "auto",
    correction: str | None = None,
    extras: list[torch.Tensor] | None = None,
    recursion: list[torch.Tensor] | None = None,
    q: float = 0.0,
    **options,
) -> None:
    """One fused LMO-momentum step for a list of same-norm parameters, in place.

    Per tensor, with fp32 math::

        m <- beta * m + (1 - beta) * g
        u  = beta * m + (1 - beta) * g   if nesterov else m
        x <- (1 - lr * weight_decay) * x + lr * lmo(u, norm, radius)

    ``x`` is rounded once into its own dtype. Muon is ``norm="spectral",
    scale="muon", nesterov=True``; Scion's constrained step is ``weight_decay=1``.

    Args:
        params: tensors updated in place; fp32, fp16, bf16 (or fp64: the kernels still
            compute in fp32), contiguous; shapes as ``norms.lmo`` accepts for ``norm``.
        grads: same shapes; any float dtype; non-contiguous ones are copied first.
        momenta: fp32 state of the same shapes, contiguous, updated in place.
        norm: a name in ``norms.KNOWN``; ``**options`` are its options (spectral:
            ``scale``, ``steps``, ``coefficients``, ``eps``, ``compute_dtype``: the
            Newton–Schulz iteration dtype, None for the device default, bf16 on CUDA
            and fp32 on CPU; ``torch.bfloat16`` on CPU is torch.optim.Muon's math;
            ``ns_update``: "triton" or "cublas", see ``orthogonalize``).
        lr, weight_decay: finite reals. beta: in [0, 1]. radius: finite, >= 0.
            lr, beta and weight_decay may instead all three be 0-dim fp32 tensors on
            the params' device (a capturable step, for CUDA graphs): the kernels (and
            the twin) read them on the device, nothing is read on the host, and their
            values are not range-checked (that would synchronize).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (``$RINGMASTER_BACKEND`` applies
            for ``"auto"``). On Triton the whole list is a few launches: sign is one
            pass over (g, m, x); l2/rownorm/colnorm/bias_rms two; spectral and l1 a
            momentum pass writing u, the direction (batched Newton–Schulz per shape),
            and one update pass.

    The momentum estimators of ``optim/estimators.py`` run in the same pass (the
    elementwise terms of ``reference.momentum_update_``): ``extras`` (read-only, one per
    tensor, any float dtype: the gradient at the previous iterate, or a Hessian-vector
    product) with ``correction`` "difference" (``m += beta (g - e)``, MVR) or "vector"
    (``m += beta e``, HCM); ``recursion``: MVR-2's fp32 state ``h`` (contiguous, updated
    in place: ``h <- g + (1 - q)(h - e)``, the EMA then runs on h), with ``q`` in [0, 1].

    Zero gradients and zero state give a zero LMO (x only decays), never NaN. A
    non-finite gradient poisons that tensor's momentum and makes the affected units
    of x NaN (see ``norms``): skip the step upstream if that must not happen.
    """
    spec = catalogue.get(norm)
    opts = catalogue.resolve_options(spec, options)
    radius = catalogue.check_radius(radius)
    device = params[0].device if isinstance(params, (list, tuple)) and params and isinstance(params[0], torch.Tensor) else None
    lr = check_hyper("lr", lr, device)
    beta = check_hyper("beta", beta, device, 0.0, 1.0)
    weight_decay = check_hyper("weight_decay", weight_decay, device)
    check_hyper_kinds(lr=lr, beta=beta, weight_decay=weight_decay)
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    if norm == "spectral":  # before the momentum pass: nothing is written on bad settings
        check_newton_schulz(opts["steps"], opts["coefficients"], opts["eps"])
    grads = _check_lists(spec, params, grads, momenta)
    extras, recursion = _check_estimator(params, momenta, correction, extras, recursion, nesterov)
    q = _check_real("q", q, 0.0, 1.0)
    live = [i for i, x in enumerate(params) if x.numel() > 0]
    if not live:
        return
    params, grads, momenta = ([seq[i] for i in live] for seq in (params, grads, momenta))
    estimator = {}
    if extras is not None:
        estimator = dict(correction=correction, extras=[extras[i] for i in live], q=q,
                         recursion=None if recursion is None else [recursion[i] for i in live])
    hyper = dict(lr=lr, beta=beta, nesterov=nesterov, weight_decay=weight_decay, radius=radius, **estimator)
    with torch.no_grad():
        if resolve_backend(backend, *params, *grads, *momenta) == "torch":
            reference.lmo_step_(params, grads, momenta, norm=norm, **hyper, **opts)
            return
        from .kernels import lmo as lmo_kernels

        direction_dtype = torch.float32
        if norm == "spectral":
            compute = opts["compute_dtype"] or reference.default_compute_dtype(params[0].device)
            # u is written straight in bf16 when the iteration is bf16 (same range as fp32,
            # so nothing overflows before the normalization); fp16 keeps an fp32 buffer.
            if compute == torch.bfloat16:
                direction_dtype = compute

            def direction(buf: torch.Tensor) -> None:
                orthogonalize(buf, opts["steps"], opts["coefficients"], opts["eps"], out=buf,
                              compute_dtype=compute, ns_update=opts["ns_update"], backend=backend)
        else:
            def direction(buf: torch.Tensor) -> None:
                buf.copy_(reference.lmo(buf, norm).neg_())
        lmo_kernels.lmo_step_(
            params, grads, momenta, spec, **hyper, scale=opts.get("scale", "none"),
            direction=direction, direction_dtype=direction_dtype,
        )
