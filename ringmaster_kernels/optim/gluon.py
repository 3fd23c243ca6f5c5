"""Gluon: the layer-wise LMO-momentum optimizer in ``torch.optim`` form.

Each parameter group names a norm from :mod:`ringmaster_kernels.norms` and a radius;
one step per parameter ``x`` with gradient ``g`` is (../shared/ALGORITHMS.md)::

    m <- beta * m + (1 - beta) * g                       # EMA momentum
    u <- beta * m + (1 - beta) * g   (nesterov)  or  m
    x <- (1 - eta * weight_decay) * x + eta * lmo(u)     # lmo(u) = argmin_{||z|| <= radius} <u, z>

with ``eta = lr`` or, when the group gives layer-wise ``(L0, L1)``, ``eta = lr * t`` with
Gluon's step-size rule ``t = ||g||_* / (L0 + L1 ||g||_*)`` (per tensor, dual norm of
the gradient in the group's norm). Muon is ``norm="spectral"`` with
``norm_options={"scale": "muon"}`` (radius ``max(1, rows/cols) ** 0.5``); Scion's hidden
layers are ``{"scale": "scion"}`` and its constrained step is ``weight_decay=1``.

A group's parameters (per device) go through one ``ops.lmo_step_`` call: the fused
multi-tensor step, which on CUDA runs a few Triton launches for the whole list, with one
batched Newton–Schulz per matrix shape; on CPU it is the plain-torch twin. Every tensor
is seen as a matrix (:func:`matrix_shape`), so vectors and conv kernels work with every norm.
"""
from __future__ import annotations

import inspect
import math
from collections import defaultdict
from itertools import chain
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .. import norms, ops
from ..backend import check_backend
from . import estimators, step_rules
from .capturable import HYPER_KEYS, DeviceHyper
from .checks import check_lr, check_number

NONFINITE_POLICIES = ("skip", "raise", "ignore")
MOMENTUM = "momentum_buffer"  # fp32 for every parameter dtype, as ops.lmo_step_ requires
PREVIOUS = "previous_param"  # x_{k-1}, kept only while a group's estimator needs it
MVR_STATE = "mvr_h"  # MVR-2's h (fp32)
RULE_STEP = "lmo_step"  # updates so far, kept only for step rules that read k
# The skipped-step counter is a group key, so that every tool that carries param_groups
# (torch.distributed.checkpoint's get/set_optimizer_state_dict among them) carries it.
SKIPPED = "skipped_steps"
# What torch.optim.Optimizer sets on an instance and rebuilds itself after unpickling: its
# hook dicts and an LR scheduler's step wrapper (a closure over the original optimizer).
_TORCH_INSTANCE_ATTRS = ("step", "_opt_called", "_zero_grad_profile_name")
# Per-parameter state that must be a tensor of the parameter's shape (Gluon's and AdamW's).
_BUFFERS = (MOMENTUM, "exp_avg", "exp_avg_sq", "max_exp_avg_sq", PREVIOUS, MVR_STATE)

# Group keys that feed a norm option when the catalogue entry declares it.
_NS_KEYS = {"ns_steps": "steps", "ns_coefficients": "coefficients", "ns_dtype": "compute_dtype",
            "ns_update": "ns_update"}


def _label(group: dict[str, Any], gi: int, pi: int, p: torch.Tensor) -> str:
    """How errors name a parameter: its name when the optimizer was given names."""
    names = group.get("param_names")
    where = repr(names[pi]) if names else f"param_groups[{gi}]['params'][{pi}]"
    return f"{where} (shape {tuple(p.shape)})"


def matrix_shape(shape: torch.Size | Sequence[int]) -> tuple[int, int]:
    """The (rows, cols) view a norm sees: vectors are 1 x d, conv kernels (out, in*k*k)."""
    shape = tuple(shape)
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


