"""Model objectives the simulator drives: what a worker computes, and what is logged.

An objective gives the initial parameters (a list of tensors, the policy's ``params``),
a stochastic gradient at any parameter snapshot, and a scalar metric of the current
parameters. All randomness comes from the ``numpy.random.Generator`` the simulator
passes, so runs are reproducible from one seed.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import numpy as np
import torch


class Objective:
    """Interface. ``metric_name`` says what :meth:`metric` returns (for logs and plots)."""

    metric_name = "metric"

    def initial_params(self) -> list[torch.Tensor]:
        """Fresh tensors holding the starting point (the policy updates them in place)."""
        raise NotImplementedError

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        """A stochastic gradient at ``params`` (one tensor per parameter), computed by
        ``worker`` (objectives with per-worker data read that worker's stream)."""
        raise NotImplementedError

    def metric(self, params: Sequence[torch.Tensor]) -> float:
        """The logged quantity at ``params`` (``||grad f||^2`` or a loss)."""
        raise NotImplementedError


class TridiagonalQuadratic(Objective):
    """The Ringmaster LMO paper's quadratic ``f(x) = 1/2 x^T A x - b^T x``.

    ``A = scale * tridiag(-1, 2, -1)`` (d x d), ``b = -scale * e_1``, ``x0 = sqrt(d) e_1``,
    ``scale = 1/4``; the stochastic gradient is ``A x - b + noise * z * 1`` with one scalar
    ``z ~ N(0, 1)`` per call. Held as one float64 tensor, (d,) or, with ``row=True``, a
    (1, d) matrix (so matrix norms such as "spectral" apply, as in the authors' "Muon"
    on a vector); the matvec is three slices. Metric: ``||grad f(x)||^2``.
    """

    metric_name = "grad_norm_sq"

    def __init__(self, dim: int, noise: float = 0.01, scale: float = 0.25, row: bool = False) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an int >= 2, got {dim!r}")
        if not (math.isfinite(noise) and noise >= 0):
            raise ValueError(f"noise must be a finite number >= 0, got {noise}")
        self.dim, self.noise, self.scale = dim, float(noise), float(scale)
        self.shape = (1, dim) if row else (dim,)

    def initial_params(self) -> list[torch.Tensor]:
        x0 = torch.zeros(self.dim, dtype=torch.float64)
        x0[0] = math.sqrt(self.dim)
        return [x0.reshape(self.shape)]

    def full_gradient(self, x: np.ndarray) -> np.ndarray:
        """``A x - b`` for a float64 vector ``x`` (d,)."""
        g = 2.0 * x
        g[1:] -= x[:-1]
        g[:-1] -= x[1:]
        g *= self.scale
        g[0] += self.scale
        return g

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        g = self.full_gradient(params[0].numpy().reshape(-1))
        if self.noise:
            g += self.noise * rng.standard_normal()
        return [torch.from_numpy(g.reshape(self.shape))]

    def metric(self, params: Sequence[torch.Tensor]) -> float:
        g = self.full_gradient(params[0].numpy().reshape(-1))
        return float(g @ g)


class LeastSquares(Objective):
    """``f(x) = 1/(2m) ||M x - y||^2`` with minibatch gradients of ``batch`` distinct rows.

    ``M`` (m x d) and ``y`` (m,) are float64 tensors; the starting point is zero.
    Metric: ``||grad f(x)||^2`` over all rows.
    """

    metric_name = "grad_norm_sq"

    def __init__(self, M: torch.Tensor, y: torch.Tensor, batch: int = 1) -> None:
        if M.dim() != 2 or y.shape != (M.shape[0],):
            raise ValueError(f"M must be (m, d) and y (m,), got {tuple(M.shape)} and {tuple(y.shape)}")
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= M.shape[0]:
            raise ValueError(f"batch must be an int in [1, {M.shape[0]}], got {batch!r}")
        self.M, self.y, self.batch = M.double(), y.double(), batch

    @classmethod
    def random(cls, rows: int, dim: int, seed: int = 0, batch: int = 1) -> "LeastSquares":
        """A well-posed random instance (Gaussian ``M``, ``y = M x* + 0.1 noise``)."""
        gen = torch.Generator().manual_seed(seed)
        M = torch.randn(rows, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
        y = M @ torch.randn(dim, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(rows, generator=gen, dtype=torch.float64)
        return cls(M, y, batch)

    def initial_params(self) -> list[torch.Tensor]:
        return [torch.zeros(self.M.shape[1], dtype=torch.float64)]

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        rows = torch.from_numpy(rng.choice(self.M.shape[0], self.batch, replace=False))
        Mb = self.M[rows]
        return [Mb.T @ (Mb @ params[0] - self.y[rows]) / self.batch]

    def metric(self, params: Sequence[torch.Tensor]) -> float:
        g = self.M.T @ (self.M @ params[0] - self.y) / self.M.shape[0]
        return float(g @ g)


class ModuleObjective(Objective):
    """A ``torch.nn.Module`` trained on batches from a data iterator.

    ``batches`` yields ``(inputs, targets)``; each gradient takes the next batch (so the
    order of computed gradients, which the simulator fixes, fixes the data). Parameters
    are evaluated functionally (``torch.func.functional_call``), so snapshots of any
    version can be differentiated without touching the module. Metric: the loss on
    ``eval_batch`` at the current parameters.
    """

    metric_name = "loss"

    def __init__(
        self,
        module: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        eval_batch: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self.module, self.loss_fn, self.batches, self.eval_batch = module, loss_fn, iter(batches), eval_batch
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]

    def initial_params(self) -> list[torch.Tensor]:
        params = dict(self.module.named_parameters())
        return [params[name].detach().clone() for name in self.names]

    def _loss(self, params: Sequence[torch.Tensor], batch) -> torch.Tensor:
        inputs, targets = batch
        out = torch.func.functional_call(self.module, dict(zip(self.names, params)), (inputs,))
        return self.loss_fn(out, targets)

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        leaves = [p.detach().requires_grad_(True) for p in params]
        loss = self._loss(leaves, next(self.batches))
        return list(torch.autograd.grad(loss, leaves))

    def metric(self, params: Sequence[torch.Tensor]) -> float:
        with torch.no_grad():
            return float(self._loss(params, self.eval_batch))
