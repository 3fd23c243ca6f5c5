"""An optimizer made of inner ``torch.optim`` optimizers, one per group ``kind``, that torch's
machinery (step hooks, LR and momentum schedulers, deepcopy/pickle, state dicts, DCP,
``add_param_group``) sees as ONE optimizer.

The composite's ``param_groups`` are the very dicts the inner optimizers step and its ``state``
is theirs, so a scheduler's or the training loop's edits reach them; the inner optimizers are
stepped without torch's step hooks, so a global hook sees one step per real step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import required

from .checks import check_number
from .gluon import SKIPPED, LMOStateMixin


def _step_unhooked(opt: torch.optim.Optimizer) -> None:
    """``opt.step()`` without the hook-firing wrapper torch puts around every optimizer
    class's ``step`` (the composite's own step already fired the hooks once)."""
    step = type(opt).step
    if getattr(step, "hooked", False):
        step = step.__wrapped__  # type: ignore[attr-defined]
    step(opt)


class CompositeMixin(LMOStateMixin):
    """Kinds in ``KINDS`` are stepped by an inner optimizer (``_make_inner``) or, for kinds
    in ``OWN_KINDS``, by the composite itself (torch's ``add_param_group`` fills
    ``self.defaults`` into those groups; ``_check_own_group`` then checks them).

    In a group stepped by ``torch.optim.AdamW``, a ``momentum`` key sets beta1: torch's
    momentum schedulers (``CyclicLR``, ``OneCycleLR`` with ``cycle_momentum``) see the
    composite's ``momentum`` default and write ``momentum`` into every group.
    """

    KINDS: tuple[str, ...]
    OWN_KINDS: tuple[str, ...] = ()
    DEFAULT_KIND: str | None = None
    # per kind, the group keys a capturable composite keeps as device tensors
    DEVICE_KEYS: dict[str, tuple[str, ...]] = {}
    _inner: dict[str, torch.optim.Optimizer]
    param_groups: list[dict[str, Any]]
    state: Any
    defaults: dict[str, Any]

    def _make_inner(self, kind: str, group: dict[str, Any]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def _check_new_group(self, group: dict[str, Any], where: str) -> None:
        """Checks on a group as given, before any default is filled in."""

    def _check_own_group(self, group: dict[str, Any], where: str) -> None:
        """Checks on a group of an own kind once torch has normalized it."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of any kind, at construction or later (torch.optim semantics)."""
        where = f"param_groups[{len(self.param_groups)}]"
        if not isinstance(param_group, dict):
            raise TypeError(f"{where} must be a dict, got {type(param_group).__name__}")
        if self.DEFAULT_KIND is not None:
            param_group.setdefault("kind", self.DEFAULT_KIND)
        kind = param_group.get("kind")
        if kind not in self.KINDS:
            raise ValueError(f"{where}['kind'] must be one of {self.KINDS}, got {kind!r}")
        self._check_new_group(param_group, where)
        if kind in self.OWN_KINDS:
            torch.optim.Optimizer.add_param_group(self, param_group)  # type: ignore[arg-type]
            try:
                self._check_own_group(param_group, where)
                self._adopt_device_hyper(param_group, where, self.DEVICE_KEYS.get(kind, ()))
            except (TypeError, ValueError):
                self.param_groups.pop()
                raise
        else:
            inner = self._inner.get(kind)
            if inner is None:
                inner = self._make_inner(kind, param_group)
            else:
                inner.add_param_group(param_group)
            try:
                self._register(param_group)
            except ValueError:
                inner.param_groups.remove(param_group)
                raise
            try:
                self._adopt_device_hyper(param_group, where, self.DEVICE_KEYS.get(kind, ()))
            except (TypeError, ValueError):
                self.param_groups.pop()  # _register appended it last
                inner.param_groups.remove(param_group)
                raise
            self._inner[kind] = inner
            inner.state = self.state
        param_group.setdefault(SKIPPED, 0)

    def _register(self, group: dict[str, Any]) -> None:
        """torch's cross-group checks for a group an inner optimizer has normalized."""
        for other in self.param_groups:
            if ("param_names" in other) != ("param_names" in group):
                raise ValueError("all optimizer param groups should be with/without names")
            if not set(other["params"]).isdisjoint(group["params"]):
                raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """torch's load, refusing a group saved under another kind; a saved group without
        ``kind`` (a plain AdamW or older checkpoint) keeps this one's, and options it lacks
        get the defaults of its kind."""
        kinds = [g["kind"] for g in self.param_groups]
        for gi, (kind, saved) in enumerate(zip(kinds, state_dict["param_groups"])):
            if saved.get("kind", kind) != kind:
                raise ValueError(f"param_groups[{gi}] is of kind {kind!r} here but {saved['kind']!r} in the state dict")
        super().load_state_dict(state_dict)
        for group, kind in zip(self.param_groups, kinds):
            group.setdefault("kind", kind)
        self._share_state()

    def _share_state(self) -> None:
        """Fill each group's missing options and point the inner optimizers at our groups
        and state (``load_state_dict`` replaces both)."""
        for group in self.param_groups:
            if group["kind"] in self.OWN_KINDS:
                for key, value in self.defaults.items():
                    if value is not required:
                        group.setdefault(key, value)
        for kind, inner in self._inner.items():
            groups = [g for g in self.param_groups if g["kind"] == kind]
            for group in groups:
                for key, value in inner.defaults.items():
                    group.setdefault(key, value)
            # the inner class's own upgrade of old state (AdamW: a Python-number step
            # becomes the tensor its kernels need)
            inner.__setstate__({"state": self.state, "param_groups": groups})

    def _step_inner(self, kind: str) -> None:
        inner = self._inner.get(kind)
        if inner is None:
            return
        if isinstance(inner, torch.optim.AdamW):
            for gi, group in enumerate(self.param_groups):
                if group["kind"] == kind and "momentum" in group:
                    check_number(f"param_groups[{gi}]", "momentum", group["momentum"], high=1.0)
                    group["betas"] = (group["momentum"], *group["betas"][1:])
        _step_unhooked(inner)

