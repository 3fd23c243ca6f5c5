"""A NanoChat-shaped GPT and task for tests that cannot have a NanoChat checkout.

Same parameter roles and group kinds as NanoChat's ``GPT.setup_optimizer`` (AdamW for the
embedding, the head and the per-layer scalars; one Muon group per matrix shape of the
blocks), stepped by RingmasterMuonAdamW, with base_train's per-step rewrites of lr,
momentum and weight decay (the same :class:`Recipe` the NanoChat task uses). Data: each
worker's stream is a deterministic function of (seed, worker, batch index), so a run's
data is reproducible and checkpointable.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from ringmaster_kernels.integrations.nanochat import RingmasterMuonAdamW
from ringmaster_kernels.integrations.nanochat_task import Recipe, base_train_parser
from ringmaster_kernels.optim.update_rules import OptimizerRule

VOCAB, DIM, LAYERS, SEQ = 32, 16, 2, 12


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_q = nn.Linear(DIM, DIM, bias=False)
        self.c_k = nn.Linear(DIM, DIM, bias=False)
        self.c_v = nn.Linear(DIM, DIM, bias=False)
        self.c_proj = nn.Linear(DIM, DIM, bias=False)
        self.c_fc = nn.Linear(DIM, 4 * DIM, bias=False)
        self.c_out = nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (DIM,))
        att = F.scaled_dot_product_attention(self.c_q(h)[:, None], self.c_k(h)[:, None], self.c_v(h)[:, None], is_causal=True)
        x = x + self.c_proj(att[:, 0])
        return x + self.c_out(F.relu(self.c_fc(F.rms_norm(x, (DIM,)))).square())


class ChatGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(VOCAB, DIM), "h": nn.ModuleList([Block() for _ in range(LAYERS)])})
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(LAYERS))
        self.x0_lambdas = nn.Parameter(torch.full((LAYERS,), 0.1))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = x0 = self.transformer.wte(idx)
        for i, block in enumerate(self.transformer.h):
            x = block(self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0)
        logits = self.lm_head(F.rms_norm(x, (DIM,)))
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def setup_optimizer(self, matrix_lr: float = 0.02, weight_decay: float = 0.1, **extras) -> RingmasterMuonAdamW:
        matrices = list(self.transformer.h.parameters())
        groups = [
            dict(kind="adamw", params=[self.lm_head.weight], lr=0.004, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01),
            dict(kind="adamw", params=[self.transformer.wte.weight], lr=0.2, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001),
            dict(kind="adamw", params=[self.resid_lambdas], lr=0.005, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
            dict(kind="adamw", params=[self.x0_lambdas], lr=0.5, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
        ]
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        opt = RingmasterMuonAdamW(groups, backend="torch", **extras)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        return opt


def _tokens(seed: int, worker: int, index: int, batch: int) -> torch.Tensor:
    """A learnable stream: each sequence counts up by a fixed stride from a random start."""
    g = torch.Generator().manual_seed(((seed * 1009 + worker) * 1_000_003 + index) % (2**63))
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


class ChatStream:
    def __init__(self, seed: int, worker: int, batch_size: int, device: torch.device) -> None:
        self.seed, self.worker, self.batch_size, self.device, self.index = seed, worker, batch_size, device, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = _tokens(self.seed, self.worker, self.index, self.batch_size).to(self.device)
        self.index += 1
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


class ChatTask:
    """A runtime task with NanoChat's group kinds, schedules and RingmasterMuonAdamW."""

    metric_name = "val_loss"

    def __init__(self, num_iterations: int = 40, optimizer_options: dict | None = None) -> None:
        args: argparse.Namespace = base_train_parser().parse_args(
            [f"--num-iterations={num_iterations}", "--warmup-steps=3", "--warmdown-ratio=0.5"])
        self.recipe = Recipe(args, batch_tokens=2**19, scaling_params=10_000, d12_scaling_params=10_000)
        self.optimizer_options = optimizer_options or {}
        self.val = _tokens(99, 0, 0, 16)

    def build_model(self) -> ChatGPT:
        return ChatGPT()

    def update_rule(self, model: ChatGPT) -> OptimizerRule:
        return OptimizerRule(model.setup_optimizer(**self.optimizer_options), schedule=self.recipe)

    def data_stream(self, *, worker: int, num_workers: int, batch_size: int, device: torch.device, seed: int) -> ChatStream:
        return ChatStream(seed, worker, batch_size, device)

    def loss(self, model: ChatGPT, batch) -> torch.Tensor:
        return model(*batch)

    @torch.no_grad()
    def evaluate(self, model: ChatGPT) -> float:
        return float(model(self.val[:, :-1], self.val[:, 1:]))
