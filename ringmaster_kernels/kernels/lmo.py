"""Triton kernels for the norm-ball LMOs and the fused momentum -> LMO -> update step.

Two kernels serve every norm and both public entry points (``norms.lmo`` and
``ops.lmo_step_``), steered by constexpr flags:

* ``_stats_kernel`` (pass 1, only for norms that need a reduction or a whole-matrix
  direction): reads g (and m), writes the new momentum m, optionally writes
  ``u`` (the LMO input) into a buffer for Newton–Schulz, and adds the squares of u
  into per-row or per-column fp32 sums with atomics.
* ``_update_kernel`` (pass 2): ``x <- decay * x + coef * factor * inv_norm * f(u)``
  with ``f = sign`` or identity, u taken from g, from the momentum (fused here for
  sign, so sign is one pass reading g, m, x and writing m, x), from the stored
  momentum, or from a finished direction buffer (spectral, l1).

Multi-tensor launch. Each tensor of a list is seen as a row-major (R, C) matrix
(C = its last dim) and cut into (BR, BC) tiles; one grid runs over the tiles of every
tensor. A per-tensor int64 table holds the raw addresses of x, g, m, u, the layout
ints and the momentum estimator's e (previous gradient or Hessian-vector product) and h
(MVR-2's state), and a per-tile table names (tensor, first row, first column, end row). Kernels
turn an address back into a typed pointer with ``.to(ptr_type, bitcast=True)``.
Why addresses rather than concatenated flat buffers: parameters, gradients and state
stay where the model and optimizer put them, so there is no gather/scatter copy
(which would double the traffic of a memory-bound op). Both real CUDA and the
``TRITON_INTERPRET=1`` interpreter (which dereferences host addresses of CPU tensors)
run it. The tile table and layout fields depend on shapes only and are cached; the small
address table is kept on the device per (plan, addresses) and only built for addresses
it has not seen (gradients may be new tensors, though usually the same buffers); the
spectral/l1 direction buffers are kept per (parameter list, dtype), so a warm step
builds no table. Addresses
carry no alignment facts, so when every row length is a multiple of 8 and every pointer
16-byte aligned (the usual case) the kernels are launched with ALIGNED, which states
both to the compiler: loads and stores become 128-bit (``ringmaster inspect sm90``).

Reductions: "rows" groups sum every row into its group ``row // RG`` (RG = 1 per row,
RG = m per matrix for the Frobenius norm); "cols" sums a tile's rows per column, with
tiles never crossing a matrix, into group ``(row0 // H) * C + col`` (H = m). The
atomics make the fp32 sums' rounding order run-dependent on a GPU (bitwise
non-deterministic at the 1e-7 level).

Hyperparameters: beta, lr and weight decay come as Python numbers or (a capturable step)
as 0-dim fp32 device tensors the kernels read (HYPER_ON_DEVICE; see :mod:`.hyper`).
"""
from __future__ import annotations

import collections
import functools
import threading
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import triton
import triton.language as tl
from torch.multiprocessing.reductions import StorageWeakRef

from ..backend import interpreting
from . import hyper
from .launches import device_guard, launch

if TYPE_CHECKING:  # a hint only: the kernels read a catalogue entry, never the catalogue
    from ..catalogue import Norm

# Elements per tile. In the interpreter the cost is per program, so tiles are larger.
_TILE = 4096
_TILE_INTERPRET = 16384
_MAX_BC = 256

# constexpr codes. REDUCE: 0 none, 1 per row-group, 2 per column. SOURCE of u in the
# update pass: g alone (a bare LMO), momentum fused into this pass, the momentum that
# pass 1 stored, or the finished direction buffer.
_REDUCE = {"sign": 0, "direction": 0, "unit": 1, "rows": 1, "cols": 2}
SRC_G, SRC_MOMENTUM, SRC_STATE, SRC_DIRECTION = 0, 1, 2, 3


