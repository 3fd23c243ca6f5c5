"""Compute-time models: how long worker i takes for one gradient, in virtual time.

A model is data: a per-worker base time ``tau_i``, a per-call noise law scaled per
worker, and optional faults (slow outliers, workers that die at a given time; see
:func:`with_faults`). All draws for a batch of workers are vectorized and come from the
caller's ``numpy.random.Generator``, so a simulation is reproducible bit for bit from its
seed. Deaths are events of the simulator (``runtime/simulator.py``), not of the draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PROFILES = ("paper", "constant", "sqrt", "linear", "uniform")
NOISES = ("none", "halfnormal", "exponential", "pareto")


@dataclass
class TimeModel:
    """Per-call compute time ``base[i] + scale[i] * noise``, and when each worker dies.

    Attributes:
        base: (n,) float64, the deterministic part ``tau_i`` (> 0).
        scale: (n,) float64, per-worker multiplier of the noise draw (>= 0).
        noise: one of :data:`NOISES`: ``halfnormal`` is ``|N(0, 1)|``, ``exponential``
            is Exp(1), ``pareto`` is Lomax(``pareto_shape``) (heavy-tailed, mean
            ``1/(shape-1)``).
        death_time: (n,) float64, virtual time worker ``i`` is lost for good (``inf``:
            never; >= 0). A job that would end after it never ends; one ending exactly
            then is delivered. The simulator turns it into a death event.
        pareto_shape: tail index of the ``pareto`` noise (> 1 for a finite mean).
    """

    base: np.ndarray
    scale: np.ndarray
    noise: str = "none"
    death_time: np.ndarray = field(default=None)  # type: ignore[assignment]
    pareto_shape: float = 2.5

    def __post_init__(self) -> None:
        self.base = np.asarray(self.base, dtype=np.float64)
        n = self.base.shape[0]
        if self.base.ndim != 1 or n < 1:
            raise ValueError(f"base must be a non-empty 1-D array, got shape {self.base.shape}")
        if not np.all(np.isfinite(self.base) & (self.base > 0)):
            raise ValueError("base times must be finite and > 0")
        self.scale = np.broadcast_to(np.asarray(self.scale, dtype=np.float64), (n,)).copy()
        if not np.all(np.isfinite(self.scale) & (self.scale >= 0)):
            raise ValueError("scale must be finite and >= 0")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.death_time is None:
            self.death_time = np.full(n, np.inf)
        self.death_time = np.broadcast_to(np.asarray(self.death_time, dtype=np.float64), (n,)).copy()
        if not np.all(self.death_time >= 0):  # NaN fails too
            raise ValueError("death_time must be >= 0 (inf: never)")
        if not (self.pareto_shape > 1):
            raise ValueError(f"pareto_shape must be > 1, got {self.pareto_shape}")

    @property
    def num_workers(self) -> int:
        return self.base.shape[0]

    def _draws(self, rng: np.random.Generator, m: int) -> np.ndarray:
        if self.noise == "halfnormal":
            return np.abs(rng.standard_normal(m))
        if self.noise == "exponential":
            return rng.standard_exponential(m)
        if self.noise == "pareto":
            return rng.pareto(self.pareto_shape, m)
        return np.zeros(m)

    def sampler(self, rng: np.random.Generator, block: int = 8192) -> "Sampler":
        """A :class:`Sampler`: ``sample(workers)`` gives durations of jobs the workers start now.

        ``workers`` is one worker id (returns a float) or an int array (returns an
        array, one draw per worker in the given order). Noise is drawn from ``rng`` in
        blocks of ``block`` and consumed in order, so results depend only on the seed
        and the sequence of calls. Deaths are ignored: the simulator ends a dead
        worker's job at the death event (a job cancelled before it restarts normally).
        """
        return Sampler(self, rng, block)

    def mean_times(self) -> np.ndarray:
        """Expected time per gradient of each worker (ignoring deaths)."""
        mean_noise = {"none": 0.0, "halfnormal": math.sqrt(2 / math.pi), "exponential": 1.0,
                      "pareto": 1.0 / (self.pareto_shape - 1)}[self.noise]
        return self.base + self.scale * mean_noise


def make_time_model(
    profile: str,
    num_workers: int,
    *,
    heterogeneity: float = 1.0,
    noise: str | None = None,
    noise_scale: float | None = None,
    tau: float = 1.0,
    outliers: dict[int, float] | None = None,
    deaths: dict[int, float] | None = None,
    seed: int = 0,
) -> TimeModel:
    """Build a :class:`TimeModel` for ``num_workers`` workers (worker ``i`` is 1-based in formulas).

    Profiles (``S`` = ``heterogeneity``, 0 = homogeneous):

    * ``paper``: ``tau_i = 1 + S * (sqrt(i - 1) + |N(0, i)|)``; ``S = 1`` is the
      Ringmaster LMO quadratic experiment (std ``sqrt(i)``, fresh each call).
    * ``constant``: ``tau_i = tau``; ``sqrt``: ``tau * i**(S/2)`` (``S = 1``: ``tau sqrt(i)``);
      ``linear``: ``tau * i**S`` (``S = 1``: proportional to ``i``); with ``noise``
      ``halfnormal`` by default at ``noise_scale = 0.05`` of ``tau_i`` (the NanoChat runs).
    * ``uniform``: fixed ``tau_i ~ tau * U[1, 1 + S]`` drawn once from ``seed``.

    ``noise`` overrides the noise law (``none``/``halfnormal``/``exponential``/``pareto``);
    ``noise_scale`` is relative to ``tau_i`` for all but ``paper``. ``outliers`` and
    ``deaths``: see :func:`with_faults`.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if profile not in PROFILES:
        raise ValueError(f"time model must be one of {PROFILES}, got {profile!r}")
    if not (isinstance(heterogeneity, (int, float)) and math.isfinite(heterogeneity) and heterogeneity >= 0):
        raise ValueError(f"heterogeneity must be a finite number >= 0, got {heterogeneity!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if noise_scale is not None and not (math.isfinite(noise_scale) and noise_scale >= 0):
        raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
    i = np.arange(1, num_workers + 1, dtype=np.float64)
    S = float(heterogeneity)
    if profile == "paper":
        base = 1.0 + S * np.sqrt(i - 1)
        scale = S * np.sqrt(i) * (1.0 if noise_scale is None else noise_scale)
        law = "halfnormal"
    else:
        if profile == "constant":
            base = np.full(num_workers, float(tau))
        elif profile == "sqrt":
            base = tau * i ** (S / 2)
        elif profile == "linear":
            base = tau * i**S
        else:
            base = tau * (1.0 + S * np.random.default_rng(seed).random(num_workers))
        scale = base * (0.05 if noise_scale is None else noise_scale)
        law = "halfnormal"
    law = noise if noise is not None else law
    return with_faults(TimeModel(base, scale, law), outliers=outliers, deaths=deaths)


def check_faults(num_workers: int, outliers: dict[int, float] | None = None, deaths: dict[int, float] | None = None) -> None:
    """Raise ``ValueError`` naming ``outliers`` or ``deaths`` if a worker id is not an int in
    ``[0, num_workers)``, a factor is not a finite number > 0, or a death time is not a
    number >= 0."""
    for name, faults, valid, wanted in (
        ("outliers", outliers, lambda f: math.isfinite(f) and f > 0, "a finite number > 0"),
        ("deaths", deaths, lambda t: t >= 0, "a number >= 0"),
    ):
        for worker, value in (faults or {}).items():
            if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)) or not 0 <= worker < num_workers:
                raise ValueError(f"{name}: worker must be an int in [0, {num_workers}), got {worker!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
                raise ValueError(f"{name}: value for worker {worker} must be {wanted}, got {value!r}")


def with_faults(model: TimeModel, *, outliers: dict[int, float] | None = None,
                deaths: dict[int, float] | None = None) -> TimeModel:
    """``model`` with faults added (``model`` itself when there are none).

    Args:
        model: the healthy time model.
        outliers: ``{worker: factor}`` (0-based ids): the worker's base time and noise
            scale are multiplied by ``factor`` (> 0; e.g. 10 for a 10x slower straggler).
        deaths: ``{worker: t}``: the worker is lost for good at virtual time ``t``
            (>= 0; an earlier death in ``model`` is kept).

    Raises:
        ValueError: naming ``outliers`` or ``deaths`` (see :func:`check_faults`).
    """
    check_faults(model.num_workers, outliers, deaths)
    if not outliers and not deaths:
        return model
    base, scale, death = model.base.copy(), model.scale.copy(), model.death_time.copy()
    for worker, factor in (outliers or {}).items():
        base[worker] *= factor
        scale[worker] *= factor
    for worker, t in (deaths or {}).items():
        death[worker] = min(death[worker], t)
    return TimeModel(base, scale, model.noise, death, model.pareto_shape)


class Sampler:
    """Draws of a :class:`TimeModel` in blocks, with a resumable position (see ``TimeModel.sampler``)."""

    def __init__(self, model: TimeModel, rng: np.random.Generator, block: int) -> None:
        self.model, self.rng, self.block = model, rng, block
        self.base, self.scale = model.base, model.scale
        self._refill()

    def _refill(self) -> None:
        # the generator's state before each block is all a checkpoint needs to redraw it
        self.block_state = self.rng.bit_generator.state
        self.buffer, self.pos = self.model._draws(self.rng, self.block), 0

    def _take(self, m: int) -> np.ndarray:
        parts = []
        while m > 0:
            if self.pos == self.block:
                self._refill()
            k = min(m, self.block - self.pos)
            parts.append(self.buffer[self.pos:self.pos + k])
            self.pos += k
            m -= k
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [self.buffer[:0]])  # m = 0: no one to start

    def __call__(self, workers):
        if isinstance(workers, (int, np.integer)):  # one restart per event: the hot path
            if self.pos == self.block:
                self._refill()
            duration = self.base[workers] + self.scale[workers] * self.buffer[self.pos]
            self.pos += 1
            return float(duration)
        return self.base[workers] + self.scale[workers] * self._take(workers.shape[0])

    def state_dict(self) -> dict:
        return {"block_state": self.block_state, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["block_state"]
        self._refill()
        self.pos = int(state["pos"])