class LMOStateMixin:
    """What Gluon and the composite optimizers share: the non-finite guard, checkpoint
    handling and copying.

    Before a step, a non-finite gradient makes the step be skipped (and counted in
    ``skipped_steps``) or raise. Checking costs one host synchronization per step;
    ``nonfinite="ignore"`` avoids it and lets NaN/inf reach the parameters.

    The count is kept per group (key ``"skipped_steps"``: steps skipped since the group was
    added), so state dicts, DCP included, carry it; ``load_state_dict()`` also reads the
    older top-level key, and keeps the fp32 momentum buffers fp32 (``torch.optim`` would
    cast them to the parameter's dtype, rounding a bf16 model's momentum), so a round trip
    is bitwise for every dtype. ``copy.deepcopy`` and pickle keep every option
    (``torch.optim.Optimizer`` would keep only ``defaults``, ``state`` and ``param_groups``).
    """

    nonfinite: str
    param_groups: list[dict[str, Any]]
    _device_hyper: DeviceHyper | None = None  # set by a capturable optimizer (see .capturable)

    def _init_guard(self, nonfinite: str, capturable: bool = False) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {type(capturable).__name__}")
        if capturable and nonfinite != "ignore":
            raise ValueError(
                f"capturable=True needs nonfinite='ignore', got nonfinite={nonfinite!r}: the non-finite "
                "guard reads a device flag on the host every step (check gradients outside the captured step)"
            )
        self.nonfinite = nonfinite
        self._device_hyper = DeviceHyper() if capturable else None

    @property
    def capturable(self) -> bool:
        """Whether lr, momentum and weight decay live in device tensors (a CUDA-graph step)."""
        return self._device_hyper is not None

    def _adopt_device_hyper(self, group: dict[str, Any], where: str, keys: tuple[str, ...] = HYPER_KEYS) -> None:
        """A capturable optimizer's new group gets its device tensors (on its one device)."""
        if self._device_hyper is None:
            return
        devices = {p.device for p in group["params"]}
        if len(devices) != 1:
            raise ValueError(f"{where}: capturable=True needs a group's parameters on one device, got {sorted(map(str, devices))}")
        self._device_hyper.adopt(group, devices.pop(), where, keys)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch.optim's state dict; a capturable optimizer's hyperparameter tensors are copied
        (the live ones keep changing)."""
        state_dict = super().state_dict()  # type: ignore[misc]
        return state_dict if self._device_hyper is None else self._device_hyper.snapshot(state_dict)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (the oldest group's count)."""
        return max((int(g.get(SKIPPED, 0)) for g in self.param_groups), default=0)

    def _grads_ok(self, grads: list[torch.Tensor]) -> bool:
        """True when the step may go ahead; False when it must be skipped (and counted)."""
        if self.nonfinite == "ignore" or not grads:
            return True
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            by_device[g.device].append(g)
        # Extremes are NaN or inf exactly when some entry is, and cannot overflow the way a
        # 2-norm of large finite fp16 values would.
        finite = all(bool(torch.isfinite(_extremes(gs)).all()) for gs in by_device.values())
        if finite:
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"{type(self).__name__}.step: a gradient holds NaN or inf "
                "(pass nonfinite='skip' to skip such steps instead)"
            )
        for group in self.param_groups:
            group[SKIPPED] = int(group.get(SKIPPED, 0)) + 1
        return False

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """``torch.optim`` loading, after checks that name what is wrong: the structure,
        group sizes, and every buffer (a tensor of its parameter's shape, finite), so
        a state_dict of another model or a damaged one is refused before anything changes."""
        self._check_loadable(state_dict)
        state_dict = dict(state_dict)
        legacy_skipped = int(state_dict.pop(SKIPPED, 0))  # saved before the count moved into the groups
        saved = {k: v[MOMENTUM] for k, v in state_dict["state"].items() if isinstance(v, dict) and MOMENTUM in v}
        numbers = [{k for k in HYPER_KEYS if k in g and not isinstance(g[k], torch.Tensor)} for g in self.param_groups]
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if self._device_hyper is not None:
            self._device_hyper.reattach(self.param_groups)
        else:  # a capturable optimizer's checkpoint: numbers where this one keeps numbers
            for group, keys in zip(self.param_groups, numbers):
                for key in keys:
                    if isinstance(group.get(key), torch.Tensor):
                        group[key] = group[key].item()
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for k, p in zip(ids, params):
            if k in saved:
                self.state[p][MOMENTUM] = saved[k].to(device=p.device, dtype=torch.float32, copy=True)  # type: ignore[attr-defined]
        for group in self.param_groups:
            group.setdefault(SKIPPED, legacy_skipped)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if not (k.startswith("_optimizer_") and k.endswith("_hooks")) and k not in _TORCH_INSTANCE_ATTRS}

    def _state_shape(self, group: dict[str, Any], p: torch.Tensor, key: str) -> tuple[int, ...] | None:
        """The shape ``state[p][key]`` must have (None: not checked); per-parameter
        buffers by default, overridden where a group keeps its state stacked."""
        return tuple(p.shape)

    def _check_loadable(self, state_dict: Any) -> None:
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: state_dict must be a dict from state_dict(), got {type(state_dict).__name__}")
        missing = sorted({"state", "param_groups"} - set(state_dict))
        if missing:
            raise ValueError(f"{owner}: state_dict lacks {missing} (is it an optimizer's state_dict()?)")
        state, saved_groups = state_dict["state"], state_dict["param_groups"]
        skipped = state_dict.get("skipped_steps", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"{owner}: skipped_steps must be an int >= 0, got {skipped!r}")
        if not isinstance(state, Mapping):
            raise TypeError(f"{owner}: state must be a dict, got {type(state).__name__}")
        groups = self.param_groups  # type: ignore[attr-defined]
        if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups
        ):
            raise TypeError(f"{owner}: param_groups must be a list of dicts with 'params'")
        if len(saved_groups) != len(groups):
            raise ValueError(f"{owner}: state_dict has {len(saved_groups)} param groups, this optimizer {len(groups)}")
        for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"{owner}: param_groups[{gi}] holds {len(saved['params'])} parameters in the state_dict, "
                    f"{len(group['params'])} here"
                )
            for pi, (k, p) in enumerate(zip(saved["params"], group["params"])):
                entry = state.get(k)
                if entry is None:
                    continue
                if not isinstance(entry, Mapping):
                    raise TypeError(f"{owner}: state[{k!r}] must be a dict, got {type(entry).__name__}")
                for key, value in entry.items():
                    where = f"{owner}: state[{k!r}][{key!r}] (for {_label(group, gi, pi, p)})"
                    if key in _BUFFERS and not isinstance(value, torch.Tensor):
                        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
                    if not isinstance(value, torch.Tensor):
                        continue
                    expected = self._state_shape(group, p, key)
                    if value.dim() > 0 and expected is not None and tuple(value.shape) != tuple(expected):
                        raise ValueError(
                            f"{where} has shape {tuple(value.shape)}, expected {tuple(expected)}; "
                            "a state_dict of another model?"
                        )
                    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        raise ValueError(f"{where} holds NaN or inf")


