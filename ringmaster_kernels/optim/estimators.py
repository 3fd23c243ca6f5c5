"""Momentum estimators: how a layer's LMO input ``u`` is built from its gradients.

One small interface, chosen per parameter group by name (``momentum_estimator``), shared by
the synchronous :class:`~ringmaster_kernels.optim.gluon.Gluon` and the async update rule
:class:`~ringmaster_kernels.optim.update_rules.LMOMomentum`. With ``g = g(x_k; xi_k)`` and
``beta`` the group's momentum (formulas and how sure each is: ../shared/ALGORITHMS.md,
"Momentum" and "Neighbouring methods")::

    ema       m <- beta m + (1 - beta) g;                         u = m
    nesterov  m <- beta m + (1 - beta) g;                         u = beta m + (1 - beta) g
    mvr1      m <- g + beta (m - g_prev)                          u = m
    mvr2      h <- g + (1 - q)(h - g_prev);  m <- beta m + (1 - beta) h
    mvr3      h as mvr2;  m <- beta m + (1 - beta) h + beta (g - g_prev)     [inferred]
    hcm1/2    m <- (1 - a)(m + H(xhat)(x_k - x_{k-1})) + a g,  a = 1 - beta

``g_prev = g(x_{k-1}; xi_k)`` is the gradient at the previous iterate on the SAME
minibatch (Gluon-MVR, Qian et al., arXiv 2512.16598, [secondary]); ``H(xhat) d`` is one
Hessian-vector product with ``d = x_k - x_{k-1}`` at ``xhat = x_k`` (hcm1) or at a
uniform random point of the segment ``[x_{k-1}, x_k]`` (hcm2; Khirirat et al., arXiv
2512.13227, [secondary/inferred]). Note ``mvr1 = ema + beta (g - g_prev)`` (STORM's
correction), which is how mvr3 is read: mvr2's ``M`` plus mvr1's correction.

Initialisation: ``m`` starts at zero for every estimator (as EMA does in the paper's
code), so hcm with a zero Hessian is ema exactly; ``h`` starts at the first gradient
(``h^0 = g^0``, the MVR/STORM convention; a zero ``h`` would make q = 0 start at 0). At
the first step there is no previous iterate: ``g_prev = g`` and ``d = 0`` (nothing extra
is computed). With ALGORITHMS.md's ``(1 - q)``, mvr2/mvr3 reduce to the raw gradient at
``beta = 0, q = 1``; ``q = 0`` is the undamped SARAH recursion.

:func:`update_` is the plain-torch path (elementwise, in ``m``'s dtype; its twin
``reference.momentum_update_``); every estimator also runs inside the fused multi-tensor
pass of ``ops.lmo_step_`` (:func:`fused_args` gives its keywords), which Gluon uses unless
the step rule must read ``lmo(u)`` first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import reference

# what an estimator needs beyond g, as error messages name it
PREVIOUS_GRADIENT = "previous_gradient"
HVP = "hvp"
_NEEDS = {
    PREVIOUS_GRADIENT: "the gradient at the previous iterate on the same minibatch (g_prev)",
    HVP: "a Hessian-vector product H(xhat) (x_k - x_{k-1})",
}


@dataclass(frozen=True)
class Estimator:
    """One named estimator: what it needs and which terms of the update it has.

    Attributes:
        name: the key of :data:`ESTIMATORS`.
        needs: None, ``"previous_gradient"`` (MVR) or ``"hvp"`` (HCM).
        nesterov: ``u = beta m + (1 - beta) g`` instead of ``u = m``.
        recursion: keeps the MVR-2 state ``h`` (the EMA then runs on ``h``).
        correction: adds ``beta (g - g_prev)`` (MVR) or ``beta Hv`` (HCM) to ``m``.
        hvp_at: ``"current"`` (x_k) or ``"random"`` (uniform on [x_{k-1}, x_k]); HCM only.
        inferred: the formula is ours where the sources were not readable.
    """

    name: str
    needs: str | None = None
    nesterov: bool = False
    recursion: bool = False
    correction: bool = False
    hvp_at: str | None = None
    inferred: bool = False

    @property
    def fusable(self) -> bool:
        """ema and nesterov: the momentum pass of ``ops.lmo_step_`` computes them."""
        return self.needs is None


ESTIMATORS: dict[str, Estimator] = {
    "ema": Estimator("ema"),
    "nesterov": Estimator("nesterov", nesterov=True),
    "mvr1": Estimator("mvr1", needs=PREVIOUS_GRADIENT, correction=True),
    "mvr2": Estimator("mvr2", needs=PREVIOUS_GRADIENT, recursion=True),
    "mvr3": Estimator("mvr3", needs=PREVIOUS_GRADIENT, recursion=True, correction=True, inferred=True),
    "hcm1": Estimator("hcm1", needs=HVP, correction=True, hvp_at="current", inferred=True),
    "hcm2": Estimator("hcm2", needs=HVP, correction=True, hvp_at="random", inferred=True),
}
KNOWN = tuple(ESTIMATORS)


def get(name: object, where: str = "momentum_estimator") -> Estimator:
    """The estimator called ``name``; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"{where} must be one of {KNOWN}, got {name!r}")
    return ESTIMATORS[name]


