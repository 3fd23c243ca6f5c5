"""Batched Newton–Schulz orthogonalization in Triton.

One iteration ``X <- a X + (b A + c A A) X`` with ``A = X X^T`` is three launches:

1. ``_syrk_kernel``: ``A = X X^T``. Only tiles on and above the diagonal are computed;
   each off-diagonal tile is also stored transposed below the diagonal.
2. ``_syrk_kernel`` again: ``B = c A A^T + b A`` (A is symmetric, so ``A A = A A^T`` has
   the same symmetric shape; the ``b A`` term is added in the epilogue).
3. ``_update_kernel``: ``X' = B X + a X``, the ``a X`` term added in the epilogue. On the
   last step the same epilogue writes ``beta * out + scale * X'`` straight into ``out``
   (G's dtype and strides), so a spectral LMO / parameter update needs no extra pass.
   ``scale`` and ``beta`` may be 0-dim fp32 device tensors (a capturable step): the
   epilogue then reads them from memory (:mod:`.hyper`).

``ns_update="cublas"`` runs the non-final updates (3.) as ``torch.baddbmm`` (cuBLAS on a
GPU) instead; the input is then normalized once up front, as the twin does, since a
matmul library takes no per-matrix input scale. Which is faster is unmeasured (no GPU
in the task that wrote it): ``benchmarks/gpu_check.py`` times both.

Every kernel takes the batch as grid axis 1, computes offsets in int64, masks ragged
edges and accepts any strides. Tall matrices (m > n) are iterated on their transposed
*view* (strides swapped), so no transpose copy is made. The Frobenius norms come from
two small reductions (``_sumsq_kernel``, ``_inverse_norm_kernel``), and the scaling is
folded into the first iteration's epilogues (``s^2`` on X X^T, ``s`` on the update), so
it is never a separate elementwise pass and the k loops stay plain loads the compiler
pipelines (async copies, an MMA in flight; see ``ringmaster inspect sm90``). An fp16
iteration on a wider input scales on load instead (unscaled values could overflow fp16),
and so does fp64, to round like its twin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..backend import interpreting
from ..coefficients import Coefficients, schedule
from . import hyper
from .launches import launch

# CUDA caps grid axes 1 and 2 at 65535; larger batches are launched in chunks of views.
_MAX_GRID_Y = 65535

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _syrk_configs() -> list[triton.Config]:
    if interpreting():
        # The interpreter's cost is per program; 16 is tl.dot's minimum and makes even
        # tiny test matrices span several tiles, so mirroring and masks get exercised.
        return [triton.Config({"BLOCK": 16, "BLOCK_K": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK": b, "BLOCK_K": k}, num_warps=w, num_stages=s)
        # sm_90 machine code of each (ringmaster inspect sm90): none spills in bf16/fp16.
        # Left out for spilling: a 256 tile on 8 warps (1.3-1.5 KB of stack) and 128x64
        # on 4 warps, 3 stages (16 B of stack with the b A addend)
        for b, k, w, s in (
            (64, 64, 4, 4),
            (64, 32, 4, 5),
            (128, 32, 4, 4),
            (128, 64, 8, 3),
            (128, 64, 8, 4),
        )
    ]


def _update_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        # none spills on sm_90 in bf16/fp16 (ringmaster inspect sm90); 128x128x32 on 4
        # warps and 128x256 on 8 spilled with the accumulating epilogue and are left out
        for m, n, k, w, s in (
            (64, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (128, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
        )
    ]


def _tile_side(config: triton.Config) -> int:
    return config.kwargs.get("BLOCK", config.kwargs.get("BLOCK_M"))


def _prune(configs: list[triton.Config], named_args: dict, **_: object) -> list[triton.Config]:
    """Drop configs whose tiles overhang the matrix by more than one halving.

    A 256-wide tile on a 96-row Gram matrix is mostly masked-out work; keeping the tiles
    that fit (or the smallest ones when none fits) is the shape heuristic, and the
    autotuner times what is left.
    """
    fit = [c for c in configs if _tile_side(c) <= 2 * named_args["M"]]
    smallest = min(_tile_side(c) for c in configs)
    return fit or [c for c in configs if _tile_side(c) == smallest]


@triton.jit
def _load_scaled(ptrs, mask, in_scale, SCALE_ON_LOAD: tl.constexpr, COMPUTE: tl.constexpr):
    """Load a tile as the compute dtype, applying the fp32 normalization when asked."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if SCALE_ON_LOAD:
        x = x.to(tl.float32) * in_scale
    return x.to(COMPUTE)