def _extremes(grads: list[torch.Tensor]) -> torch.Tensor:
    """Values that are all finite exactly when every entry of ``grads`` (one device) is."""
    if grads[0].device.type == "cpu":
        # CPU's _foreach_norm(inf) is a slow generic loop; min and max (NaN-propagating) of
        # each tensor, in one read and without an abs() copy, are several times faster
        return torch.stack([torch.stack(torch.aminmax(g)) for g in grads if g.numel() > 0] or [torch.zeros(2)])
    return torch.stack(torch._foreach_norm(grads, math.inf))  # max |g|: one fused launch on CUDA


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    """``closure()`` with autograd on (``step`` runs under no_grad), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _collect_grads(param_groups: Iterable[dict[str, Any]], owner: str) -> list[torch.Tensor]:
    """Every present gradient, in group order; rejects sparse gradients by name."""
    grads = []
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError(
                    f"{owner} does not support sparse gradients; {_label(group, gi, pi, p)} has one "
                    "(use a dense embedding, or a sparse-aware optimizer for that parameter)"
                )
            grads.append(p.grad)
    return grads


def norm_options(group: dict[str, Any]) -> dict[str, Any]:
    """The options ``norms.lmo`` gets for a group: ``norm_options`` plus the Newton–Schulz
    settings, the latter only for norms whose catalogue entry takes them (and only keys the
    group has: a checkpoint saved before ``ns_dtype`` existed loads with the default)."""
    accepted = norms.get(group["norm"]).options
    opts = {opt: group[key] for key, opt in _NS_KEYS.items() if opt in accepted and key in group}
    opts.update(group["norm_options"] or {})
    return opts


class Gluon(LMOStateMixin, torch.optim.Optimizer):
    """Layer-wise LMO optimizer: momentum -> LMO over each group's norm ball -> update.

    Args:
        params: tensors, ``(name, tensor)`` pairs or group dicts; a group may override
            any of the options below.
        lr: step size (>= 0). With ``L0``/``L1`` it multiplies Gluon's ``t`` (use 1.0 for
            the paper's rule; schedulers then scale it).
        momentum: EMA factor beta in [0, 1); 0 means the LMO of the raw gradient.
        nesterov: step with ``beta m + (1 - beta) g`` instead of ``m``.
        norm: a name from ``norms`` (e.g. "spectral", "sign", "l2", "colnorm",
            "rownorm", "l1", "bias_rms").
        radius: radius rho (>= 0) of the norm ball.
        weight_decay: decoupled decay: ``x <- (1 - lr * weight_decay) x`` before the
            update (1.0 gives Scion's constrained step).
        ns_steps, ns_coefficients: Newton–Schulz settings, for norms that take them.
        ns_dtype: dtype the Newton–Schulz iteration runs in (``compute_dtype`` of
            ``ops.orthogonalize``); None: bf16 on CUDA, fp32 on CPU. ``torch.bfloat16``
            on CPU is ``torch.optim.Muon``'s math, and faster on CPUs with native bf16
            dot products (benchmarks/RESULTS.md); fp32 is closer to the exact polar factor.
        ns_update: "triton" (default) or "cublas": what runs the non-final Newton–Schulz
            updates on the kernel path (``ops.orthogonalize``); unmeasured on a GPU so far.
        norm_options: other options of the norm, e.g. ``{"scale": "muon"}`` for
            spectral (see ``norms``).
        L0, L1: give both (>= 0, not both 0) to use ``t = ||g||_* / (L0 + L1 ||g||_*)``.
        momentum_estimator: a name of :mod:`.estimators` ("ema", "nesterov", "mvr1",
            "mvr2", "mvr3", "hcm1", "hcm2"); None: "nesterov" or "ema" from ``nesterov``
            (which a given name replaces). MVR and HCM need ``step(closure)`` with a closure
            returning this step's loss with its graph (contract: ``estimators.closure_extras``);
            the optimizer then keeps x_{k-1} per parameter.
        mvr_q: MVR-2/3's ``q`` in [0, 1] (0.1: ours; the source gives no default).
        step_rule: a name of :mod:`.step_rules` ("constant", "l0l1", "theorem2",
            "distance_adaptive", "scale_calibrated"); None: "l0l1" when ``L0``/``L1`` are
            given, else "constant". The rule's factor ``t`` multiplies ``lr``.
        step_options: the rule's options (``L`` for scale_calibrated, ``r_eps`` for
            distance_adaptive); l0l1 reads ``L0``/``L1``.
        nonfinite: "skip" (default: skip the whole step, count it in
            ``skipped_steps``), "raise" (``FloatingPointError``) or "ignore" (no check).
        backend: "auto" | "triton" | "torch", passed to ``ops.lmo_step_``.
        maximize: step to increase the objective (the LMO of ``-g``), as in ``torch.optim``.
        capturable: keep each group's ``lr``, ``momentum`` and ``weight_decay`` as 0-dim
            fp32 tensors on its parameters' device, read by the kernels, so that a step
            can be captured in a CUDA graph (static shapes). See below.

    Capturable contract (``capturable=True``): nothing in ``step`` reads a device value
    on the host (no ``.item()``, ``float(tensor)``, ``bool(tensor)``, ``nonzero`` or
    data-dependent branch; ``kernels.launches.forbid_host_sync`` checks it). Each group's
    ``group["lr"]`` etc. *is* its tensor: LR schedulers ``fill_`` it in place (torch's
    convention for a tensor lr), which a replayed graph reads. A number written into the
    group (a momentum scheduler, a training loop) is range-checked and copied into the
    tensor at the start of the next eager step, which puts the tensor back; a captured
    graph bakes such a copy in, so with graphs update the tensors in place. Their values
    are not range-checked in the step (that would synchronize). The tensors stay the same
    objects for the optimizer's life (``load_state_dict`` copies into them;
    ``state_dict`` saves copies). Refused with a ValueError, since they need host values
    or host work inside the step: ``nonfinite`` other than "ignore" (the guard reads a
    device flag), step rules other than "constant" (``L0``/``L1`` included: the factor is
    computed per tensor on the host), momentum estimators other than "ema"/"nesterov"
    (they run the closure's backward inside the step; hcm2 draws its point on the host),
    a group spanning devices. The first step of a shape (autotuning, address tables,
    direction buffers) should run eagerly before capture. The kernels compute
    ``-lr * radius`` and ``1 - lr * weight_decay`` in fp32 from the tensors, the eager
    path in float64 before rounding, so results agree to fp32 rounding (not always bitwise).

    Parameters are updated in their own dtype (rounded once); the momentum buffer
    (``state[p]["momentum_buffer"]``) is fp32. Tensors of 3 or more dimensions are seen
    as (shape[0], rest) matrices, vectors as 1 x d. With ``L0``/``L1`` each tensor's step
    size is read on the host, so that group is stepped one tensor at a time.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        norm: str = "spectral",
        radius: float = 1.0,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: Any = "polar_express",
        L0: float | None = None,
        L1: float | None = None,
        norm_options: dict[str, Any] | None = None,
        *,
        nonfinite: str = "skip",
        backend: str | None = "auto",
        ns_dtype: torch.dtype | None = None,
        maximize: bool = False,
        momentum_estimator: str | None = None,
        mvr_q: float = 0.1,
        step_rule: str | None = None,
        step_options: dict[str, float] | None = None,
        ns_update: str = "triton",
        capturable: bool = False,
    ) -> None:
        self._init_guard(nonfinite, capturable)
        check_backend(backend)
        self.backend = backend
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, norm=norm, radius=radius,
            weight_decay=weight_decay, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype, L0=L0, L1=L1, norm_options=norm_options, maximize=maximize,
            momentum_estimator=momentum_estimator, mvr_q=mvr_q, step_rule=step_rule, step_options=step_options,
            ns_update=ns_update,
        )
        super().__init__(params, defaults)

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The group options a group that sets none gets (the constructor's defaults)."""
        signature = inspect.signature(cls.__init__)
        skip = ("self", "params", "nonfinite", "backend", "capturable")
        return {k: v.default for k, v in signature.parameters.items() if k not in skip}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch.optim semantics), checking its options and tensors first."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        try:
            _check_group(self.param_groups[gi], gi, numbers=not self.capturable)
            if self.capturable:
                group, where = self.param_groups[gi], f"param_groups[{gi}]"
                _check_capturable(_step_rule(group, where)[0], _estimator(group), where)
            self._adopt_device_hyper(self.param_groups[gi], f"param_groups[{gi}]")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        param_group.setdefault(SKIPPED, 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step over every parameter that has a gradient; returns ``closure()``'s loss.

        With an MVR or HCM group, ``closure`` is required and its contract differs from
        torch's: it returns the loss with its graph and does not call backward (see
        ``estimators.closure_extras``); the gradients are computed here and left in ``.grad``.
        """
        needs: set[str] = set()
        for group in self.param_groups:
            needs |= estimators.needs_of(_estimator(group))
        extras: dict[str, list[torch.Tensor]] = {}
        index: dict[torch.Tensor, int] = {}
        if needs:
            params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
            previous = [self.state[p].get(PREVIOUS) for p in params]
            loss, grads, extras = estimators.closure_extras(
                closure, params, None if any(x is None for x in previous) else previous, needs,
                owner=f"{type(self).__name__}.step")
            for p, g in zip(params, grads):
                p.grad = g
            index = {p: i for i, p in enumerate(params)}
        else:
            loss = _closure_loss(closure)
        if self._grads_ok(_collect_grads(self.param_groups, type(self).__name__)):
            if needs:  # x_k, before this step moves it, is the next step's previous iterate
                for p, i in index.items():
                    self.state[p][PREVIOUS] = p.detach().clone()
            for gi, group in enumerate(self.param_groups):
                self._group_step(group, gi, extras, index)
        return loss

    def _group_step(self, group: dict[str, Any], gi: int, extras: dict[str, list[torch.Tensor]],
                    index: dict[torch.Tensor, int]) -> None:
        where = f"param_groups[{gi}]"
        if self._device_hyper is not None:  # the device tensors, with any number written since copied in
            hyper = self._device_hyper.sync(gi, group, where)
            _check_hyper(group, where, numbers=False)
            lr, beta, weight_decay = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        else:
            _check_hyper(group, where)
            lr, beta, weight_decay = float(group["lr"]), group["momentum"], group["weight_decay"]
        estimator = _estimator(group)
        rule, rule_options = _step_rule(group, where)
        if self._device_hyper is not None:
            _check_capturable(rule, estimator, where)
        options = norm_options(group)
        common = dict(norm=group["norm"], weight_decay=weight_decay, radius=group["radius"],
                      backend=self.backend, **options)
        maximize = group.get("maximize", False)  # a group loaded from before maximize existed lacks it
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_device[p.device].append(p)
        for params in by_device.values():
            # lmo_step_ updates contiguous tensors in place; a strided parameter steps on a
            # contiguous copy that is written back.
            work = [p if p.is_contiguous() else p.contiguous() for p in params]
            xs = [w.view(matrix_shape(w.shape)) for w in work]
            gs = [p.grad.reshape(x.shape) for p, x in zip(params, xs)]
            if maximize:
                gs = torch._foreach_neg(gs)
            ms = [self._momentum(p).view(x.shape) for p, x in zip(params, xs)]
            es: list[torch.Tensor | None] = [None] * len(xs)
            if not estimator.fusable:  # maximizing -f: its previous gradient and Hessian are negated too
                es = [estimators.extra_for(estimator, extras, index[p]).reshape(x.shape) * (-1.0 if maximize else 1.0)
                      for p, x in zip(params, xs)]
            hs = [self._mvr_h(p, e) for p, e in zip(params, es)] if estimator.recursion else None
            fused = estimators.fused_args(estimator, es, hs, group.get("mvr_q", 0.1))
            if rule.name == "constant":  # one multi-tensor pass: momentum (any estimator), LMO, update
                ops.lmo_step_(xs, gs, ms, lr=lr, beta=beta, nesterov=estimator.nesterov, **common, **fused)
                for p, w in zip(params, work):
                    if w is not p:
                        p.copy_(w)
                continue
            for j, (p, x, g, m) in enumerate(zip(params, xs, gs, ms)):
                state = self.state[p]
                k = int(state.get(RULE_STEP, 0))
                beta_k = step_rules.momentum(rule, k, beta)
                factor = dict(rule=rule, options=rule_options, k=k, x=x, g=g, norm=group["norm"],
                              norm_options=options, state=state)
                if not rule.needs_direction:  # the estimator stays in the fused pass; lr changes per tensor
                    ops.lmo_step_([x], [g], [m], lr=lr * step_rules.factor(**factor), beta=beta_k,
                                  nesterov=estimator.nesterov, **common, **estimators.one_of(fused, j))
                else:
                    u, _ = estimators.update_(estimator, m, g, beta=beta_k, q=group.get("mvr_q", 0.1), extra=es[j],
                                              h=None if hs is None else hs[j])
                    step_rules.direction_step_(x, u, lr, factor, common)
                if rule.stateful:
                    state[RULE_STEP] = k + 1
            for p, w in zip(params, work):
                if w is not p:
                    p.copy_(w)

    def _mvr_h(self, p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """MVR-2's fp32 ``h`` (matrix view); a new one starts at ``e``, so its first
        recursion gives ``h = g`` (``estimators.update_``)."""
        state = self.state[p]
        if MVR_STATE not in state:
            state[MVR_STATE] = e.to(torch.float32, copy=True).reshape(p.shape)
        return state[MVR_STATE].view(e.shape)

    def _momentum(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if MOMENTUM not in state:
            state[MOMENTUM] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state[MOMENTUM]


def _estimator(group: dict[str, Any]) -> estimators.Estimator:
    """A group's momentum estimator (groups saved before the key existed: from ``nesterov``)."""
    return estimators.resolve(group.get("momentum_estimator"), group["nesterov"])


