"""A task whose MVR/HCM extras are known exactly, and a spy on what a trainer publishes and
receives: shared by the threaded (test_estimator_jobs) and remote (test_distributed) checks."""
from __future__ import annotations

import torch


class ExactQuadraticTask:
    """loss = c/2 ||w||^2 + <z, w> with a fresh z per batch: on ONE batch the gradient
    difference between two points is c (w - w') and H d = c d exactly, whatever z."""

    c = 3.0

    def __init__(self, estimator: str = "mvr1") -> None:
        self.estimator = estimator

    def build_model(self):
        return torch.nn.Linear(4, 1, bias=False)

    def group_of(self, name):
        return {"norm": "l2", "momentum_estimator": self.estimator}

    def sample(self, batch_size, generator, device):
        return torch.randn(4, generator=generator).to(device)

    def loss(self, model, z):
        w = model.weight.reshape(-1)
        return 0.5 * self.c * (w * w).sum() + (z * w).sum()

    def evaluate(self, model):
        return float((model.weight.detach() ** 2).sum())


def spy_run(trainer, **run_kwargs):
    """Run ``trainer``, recording every published snapshot (version -> flat tensor) and every
    delivered result ([(version, flat tensor)]); returns (summary, published, delivered)."""
    from ringmaster_kernels.runtime.server import Server

    published, delivered = {}, []
    publish, deliver = Server.publish, Server.deliver

    def spy_publish(self):
        publish(self)
        published[self.published[0]] = self.published[1].clone()

    def spy_deliver(self, worker, version, grad, loss, device):
        delivered.append((version, grad.clone()))
        return deliver(self, worker, version, grad, loss, device)

    Server.publish, Server.deliver = spy_publish, spy_deliver
    try:
        summary = trainer.run(**run_kwargs)
    finally:
        Server.publish, Server.deliver = publish, deliver
    return summary, published, delivered
