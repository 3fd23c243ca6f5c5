"""Hyperparameters kept as device tensors, so an optimizer step can be captured in a CUDA graph.

A captured graph replays the kernels it recorded with the arguments they had: a Python
float is baked in, a tensor is read where it lives. A capturable optimizer therefore gives
each group one 0-dim fp32 tensor per key in :data:`HYPER_KEYS` on the group's device,
puts it in the group (so ``group["lr"]`` *is* that tensor) and hands the kernels those
tensors; nothing in the step reads a device value on the host.

The convention is torch.optim's for a tensor ``lr``: LR schedulers see a tensor and
``fill_`` it in place (torch's ``_update_param_group_val``), which a replayed graph then
reads. A number written into the group instead (a training loop's
``group["lr"] = ...``, the momentum schedulers, which assign floats) is copied into the
group's tensor at the start of the next eager step: a small fill per key, fine eagerly but
baked into a graph if that step is the one captured; so with graphs, update the tensors
in place. The tensors stay the same objects for the optimizer's life (a checkpoint load
copies into them), so a captured graph keeps reading the live values.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

HYPER_KEYS = ("lr", "momentum", "weight_decay")


class DeviceHyper:
    """The device tensors of every group, by group index (groups are only ever appended)."""

    def __init__(self) -> None:
        self.tensors: list[dict[str, torch.Tensor]] = []

    def adopt(self, group: dict[str, Any], device: torch.device, where: str, keys: Iterable[str] = HYPER_KEYS) -> None:
        """Give a new group a tensor per key and put them in the group. A 0-dim fp32 tensor
        already on ``device`` is kept as it is (a caller's own tensor stays live) unless
        another group has it (a tensor default is shared by every group torch fills it
        into; per-group schedules need one tensor each)."""
        taken = {id(t) for tensors in self.tensors for t in tensors.values()}
        own = {}
        for key in keys:
            value = group[key]
            if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.float32 \
                    and value.device == device and id(value) not in taken:
                own[key] = value
            else:
                own[key] = torch.tensor(_number(value, where, key), dtype=torch.float32, device=device)
            group[key] = own[key]
        self.tensors.append(own)

    def sync(self, gi: int, group: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
        """The group's tensors, after copying in any value written over them since the last
        step (a number: range-checked on the host; another tensor: copied on the device, its
        value unchecked), which are then put back in the group.

        Another key holding one of the tensors itself (NanoChat's ``setup_optimizer`` does
        ``group["initial_lr"] = group["lr"]``) first gets a copy of it, or the copies in
        would move it too (torch's LR schedulers clone ``initial_lr`` for the same reason)."""
        own = self.tensors[gi]
        for key, value in list(group.items()):
            if key not in own and isinstance(value, torch.Tensor) and any(value is t for t in own.values()):
                group[key] = value.clone()
        for key, tensor in own.items():
            value = group[key]
            if value is tensor:
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or not value.is_floating_point():
                    raise ValueError(f"{where}: {key} must be a number or a 1-element float tensor, "
                                     f"got shape {tuple(value.shape)} {value.dtype}")
                tensor.copy_(value.reshape(()))
            else:
                tensor.fill_(_number(value, where, key))
            group[key] = tensor
        return own

    def reattach(self, groups: list[dict[str, Any]]) -> None:
        """After ``load_state_dict`` (which puts the saved values in new group dicts): copy
        them into the groups' own tensors and put those back, so a graph captured before
        the load reads the loaded values."""
        for gi, group in enumerate(groups):
            self.sync(gi, group, f"param_groups[{gi}]")

    def snapshot(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict()``'s groups with copies of the tensors (the live ones keep changing)."""
        for group, own in zip(state_dict["param_groups"], self.tensors):
            for key in own:
                if isinstance(group.get(key), torch.Tensor):
                    group[key] = group[key].clone()
        return state_dict


def _number(value: object, where: str, key: str) -> float:
    """A finite number >= 0 (momentum: < 1); a 1-element tensor given at construction is read once."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()  # construction only: a step copies tensors on the device
    high = 1.0 if key == "momentum" else math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 <= value < high):
        bound = "a finite number >= 0" if high == math.inf else f"in [0, {high:g})"
        raise ValueError(f"{where}: {key} must be {bound}, got {value!r}")
    return float(value)