@triton.jit
def _tile(tiles, itab, BR: tl.constexpr, BC: tl.constexpr, ALIGNED: tl.constexpr):
    """Indices and mask of this program's tile and its tensor's table row."""
    pid = tl.program_id(0)
    t = tl.load(tiles + pid * 4)
    r0 = tl.load(tiles + pid * 4 + 1)
    c0 = tl.load(tiles + pid * 4 + 2)
    r_end = tl.load(tiles + pid * 4 + 3)
    row = itab + t * 10  # 10 int64 fields: x, g, m, u, C, H, RG, stats base, e, h
    C = tl.load(row + 4)
    if ALIGNED:
        # facts the compiler cannot see through the tables: with them a row's runs of 8
        # elements are 16-byte aligned and equally masked, so loads become 128-bit
        C = tl.multiple_of(C, 8)
        c0 = tl.multiple_of(c0, 8)
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    row_ok = rows < r_end
    col_ok = cols < C
    offs = rows[:, None] * C + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    return t, row, r0, r_end, C, rows, cols, row_ok, col_ok, offs, mask


@triton.jit
def _pointer(row, field: tl.constexpr, like, ALIGNED: tl.constexpr):
    """Field ``field`` of a table row as a pointer typed like ``like``."""
    ptr = tl.load(row + field).to(like.dtype, bitcast=True)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _step_scalars(beta, coef, decay, radius, ON_DEVICE: tl.constexpr):
    """(beta, coef, decay) of an update pass as given; or (ON_DEVICE) ``beta``, ``coef`` and
    ``decay`` point at the beta, lr and weight-decay tensors, and ``coef = -lr * radius``,
    ``decay = 1 - lr * weight_decay`` are formed here in fp32."""
    if ON_DEVICE:
        lr = tl.load(coef)
        return tl.load(beta), -lr * radius, 1.0 - lr * tl.load(decay)
    else:
        return beta, coef, decay


