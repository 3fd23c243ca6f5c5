"""Where each parameter lives in one flat fp32 buffer: the unit the runtime moves.

The server's master parameters, every worker's replica and every gradient slot are one
flat buffer each, laid out the same way in every process (local and remote workers
derive the layout from the same task), so a whole model moves with one copy.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
import torch.nn as nn

from ..optim.update_rules import OptimizerRule, UpdateRule


class _Groups(Protocol):
    def group_of(self, name: str) -> dict: ...


class FlatLayout:
    """Where each named parameter lives in one flat fp32 buffer, in the policy's order."""

    def __init__(self, named_shapes: Sequence[tuple[str, torch.Size]]):
        self.names = [n for n, _ in named_shapes]
        self.shapes = [torch.Size(s) for _, s in named_shapes]
        self.sizes = [s.numel() for s in self.shapes]
        self.numel = sum(self.sizes)
        self.index = {name: i for i, name in enumerate(self.names)}

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [chunk.view(shape) for chunk, shape in zip(flat.split(self.sizes), self.shapes)]

    def bind(self, module: nn.Module, flat_param: torch.Tensor, flat_grad: torch.Tensor | None = None) -> None:
        """Make ``module``'s parameters (and, given ``flat_grad``, their ``.grad``) views
        into the flat buffers, so a whole model moves with one copy and backward
        accumulates in place. The module's values are copied in first."""
        params = dict(module.named_parameters())
        grads = self.views(flat_grad) if flat_grad is not None else [None] * len(self.names)
        for name, p, g in zip(self.names, self.views(flat_param), grads):
            p.copy_(params[name].detach())
            params[name].data = p
            params[name].grad = g

    def as_list(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape)]``: what a checkpoint records to recognise its model."""
        return [(name, tuple(shape)) for name, shape in zip(self.names, self.shapes)]


def param_layout(task: _Groups, model: nn.Module) -> tuple[FlatLayout, list[tuple[dict, list[str]]]]:
    """Group ``model``'s parameters by ``task.group_of`` (first appearance order) and lay
    them out group after group (one group, in model order, for a task without
    ``group_of``: its update rule brings its own groups). Every process that exchanges flat buffers (server, local
    and remote workers) derives the same layout.
    Returns the layout and ``[(group options, parameter names)]``."""
    groups: dict[tuple, tuple[dict, list[str]]] = {}
    group_of = getattr(task, "group_of", None)
    for name, _ in model.named_parameters():
        options = dict(group_of(name)) if group_of is not None else {}
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        groups.setdefault(key, (options, []))[1].append(name)
    shapes = dict((name, p.shape) for name, p in model.named_parameters())
    ordered = [name for _, names in groups.values() for name in names]
    return FlatLayout([(name, shapes[name]) for name in ordered]), list(groups.values())


def master_update_rule(task: Any, model: nn.Module, layout: FlatLayout, master: torch.Tensor,
                       groups: list[tuple[dict, list[str]]]) -> tuple[Any, list[int]]:
    """What updates the flat ``master`` (on ``model``'s device) when a gradient is accepted.

    A task with ``update_rule(model)`` gets ``model`` with its parameters made views of
    ``master``, and its rule (a ``torch.optim.Optimizer`` becomes an :class:`OptimizerRule`);
    otherwise the built-in rule's param groups are views of ``master`` per ``groups``
    (``model``'s values copied in). Returns that rule (or those groups) and, for each
    tensor the rule updates, its index in ``layout``. ValueError/TypeError when the rule
    is not one, updates a tensor that is not the model's, or leaves a parameter out."""
    factory = getattr(task, "update_rule", None)
    if factory is None:
        views = dict(zip(layout.names, layout.views(master)))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in layout.names:
                views[name].copy_(params[name].detach())
        param_groups = [{"params": [views[name] for name in names], **options} for options, names in groups]
        return param_groups, list(range(len(layout.names)))
    with torch.no_grad():
        layout.bind(model, master)
    rule = factory(model)
    if isinstance(rule, torch.optim.Optimizer):
        rule = OptimizerRule(rule)
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"task.update_rule must return a torch.optim.Optimizer or an UpdateRule, got {type(rule).__name__}")
    name_of = {id(p): name for name, p in model.named_parameters()}
    unknown = [i for i, p in enumerate(rule.params) if id(p) not in name_of]
    if unknown:
        raise ValueError(f"task.update_rule: tensor {unknown[0]} of the rule is not a parameter of the model it was given")
    missing = sorted(set(layout.names) - {name_of[id(p)] for p in rule.params})
    if missing:
        raise ValueError(f"task.update_rule leaves parameters without an update: {missing[:5]}")
    return rule, [layout.index[name_of[id(p)]] for p in rule.params]
