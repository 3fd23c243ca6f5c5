"""A tiny byte-level GPT for the async runtime's demo and tests.

Every parameter is a 2-D matrix (norms carry no gain, linears no bias), so each one
maps cleanly onto a norm ball: embeddings and the head get the per-row/sign LMOs that
Scion/Gluon use for input and output layers, hidden matrices the spectral LMO.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import VOCAB_SIZE, ByteData


@dataclass(frozen=True)
class GPTConfig:
    """Shape of :class:`TinyGPT`. ``d_model`` must be divisible by ``n_head``."""

    vocab_size: int = VOCAB_SIZE
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (C,))).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.relu(self.fc(F.rms_norm(x, (C,)))).square())


class TinyGPT(nn.Module):
    """Pre-norm causal transformer over bytes.

    ``forward(idx)`` takes ``(B, T)`` int64 tokens with ``T <= seq_len`` and returns
    ``(B, T, vocab)`` logits; ``loss(idx, targets)`` returns the mean cross-entropy.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "out.weight")):
                # residual branches start silent so the initial model is the embedding + head
                p.zero_()
            elif p.dim() == 2 and not name.startswith(("tok", "pos")):
                nn.init.normal_(p, std=p.size(1) ** -0.5)
            else:
                nn.init.normal_(p, std=1.0)
        self.head.weight.mul_(0.1)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.size(1) > self.cfg.seq_len:
            raise ValueError(f"idx must have shape (B, T) with T <= {self.cfg.seq_len}, got {tuple(idx.shape)}")
        x = self.tok(idx) + self.pos.weight[: idx.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.head(F.rms_norm(x, (x.size(-1),)))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def norm_of(name: str) -> str:
    """The norm ball of a :class:`TinyGPT` parameter by name (Scion/Gluon's per-layer choice).

    Token and position embeddings: ``"rownorm"`` on the (vocab, d) table, i.e. each
    embedding vector is its own ball (Scion's ColNorm on the input layer's W = E^T).
    Output head: ``"sign"`` (Scion's choice for the last layer). Hidden matrices:
    ``"spectral"`` (Muon).
    """
    if name.startswith(("tok.", "pos.")):
        return "rownorm"
    if name.startswith("head."):
        return "sign"
    return "spectral"


class GPTTask:
    """The runtime's :class:`~ringmaster_kernels.runtime.trainer.Task` for :class:`TinyGPT` on a :class:`ByteData`.

    Groups follow Scion's per-layer choice (see :func:`norm_of`), with radii that keep
    every layer's update on the scale of its weights: embedding rows get RMS ~1
    (``rownorm`` radius ``d_model``), the head's sign update is ``1/d_model`` per entry,
    hidden matrices use the RMS->RMS spectral ball.
    """

    def __init__(self, cfg: GPTConfig, data: ByteData, val_batches: int = 4, val_batch_size: int = 16):
        if data.seq_len != cfg.seq_len:
            raise ValueError(f"data.seq_len ({data.seq_len}) must equal cfg.seq_len ({cfg.seq_len})")
        self.cfg, self.data = cfg, data
        self._val = data.validation(val_batch_size, val_batches)

    def build_model(self) -> TinyGPT:
        return TinyGPT(self.cfg)

    def group_of(self, name: str) -> dict:
        norm = norm_of(name)
        if norm == "rownorm":
            return {"norm": norm, "radius": float(self.cfg.d_model)}
        if norm == "sign":
            return {"norm": norm, "radius": 1.0 / self.cfg.d_model}
        return {"norm": norm, "lmo_options": {"scale": "scion"}}

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.sample(batch_size, generator)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss(self, model: TinyGPT, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return model.loss(*batch)

    @torch.no_grad()
    def evaluate(self, model: TinyGPT) -> float:
        device = next(model.parameters()).device
        losses = [model.loss(x.to(device), y.to(device)) for x, y in self._val]
        return float(torch.stack(losses).mean())
