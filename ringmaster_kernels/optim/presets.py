"""Param-group presets built from a model (Muon, Scion) and the combined Gluon + AdamW.

``muon_groups``/``scion_groups`` return plain lists of group dicts; each carries
``role`` ("hidden", "embedding", "head" or "vector") and ``kind`` ("gluon" or "adamw"),
so a user can edit any group, or pass ``overrides={role: {...}}``. ``GluonAdamW`` takes
such a list and steps both kinds with one ``step()``.

How parameters are classified (only trainable ones):

- embedding: weights of ``nn.Embedding``/``nn.EmbeddingBag`` modules;
- head: the parameters named in ``head``, by default the weight of the last
  ``nn.Linear`` registered in the model (unless it is tied to an embedding);
- vector: every other parameter with fewer than 2 dimensions (biases, norm gains);
- hidden: the rest (2-D weights; conv kernels are seen as (out, in * k * k)).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..backend import check_backend
from .composite import CompositeMixin
from .checks import check_number
from .gluon import Gluon, _closure_loss, _collect_grads, matrix_shape

ROLES = ("hidden", "embedding", "head", "vector")
KINDS = ("gluon", "adamw")


def _classify(model: nn.Module, head: str | Iterable[str] | None) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable (name, parameter) pairs of ``model`` by role, in registration order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_id = {id(p): n for n, p in named}
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head_ids = {id(linears[-1].weight)} if linears else set()
    else:
        head_names = {head} if isinstance(head, str) else set(head)
        unknown = head_names - set(by_id.values())
        if unknown:
            raise ValueError(f"head names parameters the model does not have (or frozen): {sorted(unknown)}")
        head_ids = {id(p) for n, p in named if n in head_names}
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
    for n, p in named:
        if id(p) in embedding_ids:
            roles["embedding"].append((n, p))
        elif id(p) in head_ids:
            roles["head"].append((n, p))
        elif p.dim() < 2:
            roles["vector"].append((n, p))
        else:
            roles["hidden"].append((n, p))
    return roles


def _by_shape(pairs: list[tuple[str, nn.Parameter]]) -> list[list[tuple[str, nn.Parameter]]]:
    """Split into lists of the same matrix shape (first-seen order), for groups whose
    radius depends on the shape."""
    shapes: dict[tuple[int, int], list[tuple[str, nn.Parameter]]] = {}
    for n, p in pairs:
        shapes.setdefault(matrix_shape(p.shape), []).append((n, p))
    return list(shapes.values())


def _group(role: str, kind: str, pairs: list[tuple[str, nn.Parameter]], **options: Any) -> dict[str, Any]:
    return {"params": [p for _, p in pairs], "param_names": [n for n, _ in pairs],
            "role": role, "kind": kind, **options}


def _real(value: Any) -> Any:
    """A 1-element tensor (a scheduler's or capturable lr/beta) as a float, for checking."""
    return float(value) if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _check_adamw(where: str, lr: Any, betas: Any, eps: Any, weight_decay: Any, prefix: str = "") -> None:
    """ValueError naming the option unless AdamW's are sane: torch.optim.AdamW checks only
    its defaults, so a group's lr=nan, betas=(1.5, 2) or eps=-1 would reach the step."""
    check_number(where, f"{prefix}lr", _real(lr))
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: {prefix}betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    for k, beta in enumerate(betas):
        check_number(where, f"{prefix}betas[{k}]", _real(beta), high=1.0)
    check_number(where, f"{prefix}eps", eps)
    check_number(where, f"{prefix}weight_decay", weight_decay)


def _apply_overrides(groups: list[dict[str, Any]], overrides: Mapping[str, Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if overrides is None:
        return groups
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping role -> options, got {type(overrides).__name__}")
    for role, options in overrides.items():
        if role not in ROLES:
            raise ValueError(f"overrides: unknown role {role!r}; roles are {ROLES}")
        if not isinstance(options, Mapping):
            raise TypeError(f"overrides[{role!r}] must be a mapping of group options, got {type(options).__name__}")
        for key in ("params", "param_names", "role"):
            if key in options:
                raise ValueError(f"overrides[{role!r}] may not set {key!r}; edit the returned groups instead")
        for g in groups:
            if g["role"] == role:
                g.update(options)
    return groups


def muon_groups(
    model: nn.Module,
    *,
    lr: float = 0.02,
    momentum: float = 0.95,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    ns_steps: int = 5,
    ns_coefficients: Any = "polar_express",
    ns_dtype: torch.dtype | None = None,
    adamw_lr: float = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
    head: str | Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Muon's recipe: spectral LMO on hidden matrices, AdamW for everything else.

    Hidden matrices get one Gluon group with ``norm="spectral"``, radius 1 and the norm's
    ``scale="muon"`` (``max(1, rows / cols) ** 0.5``, Keller Jordan's), so the step is
    ``x <- (1 - lr wd) x - lr max(1, rows/cols)^0.5 NS(u)``. Embeddings, head, biases
    and gains get AdamW groups. ``ns_dtype`` is the Newton–Schulz iteration dtype (None:
    bf16 on CUDA, fp32 on CPU; ``torch.bfloat16`` is ``torch.optim.Muon``'s math on every
    device). Pass the result to :class:`GluonAdamW`.
    """
    _check_adamw("muon_groups", adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, prefix="adamw_")
    roles = _classify(model, head)
    groups = []
    if roles["hidden"]:
        groups.append(_group("hidden", "gluon", roles["hidden"], norm="spectral", radius=1.0,
                             norm_options={"scale": "muon"}, lr=lr, momentum=momentum, nesterov=nesterov,
                             weight_decay=weight_decay, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
                             ns_dtype=ns_dtype))
    adamw = dict(lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay)
    groups += [_group(role, "adamw", roles[role], **adamw) for role in ("embedding", "head", "vector") if roles[role]]
    return _apply_overrides(groups, overrides)


def scion_groups(
    model: nn.Module,
    *,
    lr: float = 2.0 ** -12,
    momentum: float = 0.9,
    nesterov: bool = False,
    constrained: bool = True,
    radius: float = 50.0,
    head_radius: float = 3000.0,
    embedding_radius: float = 1.0,
    vector_radius: float = 1.0,
    ns_steps: int = 5,
    ns_coefficients: Any = "polar_express",
    ns_dtype: torch.dtype | None = None,
    head: str | Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Scion's recipe (Pethick et al. 2025): every parameter steps by an LMO.

    - hidden: spectral with ``scale="scion"``: radius ``radius * sqrt(rows / cols)`` (the
      RMS -> RMS operator norm ball);
    - head: sign, radius ``head_radius / cols`` (Scion's normalized sign);
    - embedding: sign, radius ``embedding_radius`` (Scion's unnormalized sign on inputs);
    - vector: bias_rms, radius ``vector_radius``.

    ``momentum`` is beta of the EMA (Scion's ``momentum=0.1`` is beta 0.9).
    ``constrained`` gives Scion's ``x <- (1 - lr) x + lr lmo(m)`` (weight_decay 1), else
    the unconstrained ``x <- x + lr lmo(m)``. Defaults follow Scion's nanoGPT example;
    ``ns_dtype`` is the hidden layers' Newton–Schulz dtype, as in :func:`muon_groups`.
    Every group is of kind "gluon": pass the result to :class:`Gluon` or :class:`GluonAdamW`.
    """
    roles = _classify(model, head)
    common = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=1.0 if constrained else 0.0,
                  ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype)
    groups = []
    if roles["hidden"]:
        groups.append(_group("hidden", "gluon", roles["hidden"], norm="spectral", radius=radius,
                             norm_options={"scale": "scion"}, **common))
    groups += [
        _group("head", "gluon", pairs, norm="sign", radius=head_radius / cols, **common)
        for pairs in _by_shape(roles["head"])
        for _, cols in [matrix_shape(pairs[0][1].shape)]
    ]
    if roles["embedding"]:
        groups.append(_group("embedding", "gluon", roles["embedding"], norm="sign", radius=embedding_radius, **common))
    if roles["vector"]:
        groups.append(_group("vector", "gluon", roles["vector"], norm="bias_rms", radius=vector_radius, **common))
    return _apply_overrides(groups, overrides)


class GluonAdamW(CompositeMixin, torch.optim.Optimizer):
    """One optimizer over groups of kind "gluon" (:class:`Gluon`) and "adamw" (fused AdamW).

    ``param_groups`` holds the very group dicts the two inner optimizers step, in the
    order given, so LR schedulers and in-loop edits reach them; ``state`` is shared too,
    so ``state_dict()``/``load_state_dict()`` are the ``torch.optim`` ones (with the
    ``skipped_steps`` count in the groups). The non-finite check covers every gradient
    once per step, so a skipped step leaves both kinds untouched. To torch's machinery it
    is one optimizer (:mod:`.composite`): ``defaults`` are Gluon's, so momentum schedulers
    cycle Gluon groups' ``momentum`` and AdamW groups' beta1.

    Args:
        param_groups: group dicts, each with ``kind`` in ("gluon", "adamw") (default
            "gluon"), e.g. from :func:`muon_groups`; or tensors / ``(name, tensor)``
            pairs for one Gluon group. Gluon groups take Gluon's options, AdamW groups
            AdamW's.
        nonfinite: "skip" | "raise" | "ignore", as in :class:`Gluon`.
        fused_adamw: use ``torch.optim.AdamW(fused=True)``.
        backend: passed to :class:`Gluon`.
    """

    KINDS = KINDS
    DEFAULT_KIND = "gluon"

    def __init__(
        self,
        param_groups: Iterable[dict[str, Any]] | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        nonfinite: str = "skip",
        fused_adamw: bool = True,
        backend: str | None = "auto",
    ) -> None:
        self._init_guard(nonfinite)
        check_backend(backend)
        self._fused_adamw = fused_adamw
        self._backend = backend
        self._inner: dict[str, torch.optim.Optimizer] = {}
        super().__init__(param_groups, {"kind": "gluon", **Gluon.option_defaults()})

    def _make_inner(self, kind: str, group: dict[str, Any]) -> torch.optim.Optimizer:
        if kind == "gluon":
            # the check here would repeat ours; one check over all gradients is the point
            return Gluon([group], nonfinite="ignore", backend=self._backend)
        return torch.optim.AdamW([group], fused=self._fused_adamw)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group of either kind (see :class:`CompositeMixin`); an AdamW group's lr, betas,
        eps and weight decay are checked once AdamW has filled in its defaults."""
        super().add_param_group(param_group)
        if param_group.get("kind") != "adamw":
            return
        g = param_group
        try:
            _check_adamw(f"param_groups[{len(self.param_groups) - 1}]", g["lr"], g["betas"], g["eps"], g["weight_decay"])
        except (TypeError, ValueError):
            self.param_groups.remove(g)
            self._inner["adamw"].param_groups.remove(g)
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step both kinds once; returns ``closure()``'s loss."""
        loss = _closure_loss(closure)
        # Gluon checks its groups each step; AdamW's too, since a scheduler or an edit
        # may have set them after construction.
        for i, g in enumerate(self.param_groups):
            if g["kind"] == "adamw":
                _check_adamw(f"param_groups[{i}]", g["lr"], g["betas"], g["eps"], g["weight_decay"])
        if self._grads_ok(_collect_grads(self.param_groups, type(self).__name__)):
            for kind in KINDS:
                self._step_inner(kind)
        return loss