@triton.jit
def _momentum(g_ptr, m_ptr, e_ptr, h_ptr, offs, mask, beta, q, NESTEROV: tl.constexpr, STORE_M: tl.constexpr,
              CORRECTION: tl.constexpr, RECURSION: tl.constexpr):
    """fp32 momentum-estimator update (``reference.momentum_update_``); returns u, the LMO input.

    ``m <- beta m + (1 - beta) s`` with s = g, or (RECURSION, MVR-2) s = h after
    ``h <- g + (1 - q)(h - e)``; then CORRECTION 1 adds ``beta (g - e)`` (MVR), 2 adds
    ``beta e`` (HCM). e and h are read (and h written) only when those flags need them, so
    the EMA path loads and stores what it did before."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    if CORRECTION != 0 or RECURSION:
        e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RECURSION:
        h = tl.load(h_ptr + offs, mask=mask, other=0.0)
        h = g + (1.0 - q) * (h - e)
        tl.store(h_ptr + offs, h, mask=mask)
        m = beta * m + (1.0 - beta) * h
    else:
        m = beta * m + (1.0 - beta) * g
    if CORRECTION == 1:
        m = m + beta * (g - e)
    if CORRECTION == 2:
        m = m + beta * e
    if STORE_M:
        tl.store(m_ptr + offs, m, mask=mask)
    if NESTEROV:
        u = beta * m + (1.0 - beta) * g
    else:
        u = m
    return u


@triton.jit
def _stats_kernel(
    tiles, itab, stats, beta, q, G0, M0, U0, E0, H0,
    BR: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, WRITE_U: tl.constexpr, REDUCE: tl.constexpr,
    ALIGNED: tl.constexpr, CORRECTION: tl.constexpr, RECURSION: tl.constexpr, HYPER_ON_DEVICE: tl.constexpr,
):
    t, row, r0, r_end, C, rows, cols, row_ok, col_ok, offs, mask = _tile(tiles, itab, BR, BC, ALIGNED)
    g_ptr = _pointer(row, 1, G0, ALIGNED)
    if MOMENTUM:
        beta = hyper.value(beta, HYPER_ON_DEVICE)
        m_ptr = _pointer(row, 2, M0, ALIGNED)
        e_ptr = _pointer(row, 8, E0, ALIGNED)
        h_ptr = _pointer(row, 9, H0, ALIGNED)
        u = _momentum(g_ptr, m_ptr, e_ptr, h_ptr, offs, mask, beta, q, NESTEROV, True, CORRECTION, RECURSION)
    else:
        u = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if WRITE_U:
        u_ptr = _pointer(row, 3, U0, ALIGNED)
        tl.store(u_ptr + offs, u.to(U0.dtype.element_ty), mask=mask)
    sbase = tl.load(row + 7)
    if REDUCE == 1:
        rg = tl.load(row + 6)
        sums = tl.sum(u * u, axis=1)
        first = r0 // rg
        if first == (tl.minimum(r0 + BR, r_end) - 1) // rg:
            # the tile lies in one group (a big matrix's Frobenius norm): one atomic, not
            # one per row, which would all contend for the same address
            tl.atomic_add(stats + sbase + first, tl.sum(sums, axis=0), sem="relaxed")
        else:
            tl.atomic_add(stats + sbase + rows // rg, sums, mask=row_ok, sem="relaxed")
    if REDUCE == 2:
        h = tl.load(row + 5)
        tl.atomic_add(stats + sbase + (r0 // h) * C + cols, tl.sum(u * u, axis=0), mask=col_ok, sem="relaxed")


@triton.jit
def _update_kernel(
    tiles, itab, ftab, stats, beta, q, coef, decay, radius, X0, G0, M0, U0, E0, H0,
    BR: tl.constexpr, BC: tl.constexpr,
    SOURCE: tl.constexpr, NESTEROV: tl.constexpr, REDUCE: tl.constexpr,
    SIGN: tl.constexpr, HAS_X: tl.constexpr, ALIGNED: tl.constexpr,
    CORRECTION: tl.constexpr, RECURSION: tl.constexpr, HYPER_ON_DEVICE: tl.constexpr,
):
    t, row, r0, r_end, C, rows, cols, row_ok, col_ok, offs, mask = _tile(tiles, itab, BR, BC, ALIGNED)
    beta, coef, decay = _step_scalars(beta, coef, decay, radius, HYPER_ON_DEVICE)
    if SOURCE == 0:
        g_ptr = _pointer(row, 1, G0, ALIGNED)
        u = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SOURCE == 1:
        g_ptr = _pointer(row, 1, G0, ALIGNED)
        m_ptr = _pointer(row, 2, M0, ALIGNED)
        e_ptr = _pointer(row, 8, E0, ALIGNED)
        h_ptr = _pointer(row, 9, H0, ALIGNED)
        u = _momentum(g_ptr, m_ptr, e_ptr, h_ptr, offs, mask, beta, q, NESTEROV, True, CORRECTION, RECURSION)
    if SOURCE == 2:
        m_ptr = _pointer(row, 2, M0, ALIGNED)
        u = tl.load(m_ptr + offs, mask=mask, other=0.0)
        if NESTEROV:
            g_ptr = _pointer(row, 1, G0, ALIGNED)
            u = beta * u + (1.0 - beta) * tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SOURCE == 3:
        u_ptr = _pointer(row, 3, U0, ALIGNED)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SIGN:
        # 0 -> 0 and NaN -> NaN, like reference._sign
        u = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, u))
    step = coef * tl.load(ftab + t) * u
    sbase = tl.load(row + 7)
    if REDUCE == 1:
        rg = tl.load(row + 6)
        s = tl.load(stats + sbase + rows // rg, mask=row_ok, other=1.0)
        # 1/0 -> 0: a zero unit takes a zero step; NaN/inf sums still propagate
        step = step * tl.where(s == 0, 0.0, 1.0 / tl.sqrt(s))[:, None]
    if REDUCE == 2:
        h = tl.load(row + 5)
        s = tl.load(stats + sbase + (r0 // h) * C + cols, mask=col_ok, other=1.0)
        step = step * tl.where(s == 0, 0.0, 1.0 / tl.sqrt(s))[None, :]
    x_ptr = _pointer(row, 0, X0, ALIGNED)
    if HAS_X:
        step = decay * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + step
    tl.store(x_ptr + offs, step.to(X0.dtype.element_ty), mask=mask)


def _layout(shape: torch.Size, mode: str, unit_rows: int) -> tuple[int, int, int, int, int]:
    """(R, C, H, RG, n_stats) of a tensor viewed as row-major (R, C) for ``mode``."""
    C = shape[-1]
    R = shape.numel() // C if C else 0
    if mode == "unit":
        return R, C, R, unit_rows, R // unit_rows if R else 0
    if mode == "rows":
        return R, C, R, 1, R
    if mode == "cols":
        return R, C, unit_rows, 1, (R // unit_rows) * C if R else 0
    return R, C, R, 1, 0


def _tile_table(layouts, br: int, bc: int) -> torch.Tensor:
    """int64 (n_tiles, 4): tensor index, first row, first column, end row (exclusive)."""
    parts = []
    for t, (R, C, H, _, _) in enumerate(layouts):
        if R == 0 or C == 0:
            continue
        units, rb, cb = R // H, -(-H // br), -(-C // bc)
        k = torch.arange(units * rb * cb, dtype=torch.int64)
        unit = k // (rb * cb)
        r0 = unit * H + (k // cb) % rb * br
        parts.append(torch.stack([torch.full_like(k, t), r0, k % cb * bc, (unit + 1) * H], dim=1))
    return torch.cat(parts) if parts else torch.zeros((0, 4), dtype=torch.int64)


class _Plan:
    """Everything about a launch that depends on shapes only (cached: steps repeat shapes)."""

    def __init__(self, spec: Norm, scale: str, shapes: tuple[torch.Size, ...], device: torch.device,
                 tile: int, max_bc: int):
        units = [spec.unit_shape(shape) for shape in shapes]
        layouts = [_layout(shape, spec.mode, rows) for shape, (rows, _) in zip(shapes, units)]
        max_c = max(lay[1] for lay in layouts)
        max_h = max(lay[2] for lay in layouts)
        self.bc = min(triton.next_power_of_2(max_c), max_bc)
        self.br = max(1, min(tile // self.bc, triton.next_power_of_2(max_h)))
        self.tiles = _tile_table(layouts, self.br, self.bc).to(device)
        columns, sbase = [], 0
        for R, C, H, RG, n_stats in layouts:
            columns.append([C, H, RG, sbase])
            sbase += n_stats
        self.columns = torch.tensor(columns, dtype=torch.int64)  # table fields 4..7, on the host
        # tiles then start on multiples of 8 columns too (the kernels' ALIGNED claims it)
        self.aligned = self.bc % 8 == 0 and all(C % 8 == 0 for _, C, _, _, _ in layouts)
        self.ftab = torch.tensor([spec.factor(r, c, scale) for r, c in units], dtype=torch.float32).to(device)
        self.n_stats = sbase


@functools.lru_cache(maxsize=256)
def _plan(spec: Norm, scale: str, shapes: tuple[torch.Size, ...], device: torch.device, tile: int,
          max_bc: int) -> _Plan:
    return _Plan(spec, scale, shapes, device, tile, max_bc)


class _AddressTables:
    """Device-resident address tables, kept per (plan, addresses).

    An optimizer step launches over the same parameters, momenta and (usually reused)
    gradient buffers every time, so the table a launch needs is almost always one it had
    before: building it (a host tensor, a concatenation) and uploading it each step was
    most of the host cost, and a pageable upload also blocks CUDA-graph capture. A table
    holds nothing but its key (the addresses) and the plan's columns, so a hit is always
    the right table, whatever now lives at those addresses.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._tables: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()  # the async runtime may step policies from several threads
        self.builds = 0  # tables built and uploaded (tests: a warm step builds none)

    def get(self, plan: "_Plan", rows: list[list[int]], tail: list[list[int]], device: torch.device) -> torch.Tensor:
        """Fields 0-3 from ``rows``, 4-7 the plan's columns, 8-9 from ``tail`` (per tensor)."""
        # the plan itself (hashed by identity) is in the key: it stays alive with its tables
        key = (plan, device, tuple(a for r in rows + tail for a in r))
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                return table
        host = torch.cat([torch.tensor(rows, dtype=torch.int64), plan.columns, torch.tensor(tail, dtype=torch.int64)],
                         dim=1)
        if device.type == "cuda":
            host = host.pin_memory()  # an asynchronous upload needs page-locked memory
        table = host.to(device, non_blocking=True)
        with self._lock:
            self.builds += 1
            self._tables[key] = table
            if len(self._tables) > self.maxsize:
                self._tables.popitem(last=False)
        return table


