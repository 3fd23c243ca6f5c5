"""Newton–Schulz coefficient schedules, shared by the Triton kernels and the torch twin."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Union

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Schedule:
    """One (a, b, c) triple per iteration, plus the Frobenius-norm safety factor.

    Iteration t maps X to ``a_t X + (b_t A + c_t A A) X`` with ``A = X X^T``; the input
    is first scaled by ``1 / (safety * ||G||_F + eps)`` so every singular value starts
    in (0, 1].
    """

    triples: tuple[Triple, ...]
    safety: float = 1.0


# Keller Jordan's quintic: one triple, repeated; it pushes singular values into
# roughly [0.7, 1.2] rather than onto 1, which Muon tolerates.
QUINTIC: Triple = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al., arXiv 2505.16932), as used by modded-nanogpt/NanoChat:
# a distinct minimax-optimal triple per step; normalizing by 1.02 ||G||_F keeps the
# top singular value safely inside the interval the schedule was optimized for.
POLAR_EXPRESS: tuple[Triple, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02

Coefficients = Union[str, Sequence[Sequence[float]]]
NAMED = ("quintic", "polar_express")
# Newton–Schulz converges in about 5-10 steps; far beyond this a `steps` is a typo,
# and an unbounded one would build a schedule of that many triples before any math.
MAX_STEPS = 1000


def _finite_real(value: object) -> float | None:
    """``float(value)`` for a finite real number (numpy and 0-d tensor scalars too),
    else None. Strings and bools are not numbers here, though float() takes them."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _rows(coefficients: object) -> list[list[object]] | None:
    """The triples as lists, or None when ``coefficients`` is not a sequence of sequences.
    A str inside (["123"]) would otherwise read as three digits, a dict as its keys."""
    if isinstance(coefficients, (str, bytes, Mapping, Set)):
        return None
    try:
        rows = list(coefficients)  # type: ignore[call-overload]
    except TypeError:
        return None
    if any(isinstance(t, (str, bytes, Mapping, Set)) for t in rows):
        return None
    try:
        return [list(t) for t in rows]
    except TypeError:
        return None


def schedule(
    coefficients: Coefficients, steps: int, *, steps_name: str = "steps", coefficients_name: str = "coefficients"
) -> Schedule:
    """Resolve ``coefficients`` (a name or explicit triples) into ``steps`` triples.

    Named schedules repeat their last triple past their length. An explicit list must
    hold exactly ``steps`` triples of finite real numbers. ``steps`` is an int in
    ``[0, MAX_STEPS]``. Errors name the arguments as ``steps_name`` and
    ``coefficients_name`` (a caller's own option names, e.g. Gluon's ``ns_steps``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{steps_name} must be an int, got {type(steps).__name__}")
    if not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"{steps_name} must be in [0, {MAX_STEPS}], got {steps}")
    if isinstance(coefficients, str):
        if coefficients == "quintic":
            base, safety = (QUINTIC,), 1.0
        elif coefficients == "polar_express":
            base, safety = POLAR_EXPRESS, POLAR_EXPRESS_SAFETY
        else:
            raise ValueError(
                f"{coefficients_name} must be one of {NAMED} or a list of (a, b, c), got {coefficients!r}"
            )
        triples = tuple(base[min(t, len(base) - 1)] for t in range(steps))
        return Schedule(triples, safety)
    rows = _rows(coefficients)
    if rows is None:
        raise TypeError(
            f"{coefficients_name} must be one of {NAMED} or a list of (a, b, c) number triples, "
            f"got {coefficients!r}"
        )
    triples = []
    for i, row in enumerate(rows):
        values = [_finite_real(v) for v in row]
        if len(values) != 3 or None in values:
            raise ValueError(f"{coefficients_name}[{i}] must be 3 finite real numbers (a, b, c), got {row!r}")
        triples.append(tuple(values))
    if len(triples) != steps:
        raise ValueError(
            f"{steps_name}={steps} but {len(triples)} {coefficients_name} triples were given; "
            "pass one triple per step"
        )
    return Schedule(tuple(triples), 1.0)  # type: ignore[arg-type]