def resolve(name: str | None, nesterov: bool) -> Estimator:
    """A group's estimator: ``name``, or (None) ema/nesterov from the older ``nesterov`` flag."""
    return get(name) if name is not None else ESTIMATORS["nesterov" if nesterov else "ema"]


def check_q(q: object, where: str = "mvr_q") -> float:
    """MVR-2's ``q`` as a float in [0, 1]."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise ValueError(f"{where} must be a number in [0, 1], got {q!r}")
    return float(q)


def update_(
    estimator: Estimator,
    m: torch.Tensor,
    g: torch.Tensor,
    *,
    beta: float,
    q: float = 0.0,
    extra: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One estimator update of one tensor, in place on ``m`` (and ``h``).

    Args:
        estimator: from :func:`get`.
        m: momentum, any float dtype (the math runs in it), updated in place.
        g: gradient at x_k, m's shape, any float dtype.
        beta: momentum in [0, 1]; q: MVR-2's q in [0, 1].
        extra: ``g_prev`` (MVR) or ``H(xhat) d`` (HCM), m's shape; required for those.
        h: MVR-2's state (m's shape and dtype), or None before its first step.

    Returns:
        ``(u, h)``: the LMO input (``m`` itself unless nesterov) and the new ``h``.
    """
    if estimator.needs is not None and extra is None:
        raise ValueError(f"momentum_estimator {estimator.name!r} needs {_NEEDS[estimator.needs]}; none was given")
    if estimator.recursion and h is None:
        h = extra.to(m.dtype).clone()  # h = e makes the first recursion h = g + (1 - q) * 0 = g
    u = reference.momentum_update_(m, g, beta=beta, nesterov=estimator.nesterov, correction=correction_of(estimator),
                                   extra=extra, h=h if estimator.recursion else None, q=q)
    return u, h


def fused_args(estimator: Estimator, extras: Sequence[torch.Tensor | None], h: Sequence[torch.Tensor] | None,
               q: float) -> dict:
    """``ops.lmo_step_``'s estimator keywords for a list of tensors ({} for ema/nesterov,
    whose momentum the pass computes without them); ``h``: MVR-2's fp32 states, each
    started at its ``e`` (see :func:`update_`)."""
    if estimator.fusable:
        return {}
    return dict(correction=correction_of(estimator), extras=list(extras), recursion=None if h is None else list(h), q=q)


def one_of(args: dict, j: int) -> dict:
    """:func:`fused_args` for tensor ``j`` alone."""
    return {k: [v[j]] if isinstance(v, list) else v for k, v in args.items()}


def correction_of(estimator: Estimator) -> str | None:
    """The momentum pass's correction term: "difference" (MVR: beta (g - g_prev)),
    "vector" (HCM: beta Hv) or None."""
    if not estimator.correction:
        return None
    return "difference" if estimator.needs == PREVIOUS_GRADIENT else "vector"


# ---------------------------------------------------------------------- synchronous extras
Closure = Callable[[], torch.Tensor]


def _loss(closure: Closure) -> torch.Tensor:
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise TypeError(
            "closure must return the scalar loss tensor with its autograd graph (and not call "
            f"backward: the optimizer differentiates it), got {type(loss).__name__}"
        )
    return loss


