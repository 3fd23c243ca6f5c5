"""Drop-in replacement for NanoChat's ``MuonAdamW`` (karpathy/nanochat, ``nanochat/optim.py``).

``RingmasterMuonAdamW(param_groups)`` takes exactly the groups ``GPT.setup_optimizer`` builds:
every group has ``kind`` ("adamw" or "muon"), ``lr`` (and ``initial_lr``, set by NanoChat);
adamw groups ``betas``, ``eps``, ``weight_decay``; muon groups ``momentum``, ``ns_steps``,
``beta2``, ``weight_decay``, one group per distinct matrix shape. The training loop may
rewrite ``lr``, ``momentum`` and ``weight_decay`` before any step. When torch.distributed is
initialized the optimizer averages the gradients itself (NanoChat uses no DDP).

``install()`` / ``patch()`` swap the module global ``nanochat.gpt.MuonAdamW``, which
``setup_optimizer`` calls, so ``scripts.base_train`` runs with this class unchanged
(``python/nanochat_train.py`` does that and then runs the script).

Muon-group step, per matrix ``X`` (rows x cols) with gradient ``G``, all math in fp32, every
matrix of a group stacked into one (K, rows, cols) batch so Newton–Schulz is one batched
``ops.orthogonalize`` (Triton on CUDA) per shape::

    M <- beta M + (1 - beta) G;   U = beta M + (1 - beta) G            (Nesterov)
    U <- U * (||U||_F / sqrt(rows)) / ||U_i:||   per row              [row_equilibration]
    O = NS(U)   (5 Polar Express steps, input scaled by 1 / (1.01 ||U||_F), as NanoChat)
    O <- O * sqrt(min(rows, cols)) / ||O||_F                          [renormalize]
    O <- NorMuon(O; beta2)                                            [variance_reduction]
    s = lr * max(1, rows / cols) ** 0.5
    X <- X - s O - s wd X * [O X >= 0]   (mask only with cautious_weight_decay, else 1)

NorMuon keeps an EMA ``V`` (beta2) of the mean of ``O**2`` over the longer side (one value
per row for tall or square matrices, per column for wide ones), divides O by ``sqrt(V)``
and rescales so ``||O||_F`` is unchanged. With all four bracketed options off the step is
plain Muon and runs as one fused ``ops.lmo_step_`` per group (momentum, batched
Newton–Schulz and update in a few launches on CUDA). The options default to on, as
NanoChat's tuned recipe (its weight decay 0.28 assumes the cautious mask) expects them.

Where the numerics differ from NanoChat's own ``MuonAdamW`` (read at karpathy/nanochat
HEAD 92d63d4):

- Momentum buffers and NorMuon statistics are fp32 for every parameter dtype (NanoChat
  keeps them in the parameter dtype); the update is rounded once into the parameter.
- Newton–Schulz runs in bf16 on CUDA and fp32 on CPU, as NanoChat's ``COMPUTE_DTYPE``
  does, in our kernels' accumulation order. Its input scaling ``1 / (1.01 ||X||_F + 1e-6)``
  is reproduced exactly (see :func:`nanochat_coefficients`); the 1e-6 matters: NanoChat's
  gradients can be small enough that it shrinks the input by a few percent.
- The row-equilibration, renormalization and NorMuon arithmetic is plain torch, not
  ``torch.compile``-fused: on GPU it costs a few extra elementwise passes per group.
- AdamW groups step through ``torch.optim.AdamW`` (fused), the same update up to
  rounding; a bf16 parameter's AdamW moments stay bf16 there (NanoChat computes in fp32).
- Distributed: gradients are all-reduced in place (sum / world size, so Gloo works) and
  every rank runs the whole step; NanoChat shards the step and the optimizer state ZeRO-2 style.
  Parameters end identical on every rank; per-rank compute and state memory are higher.
- A non-finite gradient skips the whole step by default (``nonfinite``); NanoChat applies it.
- Muon state lives under the group's first parameter as in NanoChat (``momentum_buffer``
  (K, rows, cols), ``second_momentum_buffer`` (K, rows, 1) or (K, 1, cols)), so a
  single-rank NanoChat checkpoint loads; a sharded multi-rank one is refused at the
  first step (its buffers hold a chunk, not K matrices).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.optim.optimizer import required

from .. import ops, reference
from ..coefficients import POLAR_EXPRESS
from ..optim.capturable import HYPER_KEYS
from ..optim.composite import CompositeMixin
from ..optim.checks import check_lr, check_number
from ..optim.gluon import MOMENTUM, _closure_loss, _collect_grads, matrix_shape

__all__ = ["RingmasterMuonAdamW", "EXTRAS", "nanochat_coefficients", "install", "patch"]

KINDS = ("adamw", "muon")
EXTRAS = ("row_equilibration", "renormalize", "variance_reduction", "cautious_weight_decay")
SECOND = "second_momentum_buffer"
_REQUIRED = {
    "adamw": ("params", "lr", "betas", "eps", "weight_decay"),
    "muon": ("params", "lr", "momentum", "ns_steps", "beta2", "weight_decay"),
}
# NanoChat scales the Newton–Schulz input by 1 / (1.01 ||X||_F + 1e-6) (modded-nanogpt: 1.02)
NANOCHAT_NS_SAFETY = 1.01
NANOCHAT_NS_EPS = 1e-6 / NANOCHAT_NS_SAFETY  # the same scaling once 1.01 moves into the triple


def nanochat_coefficients(ns_steps: int) -> list[tuple[float, float, float]]:
    """Polar Express triples that reproduce NanoChat's iteration on a Frobenius-normalized input.

    NanoChat starts from ``Y = X / (1.01 ||X||_F + 1e-6)``; explicit triples make
    ``ops.orthogonalize`` start from ``Z = X / (||X||_F + eps)``, and with
    ``eps = NANOCHAT_NS_EPS = 1e-6 / 1.01`` this is ``Z = 1.01 Y``. Step one maps
    ``Y -> a Y + b Y^3 + c Y^5`` (odd powers), so scaling its (a, b, c) by 1.01^-1, ^-3,
    ^-5 gives the same result on Z; the later steps are unchanged.
    """
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps <= len(POLAR_EXPRESS):
        raise ValueError(f"ns_steps must be an int in [1, {len(POLAR_EXPRESS)}], got {ns_steps!r}")
    (a, b, c), *rest = POLAR_EXPRESS[:ns_steps]
    k = NANOCHAT_NS_SAFETY
    return [(a / k, b / k**3, c / k**5), *rest]


class RingmasterMuonAdamW(CompositeMixin, torch.optim.Optimizer):
    """NanoChat's combined optimizer (Muon for matrices, AdamW for the rest) on our kernels.

    Args:
        param_groups: NanoChat's group dicts (see the module doc). Muon groups need
            parameters of one shape with >= 2 dims (3-D and up are seen as
            (shape[0], rest) matrices); a group may also set any of ``EXTRAS`` itself.
        row_equilibration, renormalize, variance_reduction, cautious_weight_decay:
            defaults of the NanoChat extras for muon groups (see the module doc); all
            False gives plain Muon through one fused ``ops.lmo_step_`` per group.
        process_group: the group gradients are averaged over; default the world group
            when torch.distributed is initialized; nothing is communicated otherwise.
            Every rank must have gradients for the same parameters.
        nonfinite: "skip" (default: a NaN/inf gradient, after averaging, skips the step on
            every rank and counts it in ``skipped_steps``), "raise" or "ignore".
        fused_adamw: use ``torch.optim.AdamW(fused=True)``.
        backend: "auto" | "triton" | "torch", passed to the ops.
        capturable: muon groups keep ``lr``, ``momentum`` and ``weight_decay``, adamw
            groups ``lr``, as 0-dim fp32 tensors on their device, read on the device, so a
            whole step can be captured in a CUDA graph (static shapes, every parameter
            with a gradient). The contract is :class:`~..optim.gluon.Gluon`'s: NanoChat's
            loop may keep writing numbers (copied in at the next eager step), but a graph
            replays what it captured, so with graphs ``fill_`` the group tensors in
            place. Needs ``nonfinite="ignore"``; the AdamW groups run
            ``torch.optim.AdamW(capturable=True)`` (with ``fused_adamw=False`` that
            needs CUDA parameters), whose betas, eps and weight decay stay numbers
            (baked into a captured graph, as torch's AdamW does).

    Parameters with no gradient are left alone (their momentum too). A muon group may also
    set ``maximize``; parameters may be ``(name, tensor)`` pairs. To torch's machinery it
    is one optimizer (:mod:`..optim.composite`): ``defaults`` are the muon groups' (the
    NanoChat keys are required), so momentum schedulers cycle muon groups' ``momentum``
    and adamw groups' beta1, and ``add_param_group`` takes either kind.
    """

    KINDS = KINDS
    OWN_KINDS = ("muon",)
    DEVICE_KEYS = {"muon": HYPER_KEYS, "adamw": ("lr",)}

    def __init__(
        self,
        param_groups: Iterable[dict[str, Any]],
        *,
        row_equilibration: bool = True,
        renormalize: bool = True,
        variance_reduction: bool = True,
        cautious_weight_decay: bool = True,
        process_group: Any = None,
        nonfinite: str = "skip",
        fused_adamw: bool = True,
        backend: str | None = "auto",
        capturable: bool = False,
    ) -> None:
        self._init_guard(nonfinite, capturable)
        extras = dict(row_equilibration=row_equilibration, renormalize=renormalize,
                      variance_reduction=variance_reduction, cautious_weight_decay=cautious_weight_decay)
        self.backend = backend
        self.process_group = process_group
        self._fused_adamw = fused_adamw
        self._inner: dict[str, torch.optim.Optimizer] = {}
        muon_defaults = {key: required for key in _REQUIRED["muon"] if key != "params"}
        # "differentiable" is declared (and refused when True) because torch adds it to
        # defaults on every load; declared, every muon group has it from the start
        super().__init__(param_groups, {**muon_defaults, **extras, "maximize": False, "differentiable": False})

    def _make_inner(self, kind: str, group: dict[str, Any]) -> torch.optim.Optimizer:
        # AdamW fills its defaults into this very dict; our param_groups hold the same
        # object, which is what lets the training loop's lr rewrites reach it.
        return torch.optim.AdamW([group], fused=self._fused_adamw, capturable=self.capturable)

    def _check_new_group(self, group: dict[str, Any], where: str) -> None:
        missing = [key for key in _REQUIRED[group["kind"]] if key not in group]
        if missing:
            raise ValueError(f"{where} (kind {group['kind']!r}) lacks {missing}")

    def _check_own_group(self, group: dict[str, Any], where: str) -> None:
        _check_muon_params(group, where)
        _check_muon_hyper(group, where, numbers=not self.capturable)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Average gradients across ranks, then step every group once; returns ``closure()``'s loss."""
        loss = _closure_loss(closure)
        grads = _collect_grads(self.param_groups, type(self).__name__)
        self._average(grads)
        if not self._grads_ok(grads):
            return loss
        for gi, group in enumerate(self.param_groups):
            if self._device_hyper is not None:  # numbers written since the last step, into the tensors
                self._device_hyper.sync(gi, group, f"param_groups[{gi}]")
            if group["kind"] == "muon":
                self._muon_step(group, gi)
        self._step_inner("adamw")
        return loss

    def _average(self, grads: list[torch.Tensor]) -> None:
        """All-reduce every gradient, in place, to the mean over ranks.

        One asynchronous all-reduce per tensor (no flat copy, so no extra gradient-sized
        memory), all in flight together; SUM then divide, because Gloo has no AVG."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(self.process_group)
        if world == 1 or not grads:
            return
        works = [dist.all_reduce(g, group=self.process_group, async_op=True) for g in grads]
        for work in works:
            work.wait()
        torch._foreach_div_(grads, float(world))

    def _muon_step(self, group: dict[str, Any], gi: int) -> None:
        where = f"param_groups[{gi}]"
        _check_muon_hyper(group, where, numbers=not self.capturable)
        params = group["params"]
        live = [i for i, p in enumerate(params) if p.grad is not None]
        if not live:
            return
        rows, cols = matrix_shape(params[0].shape)
        state = self._group_state(params, rows, cols, group["variance_reduction"], where)
        if self.capturable:  # the group's device tensors (synced in step)
            lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        else:
            lr, wd, beta = check_lr(where, group["lr"]), float(group["weight_decay"]), float(group["momentum"])
        shape_scale = max(1.0, rows / cols) ** 0.5
        coefficients = nanochat_coefficients(group["ns_steps"])
        momenta = state[MOMENTUM]
        if not any(group[key] for key in EXTRAS):
            # Plain Muon: ops.lmo_step_'s decay uses lr alone, NanoChat's the shape-scaled lr.
            work = [params[i] if params[i].is_contiguous() else params[i].contiguous() for i in live]
            grads = [params[i].grad.reshape(rows, cols) for i in live]
            ops.lmo_step_(
                [w.view(rows, cols) for w in work],
                torch._foreach_neg(grads) if group["maximize"] else grads,
                [momenta[i] for i in live],
                norm="spectral", lr=lr, beta=beta, nesterov=True,
                weight_decay=wd * shape_scale, scale="muon", steps=len(coefficients),
                coefficients=coefficients, eps=NANOCHAT_NS_EPS, backend=self.backend,
            )
            for i, w in zip(live, work):
                if w is not params[i]:
                    params[i].copy_(w)
            return
        index = None if len(live) == len(params) else torch.tensor(live, device=momenta.device)

        def gather(buf: torch.Tensor) -> torch.Tensor:
            return buf if index is None else buf.index_select(0, index)

        G = torch.stack([params[i].grad.reshape(rows, cols) for i in live]).float()
        if group["maximize"]:
            G.neg_()
        M = gather(momenta)
        M.lerp_(G, 1.0 - beta)
        U = G.lerp_(M, beta)
        if index is not None:
            momenta.index_copy_(0, index, M)
        if group["row_equilibration"]:
            target = torch.linalg.vector_norm(U, dim=(-2, -1), keepdim=True) / rows**0.5
            U.mul_(target / torch.linalg.vector_norm(U, dim=-1, keepdim=True).clamp_min(1e-6))
        O = ops.orthogonalize(U, len(coefficients), coefficients, NANOCHAT_NS_EPS, out=U, backend=self.backend)
        if group["renormalize"]:
            O.mul_(min(rows, cols) ** 0.5 / torch.linalg.vector_norm(O, dim=(-2, -1), keepdim=True).clamp_min(1e-6))
        if group["variance_reduction"]:
            V = gather(state[SECOND])
            _normuon_(O, V, float(group["beta2"]))
            if index is not None:
                state[SECOND].index_copy_(0, index, V)
        X = torch.stack([params[i].reshape(rows, cols) for i in live]).float()
        decay = X * (lr * shape_scale * wd)
        if group["cautious_weight_decay"]:
            decay.mul_(O * X >= 0)  # decay only where the update already shrinks |x|
        reference.add_scaled_(X, O, -lr * shape_scale).sub_(decay)
        for i, x in zip(live, X):
            params[i].copy_(x.view_as(params[i]))

    def _state_shape(self, group: dict[str, Any], p: torch.Tensor, key: str) -> tuple[int, ...] | None:
        """Muon groups keep (K, rows, cols) buffers under their first parameter (see
        _group_state); the AdamW groups' are per parameter."""
        if group.get("kind") != "muon":
            return super()._state_shape(group, p, key)
        k, (rows, cols) = len(group["params"]), matrix_shape(p.shape)
        if key == MOMENTUM:
            return (k, rows, cols)
        if key == SECOND:
            return (k, rows, 1) if rows >= cols else (k, 1, cols)
        return None

    def _group_state(self, params: list[torch.Tensor], rows: int, cols: int, second: bool, where: str) -> dict[str, Any]:
        """The group's stacked fp32 buffers, kept (as NanoChat does) under its first parameter."""
        p0, k = params[0], len(params)
        state = self.state[p0]
        wanted = {MOMENTUM: (k, rows, cols)}
        if second:
            wanted[SECOND] = (k, rows, 1) if rows >= cols else (k, 1, cols)
        for key, shape in wanted.items():
            if key not in state:
                state[key] = torch.zeros(shape, dtype=torch.float32, device=p0.device)
            elif tuple(state[key].shape) != shape:
                raise ValueError(
                    f"{where}: state {key!r} has shape {tuple(state[key].shape)}, expected {shape}; "
                    "was it saved by a sharded (multi-rank) NanoChat MuonAdamW or for other parameters?"
                )
            elif state[key].dtype != torch.float32:
                # load_state_dict casts state to the parameter dtype; the math stays fp32
                state[key] = state[key].float()
        return state