# The Frobenius normalization: per-tile partial sums of squares, then one program per
# matrix adds its partials in a fixed order (deterministic, unlike atomics) and writes
# ``1 / (safety * ||G||_F + eps)``: two launches for any batch, in place of about eight
# small torch kernels. A tile of 4096 elements keeps a program's load a few KB.
_NORM_TILE = (32, 128)
_NORM_SUM_BLOCK = 1024


@triton.jit
def _sumsq_kernel(
    X, Partial, M, N, TILES_N,
    stride_b, stride_m, stride_n,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial[b, t] = sum of squares of tile t of X[b] (M, N), in ACC. Grid: (tiles, batch)."""
    t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    rows = ((t // TILES_N) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = ((t % TILES_N) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(X + batch * stride_b + rows[:, None] * stride_m + cols[None, :] * stride_n, mask=mask, other=0.0)
    x = x.to(ACC)
    tl.store(Partial + batch * tl.num_programs(0) + t, tl.sum(tl.sum(x * x, axis=1), axis=0))


@triton.jit
def _inverse_norm_kernel(Partial, Out, NUM, safety, eps, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Out[b] = fp32 1 / (safety * sqrt(sum Partial[b, :]) + eps), 0 where the norm is 0
    (or NaN: the NaN then reaches the iteration through the data). Grid: (batch,)."""
    batch = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, NUM, BLOCK):
        idx = start + offsets
        acc += tl.load(Partial + batch * NUM + idx, mask=idx < NUM, other=0.0)
    # the norm rounded to fp32 first, then fp32 arithmetic, as reference.inverse_norm does
    norm = tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32)
    inverse = tl.where(norm > 0, 1.0 / (norm * safety + eps), 0.0)
    tl.store(Out + batch, inverse)