_address_tables = _AddressTables()


class _DirectionBuffers:
    """The stacked direction buffers (one per shape) of a parameter list, per dtype.

    Allocated per step they had new addresses, so the address table holding them (and a
    CUDA graph) saw new tensors every step; kept, a warm step reuses both. The buffers
    are scratch, written by pass 1 and read by pass 2 of the same call. An entry holds
    weak references to its parameters' storages and is dropped once one is freed (and
    the oldest go past ``maxsize``), so the memory stays tied to live parameters: about
    one copy of the spectral/l1 parameters in the direction dtype.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.allocations = 0  # entries made (tests: a warm step makes none)

    def get(self, xs: Sequence[torch.Tensor], shapes: Sequence[torch.Size], dtype: torch.dtype) -> list[torch.Tensor]:
        """One (count, *shape) buffer per entry of ``shapes`` for the list ``xs``."""
        device = xs[0].device
        key = (dtype, device, tuple((x.data_ptr(), tuple(x.shape)) for x in xs))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not any(ref.expired() for ref in entry[0]):
                self._entries.move_to_end(key)
                return entry[1]
            for k in [k for k, (refs, _) in self._entries.items() if any(r.expired() for r in refs)]:
                del self._entries[k]
            counts = collections.Counter(tuple(x.shape) for x in xs)
            buffers = [torch.empty((counts[tuple(shape)], *shape), dtype=dtype, device=device) for shape in shapes]
            self._entries[key] = ([StorageWeakRef(x.untyped_storage()) for x in xs], buffers)
            self.allocations += 1
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return buffers


_direction_buffers = _DirectionBuffers()


class _Launch:
    """The tables of one multi-tensor launch over tensors sharing device and dtypes."""

    def __init__(self, spec, scale, xs, gs, ms, us, es=None, hs=None):
        device = xs[0].device
        if device.type != "cpu" and interpreting():
            # the interpreter would dereference device addresses on the host
            raise ValueError("TRITON_INTERPRET=1 runs these kernels on CPU tensors only; unset it for CUDA tensors")
        self.device = device
        tile = _TILE_INTERPRET if interpreting() else _TILE
        plan = _plan(spec, scale, tuple(x.shape for x in xs), device, tile, _MAX_BC)
        self.br, self.bc, self.tiles, self.ftab = plan.br, plan.bc, plan.tiles, plan.ftab
        es = es if es is not None else [None] * len(xs)
        hs = hs if hs is not None else [None] * len(xs)
        rows = [[_addr(x), _addr(g), _addr(m), _addr(u)] for x, g, m, u in zip(xs, gs, ms, us)]
        tail = [[_addr(e), _addr(h)] for e, h in zip(es, hs)]  # fields 8, 9: the estimator's e and h
        # the kernels' ALIGNED variant: every row length % 8 == 0, every pointer 16-byte aligned
        self.aligned = plan.aligned and all(a % 16 == 0 for r in rows + tail for a in r)
        self.itab = _address_tables.get(plan, rows, tail, device)
        # the reductions' sums; without one (sign, spectral, l1) only a typed placeholder,
        # so no zero-fill runs
        self.stats = (torch.zeros(plan.n_stats, dtype=torch.float32, device=device) if plan.n_stats
                      else torch.empty(1, dtype=torch.float32, device=device))
        # typed placeholders: kernels take pointer types from these
        self.x0, self.g0 = xs[0], gs[0]
        self.m0 = ms[0] if ms[0] is not None else self.stats
        self.u0 = us[0] if us[0] is not None else self.stats
        self.e0 = es[0] if es[0] is not None else self.stats
        self.h0 = hs[0] if hs[0] is not None else self.stats
        self.correction, self.recursion, self.q = 0, False, 0.0
        self.beta, self.coef, self.decay, self.radius, self.on_device = 0.0, 0.0, 0.0, 0.0, False

    def hyper(self, *, lr: float | torch.Tensor, beta: float | torch.Tensor, weight_decay: float | torch.Tensor,
              radius: float) -> None:
        """The update's scalars: numbers folded here, or the tensors the kernels read."""
        self.on_device = hyper.on_device(lr, beta, weight_decay)
        if self.on_device:  # the kernels form -lr * radius and 1 - lr * weight_decay
            self.beta, self.coef, self.decay, self.radius = beta, lr, weight_decay, radius
        else:
            self.beta, self.coef, self.decay, self.radius = beta, -lr * radius, 1.0 - lr * weight_decay, radius

    def estimator(self, correction: str | None, recursion: bool, q: float) -> None:
        """The momentum passes' estimator terms (``reference.momentum_update_``)."""
        self.correction = {None: 0, "difference": 1, "vector": 2}[correction]
        self.recursion, self.q = recursion, q

    def stats_pass(self, reduce: int, *, momentum: bool, nesterov: bool, write_u: bool) -> None:
        if reduce == 0 and not (momentum or write_u):
            return
        launch(
            _stats_kernel, (self.tiles.shape[0],), self.device,
            self.tiles, self.itab, self.stats, self.beta, self.q, self.g0, self.m0, self.u0, self.e0, self.h0,
            BR=self.br, BC=self.bc, MOMENTUM=momentum, NESTEROV=nesterov, WRITE_U=write_u, REDUCE=reduce,
            ALIGNED=self.aligned, CORRECTION=self.correction if momentum else 0,
            RECURSION=self.recursion and momentum, HYPER_ON_DEVICE=self.on_device,
        )

    def update_pass(self, reduce: int, source: int, *, nesterov: bool, sign: bool, has_x: bool) -> None:
        launch(
            _update_kernel, (self.tiles.shape[0],), self.device,
            self.tiles, self.itab, self.ftab, self.stats, self.beta, self.q, self.coef, self.decay, self.radius,
            self.x0, self.g0, self.m0, self.u0, self.e0, self.h0,
            BR=self.br, BC=self.bc, SOURCE=source, NESTEROV=nesterov, REDUCE=reduce, SIGN=sign, HAS_X=has_x,
            ALIGNED=self.aligned, CORRECTION=self.correction if source == SRC_MOMENTUM else 0,
            RECURSION=self.recursion and source == SRC_MOMENTUM, HYPER_ON_DEVICE=self.on_device,
        )


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def lmo(G: torch.Tensor, spec: Norm, radius: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """LMO of G (any shape the norm accepts) for the norms with ``mode`` sign/unit/rows/cols.

    Two passes at most (the norm's reduction, then the scaled write); G is copied
    once if it is not contiguous. Writes ``out`` (contiguous, G's shape and dtype)
    or a new contiguous tensor, and returns it.
    """
    G = G.contiguous()
    if out is None:
        out = torch.empty_like(G)
    if G.numel() == 0:
        return out
    job = _Launch(spec, "none", [out], [G], [None], [None])
    job.hyper(lr=1.0, beta=0.0, weight_decay=1.0, radius=radius)  # coef = -radius; x is not read
    reduce = _REDUCE[spec.mode]
    job.stats_pass(reduce, momentum=False, nesterov=False, write_u=False)
    job.update_pass(reduce, SRC_G, nesterov=False, sign=spec.mode == "sign", has_x=False)
    return out


def lmo_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momenta: Sequence[torch.Tensor],
    spec: Norm,
    *,
    lr: float | torch.Tensor,
    beta: float | torch.Tensor,
    nesterov: bool,
    weight_decay: float | torch.Tensor,
    radius: float,
    scale: str = "none",
    direction: Callable[[torch.Tensor], None] | None = None,
    direction_dtype: torch.dtype = torch.float32,
    correction: str | None = None,
    extras: Sequence[torch.Tensor] | None = None,
    recursion: Sequence[torch.Tensor] | None = None,
    q: float = 0.0,
) -> None:
    """Fused step over lists of validated, contiguous, non-empty, same-device tensors.

    Sign: one pass. unit/rows/cols: pass 1 (momentum + reduction), pass 2 (update).
    direction (spectral, l1): pass 1 writes m and u (in ``direction_dtype``) into one
    stacked (k, ...) buffer per shape (kept across calls: :class:`_DirectionBuffers`);
    ``direction(buffer)`` overwrites it in place with the unit-ball maximizer D (so
    lmo(u) = -radius * factor * D); pass 2 applies it. ``lr``, ``beta``, ``weight_decay``:
    numbers, or all three 0-dim fp32 tensors on the tensors' device, read by the kernels.
    ``correction``/``extras``/``recursion``/``q``: the estimator terms of the momentum
    pass (``ops.lmo_step_``), checked there.
    """
    keys: dict[tuple, list[int]] = {}
    for i, (x, g) in enumerate(zip(params, grads)):
        keys.setdefault((x.dtype, g.dtype, None if extras is None else extras[i].dtype), []).append(i)
    reduce = _REDUCE[spec.mode]
    for idx in keys.values():
        xs = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [momenta[i] for i in idx]
        us: list[torch.Tensor | None] = [None] * len(xs)
        buffers = []
        if spec.mode == "direction":
            by_shape: dict[torch.Size, list[int]] = {}
            for j, x in enumerate(xs):
                by_shape.setdefault(x.shape, []).append(j)
            buffers = _direction_buffers.get(xs, list(by_shape), direction_dtype)
            for buf, js in zip(buffers, by_shape.values()):
                for slot, j in enumerate(js):
                    us[j] = buf[slot]
        es = None if extras is None else [extras[i] for i in idx]
        hs = None if recursion is None else [recursion[i] for i in idx]
        job = _Launch(spec, scale, xs, gs, ms, us, es, hs)
        job.estimator(correction, hs is not None, q)
        job.hyper(lr=lr, beta=beta, weight_decay=weight_decay, radius=radius)
        if spec.mode == "sign":
            source = SRC_MOMENTUM
        else:
            job.stats_pass(reduce, momentum=True, nesterov=nesterov, write_u=bool(buffers))
            source = SRC_DIRECTION if buffers else SRC_STATE
        for buf in buffers:
            # a direction may launch kernels of its own (Newton–Schulz): on the buffer's GPU
            with device_guard(buf.device):
                direction(buf)
        job.update_pass(reduce, source, nesterov=nesterov, sign=spec.mode == "sign", has_x=True)