def _normuon_(O: torch.Tensor, V: torch.Tensor, beta2: float) -> None:
    """NorMuon (arXiv 2510.05491) in place on O (K, rows, cols): per-neuron second-moment
    EMA ``V`` (K, rows, 1) or (K, 1, cols), divide by its square root, keep ||O||_F."""
    dim = -1 if V.size(-1) == 1 else -2
    mean_sq = O.square().mean(dim=dim, keepdim=True)
    V.lerp_(mean_sq, 1.0 - beta2)
    norm = torch.linalg.vector_norm(O, dim=(-2, -1), keepdim=True)
    O.mul_(V.clamp_min(1e-10).rsqrt())
    O.mul_(norm / torch.linalg.vector_norm(O, dim=(-2, -1), keepdim=True).clamp_min(1e-10))


def _check_muon_params(group: dict[str, Any], where: str) -> None:
    """A muon group's tensors (after torch has split off any names): one shape, >= 2 dims."""
    params = group["params"]
    if not params:
        raise ValueError(f"{where}['params'] is empty")
    for pi, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"{where}['params'][{pi}] must be a floating-point tensor, got {p.dtype}")
        if p.dim() < 2:
            raise ValueError(f"{where}['params'][{pi}] has shape {tuple(p.shape)}: muon groups need matrices")
        if p.shape != params[0].shape:
            raise ValueError(
                f"{where}['params'][{pi}] has shape {tuple(p.shape)}, params[0] {tuple(params[0].shape)}: "
                "a muon group holds one shape (NanoChat builds one group per shape)"
            )
        if p.device != params[0].device:
            raise ValueError(f"{where}['params'][{pi}] is on {p.device}, params[0] on {params[0].device}")


