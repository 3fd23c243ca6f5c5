"""Heterogeneous data: worker i has its own objective f_i, the goal is f = (1/n) sum_i f_i.

:class:`HeterogeneousQuadratic` is the paper's tridiagonal quadratic with a per-worker
linear term, ``f_i(x) = 1/2 x^T A x - b_i^T x`` with ``b_i = b + zeta s_i v`` (``s_i``
standardised ``i - (n-1)/2``, so it sums to zero and fast and slow workers pull opposite
ways; ``v`` = the unit all-ones direction). :func:`split_batches` gives each worker of an
``nn.Module`` objective its own shard (:class:`HeterogeneousModuleObjective`).

Methods that weight workers by arrival frequency (ASGD, Ringmaster) converge to the
stationary point of ``f_w = sum_i w_i f_i``, ``w_i ~ 1/tau_i`` (:meth:`bias_point`), where
``||grad f||`` is ``zeta |sum_i w_i s_i| ||v||`` > 0; :func:`compare` runs methods and
reports the global ``||grad f||`` against that bias level.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .objectives import ModuleObjective, TridiagonalQuadratic


class HeterogeneousQuadratic(TridiagonalQuadratic):
    """``f_i(x) = 1/2 x^T A x - b_i^T x``; worker ``i``'s gradient is ``grad f_i + noise z 1``.

    Args:
        dim: d (>= 2).
        num_workers: n (>= 1).
        zeta: size of the per-worker shift of ``b`` (>= 0; 0 is the homogeneous quadratic).
        noise: gradient noise std, as in :class:`TridiagonalQuadratic`.

    The metric is ``||grad f(x)||^2`` of the global ``f`` (``b`` = the mean of the ``b_i``).
    """

    def __init__(self, dim: int, num_workers: int, zeta: float = 1.0, noise: float = 0.01) -> None:
        super().__init__(dim, noise)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not (isinstance(zeta, (int, float)) and math.isfinite(zeta) and zeta >= 0):
            raise ValueError(f"zeta must be a finite number >= 0, got {zeta!r}")
        self.num_workers, self.zeta = num_workers, float(zeta)
        centred = np.arange(num_workers) - (num_workers - 1) / 2.0  # exact in binary, sums to 0
        spread = float(np.sqrt(np.mean(centred**2))) or 1.0
        self.s = centred / spread
        self.v = np.full(dim, 1.0 / math.sqrt(dim))

    def worker_gradient(self, x: np.ndarray, worker: int) -> np.ndarray:
        """``grad f_i(x) = A x - b - zeta s_i v`` (noise-free)."""
        return self.full_gradient(x) - self.zeta * self.s[worker] * self.v

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}), got {worker}")
        g = self.worker_gradient(params[0].numpy().reshape(-1), worker)
        if self.noise:
            g += self.noise * rng.standard_normal()
        return [torch.from_numpy(g.reshape(self.shape))]

    def _solve(self, rhs: np.ndarray) -> np.ndarray:
        """``A^{-1} rhs`` (dense solve; d is small in these experiments)."""
        d = self.dim
        A = self.scale * (2 * np.eye(d) - np.eye(d, k=1) - np.eye(d, k=-1))
        return np.linalg.solve(A, rhs)

    def bias_point(self, weights: Sequence[float]) -> np.ndarray:
        """The stationary point of ``sum_i w_i f_i / sum_i w_i``."""
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.num_workers,) or not np.all(np.isfinite(w) & (w >= 0)) or w.sum() <= 0:
            raise ValueError(f"weights must be {self.num_workers} finite numbers >= 0, not all 0")
        shift = self.zeta * float(w @ self.s / w.sum()) * self.v
        b = -self.scale * np.eye(self.dim)[0]
        return self._solve(b + shift)

    def grad_norm_sq_at(self, x: np.ndarray) -> float:
        g = self.full_gradient(np.asarray(x, dtype=np.float64))
        return float(g @ g)


class HeterogeneousModuleObjective(ModuleObjective):
    """A ``torch.nn.Module`` whose worker ``i`` trains on its own batches ``worker_batches[i]``;
    the metric is the loss on ``eval_batch`` (choose it over all shards: the global ``f``)."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 worker_batches: Sequence[Iterator[tuple[torch.Tensor, torch.Tensor]]],
                 eval_batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        if len(worker_batches) < 1:
            raise ValueError("worker_batches: need one batch iterator per worker")
        super().__init__(module, loss_fn, iter(()), eval_batch)
        self.worker_batches = [iter(b) for b in worker_batches]

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        if not 0 <= worker < len(self.worker_batches):
            raise ValueError(f"worker must be in [0, {len(self.worker_batches)}), got {worker}")
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = self._loss(leaves, next(self.worker_batches[worker]))
        return list(torch.autograd.grad(loss, leaves))