def _step_rule(group: dict[str, Any], where: str) -> tuple[step_rules.StepRule, dict[str, float]]:
    """A group's step rule and its checked options (l0l1's ``L0``/``L1`` are group keys)."""
    name = group.get("step_rule") or ("l0l1" if group["L0"] is not None else "constant")
    rule = step_rules.get(name, f"{where}: step_rule")
    options = dict(group.get("step_options") or {})
    if rule.name == "l0l1":
        options.update(L0=group["L0"], L1=group["L1"])
    return rule, step_rules.check_options(rule, options, f"{where}: step_options")


def _check_hyper(group: dict[str, Any], where: str, numbers: bool = True) -> None:
    """Options a scheduler or user may rewrite between steps; cheap, so checked each step.
    ``numbers=False``: lr, momentum and weight decay are a capturable group's device
    tensors, not read here."""
    if numbers:
        check_lr(where, group["lr"])
        check_number(where, "momentum", group["momentum"], high=1.0)
        check_number(where, "weight_decay", group["weight_decay"])
    check_number(where, "radius", group["radius"])
    for key in ("nesterov", "maximize"):
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{where}: {key} must be a bool, got {type(group[key]).__name__}")
    L0, L1 = group["L0"], group["L1"]
    if (L0 is None) != (L1 is None):
        raise ValueError(f"{where}: give both L0 and L1 for Gluon's step-size rule, or neither")
    if L0 is not None:
        check_number(where, "L0", L0)
        check_number(where, "L1", L1)
        if L0 == 0 and L1 == 0:
            raise ValueError(f"{where}: L0 and L1 cannot both be 0")
    _estimator(group)  # a known name (ValueError listing them otherwise)
    estimators.check_q(group.get("mvr_q", 0.1), f"{where}: mvr_q")
    _step_rule(group, where)