def _check_muon_hyper(group: dict[str, Any], where: str, numbers: bool = True) -> None:
    """What the training loop may rewrite between steps; cheap, so checked every step.
    ``numbers=False``: lr, momentum and weight decay are device tensors, not read here."""
    if numbers:
        check_lr(where, group["lr"])
        check_number(where, "momentum", group["momentum"], high=1.0)
        check_number(where, "weight_decay", group["weight_decay"])
    check_number(where, "beta2", group["beta2"], high=1.0)
    nanochat_coefficients(group["ns_steps"])
    for key in (*EXTRAS, "maximize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{where}: {key} must be a bool, got {type(group[key]).__name__}")
    if group["differentiable"]:
        raise ValueError(f"{where}: differentiable=True is not supported (the step runs under no_grad)")


def _factory(options: dict[str, Any]) -> Callable[..., RingmasterMuonAdamW]:
    """What replaces ``MuonAdamW``: the class itself, or the class with options bound."""
    if not options:
        return RingmasterMuonAdamW
    unknown = set(options) - set(EXTRAS) - {"process_group", "nonfinite", "fused_adamw", "backend", "capturable"}
    if unknown:
        raise TypeError(f"unknown RingmasterMuonAdamW options: {sorted(unknown)}")
    return functools.partial(RingmasterMuonAdamW, **options)


def install(module: str = "nanochat.gpt", **options: Any) -> Callable[[], None]:
    """Replace ``<module>.MuonAdamW`` with :class:`RingmasterMuonAdamW` (``options`` bound).

    ``module`` must be importable (put the NanoChat checkout on ``sys.path``). Returns a
    function that puts the original back.
    """
    target = importlib.import_module(module)
    if not hasattr(target, "MuonAdamW"):
        raise ValueError(f"module {module!r} has no MuonAdamW to replace: not the NanoChat this targets")
    original = target.MuonAdamW
    target.MuonAdamW = _factory(options)

    def restore() -> None:
        target.MuonAdamW = original

    return restore


@contextlib.contextmanager
def patch(module: str = "nanochat.gpt", **options: Any) -> Iterator[None]:
    """``with patch(): ...`` runs the block with :func:`install` in effect, then restores."""
    restore = install(module, **options)
    try:
        yield
    finally:
        restore()


def __getattr__(name: str) -> Any:
    # The async task imports this module (for the optimizer); loaded on first use so
    # either module can be imported first.
    if name in ("NanoChatTask", "load_checkout", "parse_base_train_args", "Recipe"):
        from . import nanochat_task

        return getattr(nanochat_task, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