def split_batches(X: torch.Tensor, Y: torch.Tensor, num_workers: int, batch: int, *, by: torch.Tensor | None = None,
                  seed: int = 0) -> list[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Split ``(X, Y)`` into ``num_workers`` equal shards and give each an endless stream
    of ``batch`` rows drawn from its shard only. ``by`` (one key per row, e.g. the labels)
    sorts the rows first, so shards are skewed (worker 0 gets the smallest keys); without
    it the shards are contiguous blocks. Rows beyond ``num_workers * (len // num_workers)``
    are dropped so every shard has the same size (then the mean of the shard losses is the
    loss over the kept rows)."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not 1 <= num_workers <= X.shape[0]:
        raise ValueError(f"num_workers must be an int in [1, {X.shape[0]}], got {num_workers!r}")
    size = X.shape[0] // num_workers
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= size:
        raise ValueError(f"batch must be an int in [1, {size}] (the shard size), got {batch!r}")
    order = torch.argsort(by, stable=True) if by is not None else torch.arange(X.shape[0])
    shards = [order[i * size:(i + 1) * size] for i in range(num_workers)]

    def stream(rows: torch.Tensor, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed * 100003 + worker)
        while True:
            pick = rows[torch.randperm(rows.shape[0], generator=gen)[:batch]]
            yield X[pick], Y[pick]

    return [stream(rows, i) for i, rows in enumerate(shards)]


def frequency_weights(mean_times: Sequence[float]) -> np.ndarray:
    """Arrival frequencies ``1/tau_i``: the weights plain ASGD gives the workers."""
    return 1.0 / np.asarray(mean_times, dtype=np.float64)


def compare(methods: dict[str, dict[str, Any]], *, workers: int, dim: int, zeta: float, noise: float,
            horizon: float, time_model: str, seeds: Sequence[int],
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run each method (name -> make_policy keywords; ``known_times=True`` gives
    ``rescaled_asgd`` the time model's mean times) on :class:`HeterogeneousQuadratic` for
    every seed. Returns ``bias_grad_norm``, ``||grad f||`` at the bias point of plain
    frequency weighting (``w_i = 1/E tau_i``, where ASGD goes; 0 at the optimum), and per
    method the per-seed final and last-quarter-median ``||grad f||`` of the global ``f``,
    ``accepted_bias_grad_norm`` (the bias level of that run's accepted-gradient counts per
    worker: where a method applying each accepted gradient with one step would go, e.g.
    Ringmaster, whose stops favour fast workers further), their aggregates and the curves."""
    from ..optim.policies import make_policy
    from .metrics import aggregate, tail_median
    from .simulator import simulate
    from .time_models import make_time_model

    objective = HeterogeneousQuadratic(dim, workers, zeta=zeta, noise=noise)
    tm = make_time_model(time_model, workers)
    bias = objective.bias_point(frequency_weights(tm.mean_times()))
    out: dict[str, Any] = {"bias_grad_norm": math.sqrt(objective.grad_norm_sq_at(bias)), "methods": {}}
    for name, options in methods.items():
        records, curves = [], []
        kwargs = {k: v for k, v in options.items() if k != "known_times"}
        if options.get("known_times"):
            kwargs["worker_times"] = tm.mean_times()
        for seed in seeds:
            if progress is not None:
                progress(f"{name} seed {seed}")
            policy = make_policy(name, objective.initial_params(), num_workers=workers, **kwargs)
            trace = simulate(policy, objective, make_time_model(time_model, workers), horizon=horizon, seed=seed)
            t, v = trace.curve()
            g = np.sqrt(v)
            # where a method that applied its accepted gradients with one step size would end
            counts = np.bincount(trace.worker[trace.accepted], minlength=workers).astype(np.float64)
            own = math.sqrt(objective.grad_norm_sq_at(objective.bias_point(counts)))
            # the median over the quarter before the last: a run that has settled has the same there
            early = t <= 0.75 * horizon
            records.append({"final": float(g[-1]), "tail_median": tail_median(t, g, horizon),
                            "previous_quarter_median": tail_median(t[early], g[early], 0.75 * horizon),
                            "accepted": trace.num_accepted, "accepted_bias_grad_norm": own})
            curves.append((t, g))
        out["methods"][name] = {"options": dict(options),
                                "seeds": records,
                                "aggregate": aggregate(records, ("final", "tail_median", "previous_quarter_median",
                                                                   "accepted_bias_grad_norm")),
                                "curves": curves}
    return out