# Neither kernel writes a tensor it reads, except _update_kernel's ``Out`` when
# HAS_BETA (it accumulates into it); that one is restored between autotuning trials.
# Autotune keys hold the strides of the operands read along their inner dimension: a
# (768, 3072) matrix and the transposed view of a (3072, 768) one share M, K and BATCH
# but compile to different specialisations (which stride is 1), and may want different
# configs. Results are cached on disk (Triton's cache), so a new process does not re-time.
@triton.autotune(configs=_syrk_configs(), key=["M", "K", "BATCH", "HAS_Y", "stride_pm", "stride_pk"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def _syrk_kernel(
    P, Y, Out, in_scale,
    M, K, BATCH,
    stride_pb, stride_pm, stride_pk,
    stride_yb, stride_ym, stride_yn,
    stride_ob, stride_om, stride_on,
    alpha, beta,
    HAS_Y: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_ON_LOAD: tl.constexpr,
    COMPUTE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Out[b] = alpha * P[b] P[b]^T + beta * Y[b] for P (M, K); Y, Out (M, M) symmetric.

    Grid: (number of upper-triangle tiles, batch). When HAS_SCALE, P is scaled by
    ``in_scale[b]`` (the first iteration reads G itself): ``s^2`` in the epilogue, or on
    load when SCALE_ON_LOAD.
    """
    # Upper-triangle tile t, enumerated column by column: t = j (j + 1) / 2 + i, i <= j.
    t = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    j = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # fp32 sqrt can land one off near perfect squares; correct exactly in integers.
    j = tl.where(j * (j + 1) // 2 > t, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= t, j + 1, j)
    i = t - j * (j + 1) // 2

    rows = (i * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (j * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < M
    P = P + batch * stride_pb
    s = 1.0
    if HAS_SCALE:
        s = tl.load(in_scale + batch)

    acc = tl.zeros((BLOCK, BLOCK), dtype=ACC)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k0 * BLOCK_K + ks
        k_ok = kk < K
        lhs = _load_scaled(P + rows[:, None] * stride_pm + kk[None, :] * stride_pk,
                           row_ok[:, None] & k_ok[None, :], s, SCALE_ON_LOAD, COMPUTE)
        rhs = _load_scaled(P + cols[None, :] * stride_pm + kk[:, None] * stride_pk,
                           k_ok[:, None] & col_ok[None, :], s, SCALE_ON_LOAD, COMPUTE)
        acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION, out_dtype=ACC)

    if HAS_SCALE:
        if not SCALE_ON_LOAD:
            acc = acc * s * s  # one factor at a time: s * s alone could underflow
    acc = acc * alpha
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_Y:
        Y = Y + batch * stride_yb
        y = tl.load(Y + rows[:, None] * stride_ym + cols[None, :] * stride_yn, mask=tile_ok, other=0.0)
        acc += beta * y.to(ACC)
    Out = Out + batch * stride_ob
    result = acc.to(Out.dtype.element_ty)
    # (r, c) and (c, r) of a diagonal tile are separate dot products, and neither an MMA
    # unit nor a CPU BLAS (the interpreter) promises to round them alike. So each tile
    # stores only its elements on or above the diagonal and mirrors those strictly above
    # it; for an off-diagonal tile (i < j) that is the whole tile both times.
    upper = tile_ok & (rows[:, None] <= cols[None, :])
    tl.store(Out + rows[:, None] * stride_om + cols[None, :] * stride_on, result, mask=upper)
    mirror = col_ok[:, None] & row_ok[None, :] & (cols[:, None] > rows[None, :])
    tl.store(Out + cols[:, None] * stride_om + rows[None, :] * stride_on, tl.trans(result), mask=mirror)


@triton.autotune(
    configs=_update_configs(),
    key=["M", "N", "BATCH", "HAS_BETA", "stride_bm", "stride_bk", "stride_xm", "stride_xn", "stride_om", "stride_on"],
    prune_configs_by={"early_config_prune": _prune},
    restore_value=["Out"],
    cache_results=True,
)
@triton.jit
def _update_kernel(
    Bm, X, Out, in_scale,
    M, N, BATCH,
    stride_bb, stride_bm, stride_bk,
    stride_xb, stride_xm, stride_xn,
    stride_ob, stride_om, stride_on,
    a, out_scale, beta,
    HAS_SCALE: tl.constexpr, SCALE_ON_LOAD: tl.constexpr, HAS_BETA: tl.constexpr, HYPER_ON_DEVICE: tl.constexpr,
    COMPUTE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Out[b] = out_scale * (Bm[b] X[b] + a X[b]) (+ beta * Out[b] when HAS_BETA).

    Bm (M, M), X and Out (M, N). Grid: (output tiles, batch), tiles grouped GROUP_M rows
    at a time so consecutive programs share Bm rows in L2. HYPER_ON_DEVICE: out_scale and
    beta point at fp32 scalars.
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < N
    Bm = Bm + batch * stride_bb
    X = X + batch * stride_xb
    s = 1.0
    if HAS_SCALE:
        s = tl.load(in_scale + batch)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, tl.cdiv(M, BLOCK_K)):
        kk = k0 * BLOCK_K + ks
        k_ok = kk < M
        lhs = tl.load(Bm + rows[:, None] * stride_bm + kk[None, :] * stride_bk,
                      mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(COMPUTE)
        rhs = _load_scaled(X + kk[:, None] * stride_xm + cols[None, :] * stride_xn,
                           k_ok[:, None] & col_ok[None, :], s, SCALE_ON_LOAD, COMPUTE)
        acc = tl.dot(lhs, rhs, acc, input_precision=PRECISION, out_dtype=ACC)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    x = _load_scaled(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, tile_ok, s, SCALE_ON_LOAD, COMPUTE)
    acc = acc + a * x.to(ACC)
    if HAS_SCALE:
        if not SCALE_ON_LOAD:
            acc = acc * s
    acc = acc * hyper.value(out_scale, HYPER_ON_DEVICE)
    Out = Out + batch * stride_ob
    out_ptrs = Out + rows[:, None] * stride_om + cols[None, :] * stride_on
    if HAS_BETA:  # read `out` only when asked: an unwritten (e.g. NaN) out must not leak in
        acc += hyper.value(beta, HYPER_ON_DEVICE) * tl.load(out_ptrs, mask=tile_ok, other=0.0).to(ACC)
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=tile_ok)


def _precision(compute: torch.dtype) -> str:
    # fp32 iteration honours torch's TF32 switch, like the twin's matmuls do.
    if compute == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _scale_on_load(source: torch.dtype, compute: torch.dtype) -> bool:
    """Whether the normalization must precede the cast: into fp16 from a wider dtype,
    where unscaled values could overflow (bf16 and fp32 hold any bf16/fp32 magnitude),
    and in fp64, whose twin normalizes in fp32 (rounding G to fp32 first, as on load)."""
    return compute == torch.float64 or (compute == torch.float16 and source != torch.float16)


def _batch_parts(batch: int, *tensors: torch.Tensor | None):
    """The tensors themselves when the batch fits one grid (no view is made); else views
    of at most ``_MAX_GRID_Y`` batch entries each (``None`` stays ``None``)."""
    if batch <= _MAX_GRID_Y:
        yield tensors
        return
    for start in range(0, batch, _MAX_GRID_Y):
        part = slice(start, min(start + _MAX_GRID_Y, batch))
        yield tuple(None if t is None else t[part] for t in tensors)


def inverse_norm(G: torch.Tensor, safety: float, eps: float) -> torch.Tensor:
    """fp32 ``1 / (safety * ||G[b]||_F + eps)`` per matrix of G (batch, m, n), shape
    (batch,); 0 for a zero matrix. Twin: :func:`reference.inverse_norm` (sums in fp32,
    fp64 for fp64 input; the order of the sum differs, so the last bits may)."""
    batch, m, n = G.shape
    acc = tl.float64 if G.dtype == torch.float64 else tl.float32
    block_m, block_n = _NORM_TILE
    tiles_n = triton.cdiv(n, block_n)
    tiles = triton.cdiv(m, block_m) * tiles_n
    partial = torch.empty(batch, tiles, dtype=torch.float64 if G.dtype == torch.float64 else torch.float32,
                          device=G.device)
    out = torch.empty(batch, dtype=torch.float32, device=G.device)
    for g, p, o in _batch_parts(batch, G, partial, out):
        launch(_sumsq_kernel, (tiles, g.shape[0]), G.device, g, p, m, n, tiles_n, *g.stride(),
               ACC=acc, BLOCK_M=block_m, BLOCK_N=block_n)
        launch(_inverse_norm_kernel, (g.shape[0],), G.device, p, o, tiles, float(safety), float(eps),
               ACC=acc, BLOCK=_NORM_SUM_BLOCK)
    return out


def syrk(
    P: torch.Tensor,
    out: torch.Tensor,
    *,
    alpha: float = 1.0,
    Y: torch.Tensor | None = None,
    beta: float = 0.0,
    in_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``out = alpha * P P^T + beta * Y`` per batch entry, computing only upper tiles.

    Args:
        P: (batch, M, K), any strides and float dtype.
        out: (batch, M, M), written (never read).
        Y: optional symmetric (batch, M, M) addend.
        in_scale: optional fp32 (batch,) factor of P: ``in_scale^2`` multiplies the
            fp32 product (on load, before the cast, for fp16 compute of a wider P).
        compute_dtype: dtype of the tl.dot operands; accumulation is fp32 (fp64 for fp64).
    """
    batch, M, K = P.shape
    acc = tl.float64 if compute_dtype == torch.float64 else tl.float32
    y = out if Y is None else Y  # a placeholder pointer when HAS_Y is False
    for p, yy, o, scale in _batch_parts(batch, P, y, out, in_scale):
        scale = o if scale is None else scale  # a placeholder pointer when HAS_SCALE is False
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK"]) * (triton.cdiv(M, meta["BLOCK"]) + 1) // 2, p.shape[0])
        launch(
            _syrk_kernel, grid, out.device, p, yy, o, scale,
            M, K, p.shape[0],
            *p.stride(), *yy.stride(), *o.stride(),
            float(alpha), float(beta),
            HAS_Y=Y is not None, HAS_SCALE=in_scale is not None, SCALE_ON_LOAD=in_scale is not None and _scale_on_load(P.dtype, compute_dtype),
            COMPUTE=_TL_DTYPES[compute_dtype], ACC=acc, PRECISION=_precision(compute_dtype),
        )
    return out


def update(
    Bm: torch.Tensor,
    X: torch.Tensor,
    out: torch.Tensor,
    *,
    a: float,
    out_scale: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 0.0,
    in_scale: torch.Tensor | None = None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``out = out_scale * (Bm X + a X) + beta * out`` per batch entry.

    Args:
        Bm: (batch, M, M); X: (batch, M, N); out: (batch, M, N), any strides and float
            dtypes; ``out`` is read only when ``beta != 0`` (always for a tensor beta:
            its value is not looked at on the host).
        out_scale, beta: numbers, or both 0-dim fp32 tensors on out's device.
        in_scale: optional fp32 (batch,) factor of X (both uses), applied to the fp32
            result (on load, before the cast, for fp16 compute of a wider X).
        compute_dtype: dtype of the tl.dot operands; accumulation is fp32 (fp64 for fp64).
    """
    batch, M, N = X.shape
    acc = tl.float64 if compute_dtype == torch.float64 else tl.float32
    on_device = hyper.on_device(out_scale, beta)
    if not on_device:
        out_scale, beta = float(out_scale), float(beta)
    for b, x, o, scale in _batch_parts(batch, Bm, X, out, in_scale):
        scale = o if scale is None else scale  # a placeholder pointer when HAS_SCALE is False
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), x.shape[0])
        launch(
            _update_kernel, grid, out.device, b, x, o, scale,
            M, N, x.shape[0],
            *b.stride(), *x.stride(), *o.stride(),
            float(a), out_scale, beta,
            HAS_SCALE=in_scale is not None, SCALE_ON_LOAD=in_scale is not None and _scale_on_load(X.dtype, compute_dtype),
            HAS_BETA=on_device or beta != 0.0, HYPER_ON_DEVICE=on_device,
            COMPUTE=_TL_DTYPES[compute_dtype], ACC=acc, PRECISION=_precision(compute_dtype),
        )
    return out


def _batched_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as (batch, m, n) without copying, or None when its strides forbid a view."""
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:
        return None


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: Coefficients = "polar_express",
    eps: float = 1e-7,
    out: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    scale: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 0.0,
    ns_update: str = "triton",
) -> torch.Tensor:
    """Triton Newton–Schulz: ``out = beta * out + scale * UV^T(G)``; see ``ops.orthogonalize``.

    This is the entry point for fused spectral-LMO updates: with ``out`` a parameter,
    ``scale = -lr * rho`` and ``beta = 1 - lr * weight_decay`` the last kernel's epilogue
    applies the whole update. Inputs are assumed validated (``ops.orthogonalize`` does it).

    Args:
        G: (..., m, n) float tensor on a CUDA device (or CPU under TRITON_INTERPRET=1).
        out: optional (..., m, n) tensor of G's dtype; read only when ``beta != 0`` or
            beta is a tensor.
        compute_dtype: dtype of the iteration; bf16 on CUDA, fp32 elsewhere by default.
        scale, beta: numbers, or both 0-dim fp32 tensors on G's device (read by the kernel).
        ns_update: ``"triton"`` (``_update_kernel``) or ``"cublas"`` (``torch.baddbmm``)
            for the non-final updates; the last one is always the fused Triton epilogue.
    """
    sched = schedule(coefficients, steps)
    compute = compute_dtype or reference.default_compute_dtype(G.device)
    if out is None:
        out = torch.empty(G.shape, dtype=G.dtype, device=G.device)
    m, n = G.shape[-2:]
    if out.numel() == 0:
        return out
    if not sched.triples:  # zero steps is the normalization alone; there is no iteration to fuse it into
        return reference.orthogonalize(G, 0, coefficients, eps, out, compute, scale, beta)

    G3 = G.reshape(-1, m, n)  # a view unless the batch dims cannot merge; read-only either way
    O3 = _batched_view(out)
    # The last update reads X across whole columns while writing `out`; if `out` is
    # G's memory and X is still G (one step) the reads would race the writes.
    aliased = steps == 1 and out.untyped_storage().data_ptr() == G.untyped_storage().data_ptr()
    target = O3 if O3 is not None and not aliased else out.reshape(-1, m, n).clone()

    inv_norm = inverse_norm(G3, sched.safety, eps)
    tall = m > n
    X = G3.mT if tall else G3  # the wide orientation, as a strided view
    dst_final = target.mT if tall else target
    batch, rows, cols = X.shape
    gram = torch.empty(batch, rows, rows, dtype=compute, device=G.device)
    poly = torch.empty_like(gram)
    buffers = [torch.empty(batch, rows, cols, dtype=compute, device=G.device) for _ in range(min(steps - 1, 2))]

    src, src_scale = X, inv_norm
    cublas = ns_update == "cublas" and steps > 1
    if cublas:
        # a matmul takes no per-matrix input scale: normalize once, in fp32 and rounded
        # into the compute dtype as the twin does (a bf16/fp16 G widens exactly in the mul)
        src = torch.mul(X.float() if X.dtype == torch.float64 else X, inv_norm.view(-1, 1, 1)).to(compute)
        src_scale = None
    for t, (a, b, c) in enumerate(sched.triples):
        syrk(src, gram, in_scale=src_scale, compute_dtype=compute)
        syrk(gram, poly, alpha=c, Y=gram, beta=b, compute_dtype=compute)
        if t == steps - 1:
            update(poly, src, dst_final, a=a, out_scale=scale, beta=beta, in_scale=src_scale, compute_dtype=compute)
            break
        dst = buffers[t % 2]
        if cublas:
            torch.baddbmm(src, poly, src, beta=a, out=dst)
        else:
            update(poly, src, dst, a=a, in_scale=src_scale, compute_dtype=compute)
        src, src_scale = dst, None
    if target is not O3:
        out.copy_(target.view(out.shape))
    return out
