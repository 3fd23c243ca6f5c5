"""Model objectives the simulator drives: what a worker computes, and what is logged.

An objective gives the initial parameters (a list of tensors, the policy's ``params``),
a stochastic gradient at any parameter snapshot, and a scalar metric of the current
parameters. All randomness comes from the ``numpy.random.Generator`` the simulator
passes, so runs are reproducible from one seed.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch


class _SharedMathAttention:
    """SDPA's backend switches are process-wide, not per thread, so the worker threads of
    one run share one switch: the first thread in enters torch's ``sdpa_kernel(MATH)``,
    the last one out leaves it (each thread entering its own would restore the fused
    kernels as soon as any thread left, under another thread's HVP)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._context: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with self._lock:
            if self._users == 0:
                self._context = sdpa_kernel(SDPBackend.MATH)
                self._context.__enter__()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    context, self._context = self._context, None
                    context.__exit__(None, None, None)


_math_attention = _SharedMathAttention()


def twice_differentiable() -> contextlib.AbstractContextManager:
    """A context where attention runs as plain differentiable ops (SDPA's math backend):
    the fused CPU/GPU attention kernels have no double backward, which an HVP needs.
    Safe to enter from several threads at once (see :class:`_SharedMathAttention`)."""
    return _math_attention()


# autograd nodes that raise when differentiated: a once_differentiable function's backward
# (torch::autograd::Error, whose double backward torch skips silently when nothing on its
# path needs a gradient) and an op without a double-backward formula
_NOT_TWICE_DIFFERENTIABLE = ("torch::autograd::Error", "torch::autograd::NotImplemented")


def _first_not_twice_differentiable(grads: Sequence[torch.Tensor | None]) -> str | None:
    """The name of a node of the gradients' graph that has no backward, or None."""
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name() in _NOT_TWICE_DIFFERENTIABLE:
            return node.name()
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return None


def gradient_and_hvp(loss: torch.Tensor, leaves: Sequence[torch.Tensor], d: Sequence[torch.Tensor]
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(g, H d)`` of the scalar ``loss`` w.r.t. ``leaves`` (tensors that require grad) by
    double backward: one gradient with its graph, then its product with ``d``; both
    detached. Leaves the loss does not use get zeros.

    A loss without a double backward (an op without one, a ``once_differentiable``
    function: torch would silently return a zero product for it) raises a ValueError
    saying so; its graph is walked once per call (well under 1 % of the HVP's time on
    ``ringmaster train``'s GPT)."""
    with torch.enable_grad():
        try:
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            blocked = _first_not_twice_differentiable(grads)
            if blocked is not None:
                raise ValueError(f"the loss has no double backward: its gradient's graph holds {blocked} "
                                 "(an op without a double-backward formula, or a function marked once_differentiable)")
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            hv = (torch.autograd.grad([grads[i] for i in live], leaves, [d[i] for i in live], allow_unused=True)
                  if live else [None] * len(leaves))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"the loss has no double backward: {first}") from exc
    return ([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(leaves, grads)],
            [torch.zeros_like(p) if v is None else v.detach() for p, v in zip(leaves, hv)])


def hessian_vector_product(loss: torch.Tensor, leaves: Sequence[torch.Tensor], d: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H d`` of the scalar ``loss`` w.r.t. ``leaves`` (see :func:`gradient_and_hvp`)."""
    return gradient_and_hvp(loss, leaves, d)[1]


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

    # What MVR and HCM jobs need (optim/estimators.py): two evaluations on ONE minibatch.
    # An objective that supports them splits ``gradient`` into these three.
    def sample(self, rng: np.random.Generator, worker: int = 0) -> Any:
        """Draw the minibatch (or noise) of one gradient, consuming ``rng`` as ``gradient`` does."""
        raise NotImplementedError(f"{type(self).__name__} has no sample(): it cannot serve MVR/HCM jobs")

    def gradient_at(self, params: Sequence[torch.Tensor], batch: Any) -> list[torch.Tensor]:
        """The gradient at ``params`` on ``batch`` (from :meth:`sample`)."""
        raise NotImplementedError(f"{type(self).__name__} has no gradient_at(): it cannot serve MVR/HCM jobs")

    def hessian_vector(self, params: Sequence[torch.Tensor], d: Sequence[torch.Tensor], batch: Any) -> list[torch.Tensor]:
        """``H(params; batch) d``, one tensor per parameter."""
        raise NotImplementedError(f"{type(self).__name__} has no hessian_vector(): it cannot serve HCM jobs")

    def job_gradient(self, params: Sequence[torch.Tensor], previous: Sequence[torch.Tensor], job: str,
                     rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        """One MVR/HCM job's result, ``[g_1..g_n, e_1..e_n]`` on one minibatch ``xi``.

        ``job`` (an update rule's ``job``): ``"previous_gradient"``: ``e = g(previous; xi)``;
        ``"hvp:current"``: ``e = H(params; xi) d``; ``"hvp:random"``: ``e = H(xhat; xi) d``
        with ``xhat = previous + s d``, ``s ~ U(0, 1)`` drawn from ``rng`` after the batch;
        ``d = params - previous``. ``previous`` is the version before the job's.
        """
        batch = self.sample(rng, worker)
        return self.gradient_at(params, batch) + self._extra(params, previous, job, batch, rng)

    def _extra(self, params: Sequence[torch.Tensor], previous: Sequence[torch.Tensor], job: str, batch: Any,
               rng: np.random.Generator) -> list[torch.Tensor]:
        """The ``e`` half of :meth:`job_gradient` on an already drawn ``batch``."""
        if job == "previous_gradient":
            return self.gradient_at(previous, batch)
        if job not in ("hvp:current", "hvp:random"):
            raise ValueError(f"job must be 'previous_gradient', 'hvp:current' or 'hvp:random', got {job!r}")
        d = [a - b for a, b in zip(params, previous)]
        point = params
        if job == "hvp:random":
            s = float(rng.random())
            point = [b + s * di for b, di in zip(previous, d)]
        return self.hessian_vector(point, d, batch)


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

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        """``A x`` for a float64 vector ``x`` (d,): three slices."""
        g = 2.0 * x
        g[1:] -= x[:-1]
        g[:-1] -= x[1:]
        g *= self.scale
        return g

    def full_gradient(self, x: np.ndarray) -> np.ndarray:
        """``A x - b`` for a float64 vector ``x`` (d,)."""
        g = self._matvec(x)
        g[0] += self.scale
        return g

    def gradient(self, params: Sequence[torch.Tensor], rng: np.random.Generator, worker: int = 0) -> list[torch.Tensor]:
        return self.gradient_at(params, self.sample(rng, worker))

    def sample(self, rng: np.random.Generator, worker: int = 0) -> float | None:
        """The call's noise scalar ``z`` (None without noise: nothing is drawn)."""
        return float(rng.standard_normal()) if self.noise else None

    def gradient_at(self, params: Sequence[torch.Tensor], batch: float | None) -> list[torch.Tensor]:
        g = self.full_gradient(params[0].numpy().reshape(-1))
        if batch is not None:
            g += self.noise * batch
        return [torch.from_numpy(g.reshape(self.shape))]

    def hessian_vector(self, params: Sequence[torch.Tensor], d: Sequence[torch.Tensor], batch: Any) -> list[torch.Tensor]:
        """``A d``, exactly (the Hessian is A everywhere; the noise does not depend on x)."""
        return [torch.from_numpy(self._matvec(d[0].numpy().reshape(-1)).reshape(self.shape))]

    def hessian(self) -> torch.Tensor:
        """A, dense float64 (d, d): for tests at small d."""
        eye = np.eye(self.dim)
        return torch.from_numpy(np.stack([self._matvec(e) for e in eye], axis=1))

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
        return self.gradient_at(params, self.sample(rng, worker))

    def sample(self, rng: np.random.Generator, worker: int = 0) -> torch.Tensor:
        """The minibatch's row indices."""
        return torch.from_numpy(rng.choice(self.M.shape[0], self.batch, replace=False))

    def gradient_at(self, params: Sequence[torch.Tensor], batch: torch.Tensor) -> list[torch.Tensor]:
        Mb = self.M[batch]
        return [Mb.T @ (Mb @ params[0] - self.y[batch]) / self.batch]

    def hessian_vector(self, params: Sequence[torch.Tensor], d: Sequence[torch.Tensor], batch: torch.Tensor) -> list[torch.Tensor]:
        """``Mb^T Mb d / batch`` on the minibatch's rows (exact)."""
        Mb = self.M[batch]
        return [Mb.T @ (Mb @ d[0]) / self.batch]

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
        return self.gradient_at(params, self.sample(rng, worker))

    def sample(self, rng: np.random.Generator, worker: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of the data iterator."""
        return next(self.batches)

    def gradient_at(self, params: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        leaves = [p.detach().requires_grad_(True) for p in params]
        return list(torch.autograd.grad(self._loss(leaves, batch), leaves))

    def hessian_vector(self, params: Sequence[torch.Tensor], d: Sequence[torch.Tensor], batch) -> list[torch.Tensor]:
        """``H d`` by double backward on the batch."""
        leaves = [p.detach().requires_grad_(True) for p in params]
        with torch.enable_grad(), twice_differentiable():
            return hessian_vector_product(self._loss(leaves, batch), leaves, d)

    def metric(self, params: Sequence[torch.Tensor]) -> float:
        with torch.no_grad():
            return float(self._loss(params, self.eval_batch))