def _grad(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _hvp(grads: list[torch.Tensor], params: list[torch.Tensor], d: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H d`` by double backward through ``grads`` (made with ``create_graph=True``)."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if live:
        hv = torch.autograd.grad([grads[i] for i in live], params, [d[i] for i in live], allow_unused=True)
        out = [torch.zeros_like(p) if v is None else v for p, v in zip(params, hv)]
    return out


@torch.no_grad()
def _at(params: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Set ``params`` to ``values`` in place; returns the old values (to put back)."""
    saved = [p.detach().clone() for p in params]
    for p, v in zip(params, values):
        p.copy_(v)
    return saved


def closure_extras(
    closure: Closure | None,
    params: list[torch.Tensor],
    previous: list[torch.Tensor] | None,
    needs: set[str],
    owner: str = "Gluon.step",
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Evaluate ``closure`` where the estimators need it; the synchronous contract.

    ``closure()`` must return the scalar loss on THIS step's minibatch at the parameters'
    current values, with its graph, and must not call ``backward`` (the step
    differentiates it, by ``torch.autograd.grad``). It is called at x_k, then, when a
    previous iterate exists, at x_{k-1} (MVR) and at ``xhat`` (hcm2); the parameters are
    put back afterwards. hcm1 takes its Hessian-vector product at x_k by double backward
    through the first call. hcm2's ``xhat = x_{k-1} + s (x_k - x_{k-1})`` draws one
    ``s ~ U(0, 1)`` per step from torch's global generator (``torch.manual_seed`` fixes it).
    A model with fused attention must run its forward under SDPA's math backend for hcm
    (``runtime.objectives.twice_differentiable()``): the fused kernels have no double backward.

    Args:
        closure: as above.
        params: every parameter of the optimizer (all move together: the previous iterate
            and xhat are points of the whole model).
        previous: x_{k-1} per parameter, or None at the first step (then g_prev = g, Hv = 0).
        needs: a subset of {"previous_gradient", "hvp"}.

    Returns:
        ``(loss at x_k, gradients at x_k, {need: per-parameter tensors})``, all detached.
    """
    if closure is None:
        wanted = " and ".join(_NEEDS[n] for n in sorted(needs) if n in _NEEDS)
        raise ValueError(
            f"{owner} needs closure: its momentum estimator takes {wanted}; pass "
            "closure=lambda: loss_fn(model(batch)) evaluating this step's batch (see estimators.closure_extras)"
        )
    hvp_now = HVP in needs and previous is not None and "current" in _hvp_points(needs)
    loss = _loss(closure)
    grads = _grad(loss, params, create_graph=hvp_now)
    extras: dict[str, list[torch.Tensor]] = {}
    if previous is None:
        if PREVIOUS_GRADIENT in needs:
            extras[PREVIOUS_GRADIENT] = [g.detach() for g in grads]
        if HVP in needs:
            extras[HVP] = [torch.zeros_like(p) for p in params]
            extras["hvp_random"] = extras[HVP]
        return loss.detach(), [g.detach() for g in grads], extras
    d = [p.detach() - x for p, x in zip(params, previous)]
    if hvp_now:
        extras[HVP] = [v.detach() for v in _hvp(grads, params, d)]
    grads = [g.detach() for g in grads]
    if PREVIOUS_GRADIENT in needs:
        current = _at(params, previous)
        try:
            extras[PREVIOUS_GRADIENT] = [g.detach() for g in _grad(_loss(closure), params, False)]
        finally:
            _at(params, current)
    if HVP in needs and "random" in _hvp_points(needs):
        s = float(torch.rand(()))
        current = _at(params, [x + s * di for x, di in zip(previous, d)])
        try:
            g_hat = _grad(_loss(closure), params, True)
            extras["hvp_random"] = [v.detach() for v in _hvp(g_hat, params, d)]
        finally:
            _at(params, current)
    return loss.detach(), grads, extras


def _hvp_points(needs: set[str]) -> set[str]:
    """The points (``current``/``random``) where an HVP is wanted; ``needs`` carries them
    as ``"hvp"`` plus ``"hvp:current"`` / ``"hvp:random"``."""
    return {n.split(":", 1)[1] for n in needs if n.startswith(HVP + ":")}


def needs_of(estimator: Estimator) -> set[str]:
    """What :func:`closure_extras` must compute for ``estimator`` (empty for ema/nesterov)."""
    if estimator.needs is None:
        return set()
    if estimator.needs == HVP:
        return {HVP, f"{HVP}:{estimator.hvp_at}"}
    return {estimator.needs}


def extra_for(estimator: Estimator, extras: dict[str, list[torch.Tensor]], i: int) -> torch.Tensor | None:
    """Parameter ``i``'s extra input for ``estimator`` from :func:`closure_extras`' result."""
    if estimator.needs is None:
        return None
    key = "hvp_random" if estimator.hvp_at == "random" else estimator.needs
    return extras[key][i]


# ---------------------------------------------------------------------- asynchronous jobs
# what a worker job may return besides its gradient (an update rule's ``job``), as the
# simulator's objectives, the threaded runtime's workers and remote workers name it
JOBS = (PREVIOUS_GRADIENT, f"{HVP}:current", f"{HVP}:random")


def check_job(job: str | None, where: str) -> str | None:
    """``job`` if it is None or one of :data:`JOBS`; ValueError naming ``where`` otherwise."""
    if job is not None and job not in JOBS:
        raise ValueError(f"{where}: job must be None or one of {JOBS}, got {job!r}")
    return job


def job_of(estimator: Estimator) -> str | None:
    """What a worker job must return besides the gradient: None, ``"previous_gradient"``,
    ``"hvp:current"`` or ``"hvp:random"``."""
    if estimator.needs == HVP:
        return f"{HVP}:{estimator.hvp_at}"
    return estimator.needs


def split_payload(grads: Sequence[torch.Tensor], n: int, job: str | None
                  ) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor] | None]:
    """A job's result as (gradients, extras): ``2 n`` tensors ``[g_1..g_n, e_1..e_n]`` when
    ``job`` is set, ``n`` gradients otherwise; ValueError naming what is missing."""
    if job is None:
        return grads, None
    if len(grads) != 2 * n:
        what = _NEEDS[job.split(":", 1)[0]]
        raise ValueError(f"this rule's momentum estimator needs {what}: a gradient must hold 2 x {n} tensors "
                         f"(the {n} gradients, then the {n} extra tensors), got {len(grads)}")
    return grads[:n], grads[n:]
