"""Newton–Schulz coefficient schedules, shared by the Triton kernels and the torch twin."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

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


def schedule(coefficients: Coefficients, steps: int) -> Schedule:
    """Resolve ``coefficients`` (a name or explicit triples) into ``steps`` triples.

    Named schedules repeat their last triple past their length. An explicit list must
    hold exactly ``steps`` triples.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if isinstance(coefficients, str):
        if coefficients == "quintic":
            base, safety = (QUINTIC,), 1.0
        elif coefficients == "polar_express":
            base, safety = POLAR_EXPRESS, POLAR_EXPRESS_SAFETY
        else:
            raise ValueError(f"coefficients must be one of {NAMED} or a list of (a, b, c), got {coefficients!r}")
        triples = tuple(base[min(t, len(base) - 1)] for t in range(steps))
        return Schedule(triples, safety)
    try:
        triples = tuple(tuple(float(v) for v in triple) for triple in coefficients)
    except TypeError as exc:
        raise TypeError("coefficients must be a name or a sequence of (a, b, c) triples") from exc
    if any(len(t) != 3 for t in triples):
        raise ValueError("coefficients: every triple must have exactly 3 numbers (a, b, c)")
    if len(triples) != steps:
        raise ValueError(f"steps={steps} but {len(triples)} coefficient triples were given; pass one triple per step")
    return Schedule(triples, 1.0)  # type: ignore[arg-type]