def _check_capturable(rule: step_rules.StepRule, estimator: estimators.Estimator, where: str) -> None:
    """ValueError naming the option (a group's resolved step rule and momentum estimator)
    a capturable step cannot run (see Gluon's contract)."""
    if rule.name != "constant":
        raise ValueError(f"{where}: step_rule {rule.name!r} (L0/L1 give 'l0l1') computes its step size on the "
                         "host per tensor; capturable=True supports step_rule 'constant' only")
    if not estimator.fusable:
        raise ValueError(f"{where}: momentum_estimator {estimator.name!r} runs the closure's backward inside step; "
                         "capturable=True supports 'ema' and 'nesterov' only")


def _check_group(group: dict[str, Any], gi: int, numbers: bool = True) -> None:
    """A new group's options and tensors (``numbers=False``: a capturable group, whose lr,
    momentum and weight decay its device tensors check as they are made)."""
    where = f"param_groups[{gi}]"
    _check_hyper(group, where, numbers)
    if group.get("ns_dtype") is not None and not (isinstance(group["ns_dtype"], torch.dtype)
                                                  and group["ns_dtype"].is_floating_point):
        raise TypeError(f"{where}: ns_dtype must be None or a floating torch.dtype, got {group['ns_dtype']!r}")
    try:
        spec = norms.get(group["norm"])
        if group["norm_options"] is not None and not isinstance(group["norm_options"], dict):
            raise TypeError(f"norm_options must be a dict or None, got {type(group['norm_options']).__name__}")
        opts = norms.resolve_options(spec, norm_options(group))
        if "steps" in spec.options:
            # Named as the user set them: a group key, or an entry of norm_options.
            given = group["norm_options"] or {}
            keys = {"steps": "ns_steps", "coefficients": "ns_coefficients", "eps": None}
            names = tuple(f"norm_options[{k!r}]" if k in given or keys[k] is None else keys[k] for k in keys)
            ops.check_newton_schulz(opts["steps"], opts["coefficients"], opts["eps"], names=names)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    try:
        norms.check_ns_update(group.get("ns_update", "triton"))  # checked for every norm, used by spectral
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for pi, p in enumerate(group["params"]):
        if not p.is_floating_point():
            raise TypeError(f"Gluon needs real floating-point parameters; {_label(group, gi, pi, p)} is {p.dtype}")
