"""Tuned step sizes together with the scale they were tuned at, and the guard that uses them.

Values tuned at one scale do not transfer to another: at 64 workers x 64 dimensions the
paper-scale values reach no target and make synchronous LMO diverge. So a set of tuned
values carries its scale (every field of the experiment that changes the runs: n, d,
horizon, noise, time model, heterogeneity, faults, target, norm, radius, momentum,
Nesterov, data), and :meth:`TunedValues.for_experiment` hands them out only at that exact
scale; anywhere else it raises a ValueError naming both scales, so the caller tunes
(``--tune``) or passes the values explicitly. Never a silent reuse.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def scale_of(experiment: Any) -> dict[str, Any]:
    """Every field of a (frozen dataclass) experiment, as a plain dict: its scale."""
    return {f.name: getattr(experiment, f.name) for f in fields(experiment)}


def _text(scale: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in scale.items())


@dataclass(frozen=True)
class TunedValues:
    """Per-method tuned parameters, the scale they were tuned at, and how.

    Attributes:
        scale: :func:`scale_of` the experiment they were tuned on.
        params: method -> parameters (e.g. ``{"lr": 1.0, "threshold": 2}``).
        tune_seed: the seed tuned on (reports use other seeds).
        command: what produced them, for the refusal message and the docs.
    """

    scale: dict[str, Any]
    params: dict[str, dict[str, float]]
    tune_seed: int
    command: str

    def mismatch(self, experiment: Any) -> dict[str, tuple[Any, Any]]:
        """Fields where ``experiment`` differs: name -> (tuned at, asked for)."""
        asked = scale_of(experiment)
        keys = set(asked) | set(self.scale)
        return {k: (self.scale.get(k), asked.get(k)) for k in sorted(keys) if self.scale.get(k) != asked.get(k)}

    def for_experiment(self, experiment: Any, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
        """The tuned parameters of ``methods`` at ``experiment``'s scale.

        Raises:
            ValueError: the scale differs (the message names every differing field, both
                values, and the full scale the values came from), or a method has no
                tuned values.
        """
        diff = self.mismatch(experiment)
        if diff:
            changes = "; ".join(f"{k}: tuned at {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the stored tuned values are for another scale ({changes}); they were tuned at "
                f"[{_text(self.scale)}] on seed {self.tune_seed} by `{self.command}`. Tune at this scale "
                f"(--tune) or give every method's values (--method with --lr/--threshold/--batch)")
        missing = [m for m in methods if m not in self.params]
        if missing:
            raise ValueError(f"no tuned values for {missing} at this scale (tuned: {sorted(self.params)}); "
                             f"tune them (--tune) or give their values (--lr/--threshold/--batch)")
        return {m: dict(self.params[m]) for m in methods}
