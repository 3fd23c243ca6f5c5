"""The byte-level GPT of ``ringmaster train`` as a problem of :mod:`.estimator_experiments`.

Virtual clock (the Ringmaster LMO authors' NanoChat protocol, ``runtime/virtual.py``):
8 workers, worker i takes ``base * i`` plus 5% half-normal jitter, ``base`` the measured
time of one gradient; MVR and HCM jobs take their measured cost (two gradients; a gradient
plus a double-backward HVP under SDPA's math attention) times that. The (L0, L1) of the
l0l1 rule is fitted online (``step_rules.SmoothnessFit``) on a short synchronous run and
logged; one (L0, L1) serves every layer (the median of the layers' fits).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..optim import step_rules
from ..optim.gluon import Gluon
from .data import ByteData, stdlib_corpus
from .estimator_experiments import Problem, Variant
from .layout import param_layout
from .model import GPTConfig, GPTTask
from .virtual import TaskObjective, authors_time_model

WORKERS = 8
LR = 0.02  # `ringmaster train`'s default step


def _task() -> GPTTask:
    cfg = GPTConfig(seq_len=64, n_layer=2, n_head=4, d_model=64)
    return GPTTask(cfg, ByteData(stdlib_corpus(1_000_000), cfg.seq_len))


def _setup(task: GPTTask, seed: int):
    torch.manual_seed(seed)
    model = task.build_model()
    _, layout = param_layout(task, model)
    named = dict(model.named_parameters())
    groups = [{"params": [named[n].detach() for n in names], **options} for options, names in layout]
    objective = TaskObjective(task, model, [named[n] for _, names in layout for n in names],
                              num_workers=WORKERS, batch_size=16, seed=seed)
    return objective, groups


def fit_smoothness(task: GPTTask, steps: int = 20, log=print) -> tuple[float, float]:
    """(L0, L1): the median over layers of the online fit along a synchronous Gluon run."""
    torch.manual_seed(1234)
    model = task.build_model()
    _, layout = param_layout(task, model)
    named = dict(model.named_parameters())
    opt = Gluon([{"params": [named[n] for n in names], "norm": o["norm"], "radius": o.get("radius", 1.0),
                  "norm_options": o.get("lmo_options")} for o, names in layout], lr=LR, momentum=0.9, nesterov=False)
    fit = step_rules.SmoothnessFit.for_optimizer(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, task.data.sample(16, gen)).backward()
        fit.observe_optimizer(opt)
        opt.step()
    per_layer = fit.fit()
    for name, (L0, L1, n) in per_layer.items():
        log(f"smoothness fit layer {name}: L0 {L0:.3g} L1 {L1:.3g} ({n} samples)")
    L0 = float(np.median([v[0] for v in per_layer.values()]))
    L1 = float(np.median([v[1] for v in per_layer.values()]))
    if L0 == 0 and L1 == 0:
        L1 = 1.0
    return L0, L1


def gpt_variants(smoothness: tuple[float, float] | None = None) -> list[Variant]:
    L0, L1 = smoothness if smoothness is not None else fit_smoothness(_task())
    names = ("ema", "nesterov", "mvr1", "mvr2", "mvr3", "hcm1", "hcm2")
    out = [Variant(n, estimator=n, lr=LR) for n in names]
    out += [
        # t = ||g||_* / (L0 + L1 ||g||_*) <= 1 / L1: lr 1 is Gluon's own step
        Variant("ema+l0l1", rule="l0l1", options=(("L0", L0), ("L1", L1)), lr=1.0),
        Variant("ema+theorem2", rule="theorem2", lr=10 * LR),
        Variant("ema+distance_adaptive", rule="distance_adaptive", options=(("r_eps", 1e-3),), lr=LR),
        Variant("ema+scale_calibrated", rule="scale_calibrated", options=(("L", L1),), lr=1.0),
    ]
    return out


def gpt_problem(updates: int, log=print) -> Problem:
    """Horizon ``updates * base`` virtual seconds; job costs measured here, once."""
    task = _task()
    objective, groups = _setup(task, 0)
    params = [p for g in groups for p in g["params"]]
    previous = [p + 1e-3 * torch.randn_like(p) for p in params]
    rng = np.random.default_rng(0)

    def seconds(call, repeats=3):
        call()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - t0) / repeats

    base = seconds(lambda: objective.gradient(params, rng, 0))
    ratio = {job: seconds(lambda: objective.job_gradient(params, previous, job, rng, 0)) / base
             for job in ("previous_gradient", "hvp:current", "hvp:random")}
    log(f"GPT: base {base * 1e3:.1f} ms per gradient; job cost / gradient: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    from ..optim import estimators

    def time_cost(v: Variant) -> float:
        job = estimators.job_of(estimators.get(v.estimator))
        return 1.0 if job is None else ratio[job]

    return Problem(f"GPT n={WORKERS} linear", lambda seed: _setup(task, seed), authors_time_model(base, "linear", WORKERS),
                   updates * base, time_cost, record_every=5)
