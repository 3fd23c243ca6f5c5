"""NanoChat as a task of the async runtime: its model, data, optimizer recipe and metric.

:class:`NanoChatTask` is built from a NanoChat checkout (karpathy/nanochat, read at HEAD
92d63d4) and the model/data arguments of its ``scripts/base_train.py``. Everything a
synchronous base_train run would do per step is reproduced per model *version*:

* model: ``GPT(GPTConfig(...))`` with the config base_train derives from ``--depth``,
  ``--aspect-ratio``, ``--head-dim``, ``--max-seq-len``, ``--window-pattern`` and the
  tokenizer's vocabulary, built on the meta device and initialised by ``init_weights``;
* update rule: the param groups of ``GPT.setup_optimizer`` (AdamW for embeddings, head and
  scalars; Muon per matrix shape) with base_train's batch-size lr scaling and weight-decay
  scaling, stepped by :class:`~ringmaster_kernels.integrations.nanochat.RingmasterMuonAdamW`
  (NorMuon, row equilibration, cautious weight decay on);
* schedules: base_train's warmup/warmdown lr multiplier, Muon momentum ramp and cosine
  weight-decay schedule, evaluated at the version being produced (clamped at
  ``--num-iterations``, the schedule's horizon);
* data: one NanoChat BOS-bestfit loader per worker, each on its own slice of the train
  shards (row groups ``worker, worker + n, ...``, as NanoChat gives DDP ranks), batches
  copied out of the loader's reused buffers, position saved in checkpoints (NanoChat's own
  approximate resume: the next row group);
* metric: validation bits per byte on the first ``--eval-tokens`` of the val split (the
  definition of NanoChat's ``evaluate_bpb``, computed here without its all-reduce so that
  rank 0 can evaluate alone under torch.distributed);
* export: NanoChat's checkpoint layout (``model_XXXXXX.pt``, ``optim_XXXXXX_rank0.pt``,
  ``meta_XXXXXX.json`` under ``<base dir>/base_checkpoints/<tag>``), which
  ``nanochat.checkpoint_manager.build_model`` loads.

A checkout whose API moved (no ``scripts/base_train.py``, ``GPTConfig``, ``GPT.setup_optimizer``,
the loader, the tokenizer helpers or the checkpoint manager) is refused with one line naming
what is missing, before any model is built.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import math
import os
import sys
import threading
from typing import Any, Sequence

import torch

from ..optim.update_rules import OptimizerRule

# what this integration calls, per module of the checkout
REQUIRED_API = {
    "nanochat.gpt": ("GPT", "GPTConfig", "MuonAdamW"),
    "nanochat.dataloader": ("tokenizing_distributed_data_loader_with_state_bos_bestfit",
                            "tokenizing_distributed_data_loader_bos_bestfit"),
    "nanochat.tokenizer": ("get_tokenizer", "get_token_bytes"),
    "nanochat.checkpoint_manager": ("save_checkpoint", "build_model"),
    "nanochat.common": ("get_base_dir",),
}
B_REF = 2**19  # base_train's reference batch (tokens) for the lr and weight-decay scaling


class NanoChatAPIError(ValueError):
    """The checkout is not a NanoChat this integration can drive (the message says what is missing)."""


def load_checkout(root: str | os.PathLike) -> dict[str, Any]:
    """Import the NanoChat modules of the checkout at ``root``; returns ``{module: module}``.

    Raises :class:`NanoChatAPIError` (a ValueError) naming the first missing file,
    module or attribute.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isfile(os.path.join(root, "scripts", "base_train.py")):
        raise NanoChatAPIError(f"--nanochat-dir: {root} has no scripts/base_train.py (not a NanoChat checkout)")
    if root not in sys.path:
        sys.path.insert(0, root)
    modules = {}
    for name, attributes in REQUIRED_API.items():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise NanoChatAPIError(f"NanoChat at {root}: cannot import {name} ({exc})") from None
        for attribute in attributes:
            if not hasattr(module, attribute):
                raise NanoChatAPIError(f"NanoChat at {root}: {name}.{attribute} is missing (its API moved)")
        modules[name] = module
    if not hasattr(modules["nanochat.gpt"].GPT, "setup_optimizer"):
        raise NanoChatAPIError(f"NanoChat at {root}: nanochat.gpt.GPT.setup_optimizer is missing (its API moved)")
    if not dataclasses.is_dataclass(modules["nanochat.gpt"].GPTConfig):
        raise NanoChatAPIError(f"NanoChat at {root}: nanochat.gpt.GPTConfig is not a dataclass (its API moved)")
    return modules


def base_train_parser() -> argparse.ArgumentParser:
    """The model, data and optimizer arguments of base_train this task honours (same names
    and defaults, except ``--num-iterations``: the schedules' horizon, 1000 unless given,
    where base_train derives it from a FLOPs or data budget)."""
    p = argparse.ArgumentParser(prog="base_train arguments", add_help=False)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", type=str, default="SSSL")
    p.add_argument("--num-iterations", type=int, default=1000)
    p.add_argument("--target-param-data-ratio", type=float, default=12)
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=-1)
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--weight-decay", type=float, default=0.28)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--eval-tokens", type=int, default=80 * 524288)
    p.add_argument("--model-tag", type=str, default=None)
    return p


def parse_base_train_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse base_train-style arguments; an unknown or invalid one is a ValueError naming it."""
    parser = base_train_parser()
    args, unknown = parser.parse_known_args(list(argv))
    if unknown:
        raise ValueError(f"base_train arguments: not supported by the async task: {unknown}")
    for name in ("depth", "aspect_ratio", "head_dim", "max_seq_len", "num_iterations", "device_batch_size", "eval_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"base_train arguments: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("embedding_lr", "unembedding_lr", "weight_decay", "matrix_lr", "scalar_lr", "warmdown_ratio", "final_lr_frac"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"base_train arguments: --{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.warmup_steps < 0:
        raise ValueError(f"base_train arguments: --warmup-steps must be >= 0, got {args.warmup_steps}")
    return args


class Recipe:
    """base_train's schedules and scaled hyperparameters for one configuration.

    ``lr_multiplier``, ``muon_momentum`` and ``weight_decay`` are base_train's
    ``get_lr_multiplier``, ``get_muon_momentum`` and ``get_weight_decay`` (momentum ramp
    0.85 -> 0.97 over 400 steps, 0.97 -> 0.90 over the warmdown); the step index is
    clamped to ``num_iterations`` so an async run longer than the horizon stays at the
    final values instead of extrapolating the warmdown below zero.
    """

    def __init__(self, args: argparse.Namespace, batch_tokens: int, scaling_params: int, d12_scaling_params: int):
        self.args = args
        self.num_iterations = args.num_iterations
        self.warmdown = round(args.warmdown_ratio * args.num_iterations)
        target_tokens = int(args.target_param_data_ratio * scaling_params)
        d_ref = args.target_param_data_ratio * d12_scaling_params
        self.batch_tokens = batch_tokens
        self.batch_lr_scale = (batch_tokens / B_REF) ** 0.5
        self.weight_decay_scaled = args.weight_decay * math.sqrt(batch_tokens / B_REF) * (d_ref / max(target_tokens, 1))

    def _it(self, step: int) -> int:
        return min(step, self.num_iterations)

    def lr_multiplier(self, step: int) -> float:
        it, n, a = self._it(step), self.num_iterations, self.args
        if it < a.warmup_steps:
            return (it + 1) / a.warmup_steps
        if it <= n - self.warmdown:
            return 1.0
        progress = (n - it) / self.warmdown
        return progress + (1 - progress) * a.final_lr_frac

    def muon_momentum(self, step: int) -> float:
        it, start = self._it(step), self.num_iterations - self.warmdown
        if it < 400:
            frac = it / 400
            return (1 - frac) * 0.85 + frac * 0.97
        if it >= start and self.warmdown > 0:
            progress = (it - start) / self.warmdown
            return 0.97 * (1 - progress) + 0.90 * progress
        return 0.97

    def weight_decay(self, step: int) -> float:
        return self.weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * self._it(step) / self.num_iterations))

    def __call__(self, version: int, optimizer: torch.optim.Optimizer) -> None:
        """The per-version schedule hook: base_train's per-step rewrites of the groups."""
        lrm = self.lr_multiplier(version)
        momentum, wd = self.muon_momentum(version), self.weight_decay(version)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
                group["weight_decay"] = wd

    __name__ = "base_train_schedule"


_dist_info_lock = threading.Lock()


def first_batch_as(dataloader: Any, loader: Any, dist_info: tuple[bool, int, int, int]) -> Any:
    """``next(loader)`` with NanoChat's ``get_dist_info`` answering ``dist_info``
    (ddp, rank, local rank, world size). A loader reads its rank once, when its first
    batch is made; loaders opened from several threads take turns, hence the lock."""
    with _dist_info_lock:
        original = dataloader.get_dist_info
        dataloader.get_dist_info = lambda: dist_info
        try:
            return next(loader)
        finally:
            dataloader.get_dist_info = original


class NanoChatStream:
    """One worker's NanoChat train loader: its own row-group slice, batches copied out."""

    def __init__(self, task: "NanoChatTask", worker: int, num_workers: int, batch_size: int, device: torch.device,
                 resume: dict | None = None) -> None:
        self.task, self.worker, self.num_workers = task, worker, num_workers
        self.batch_size, self.device = batch_size, device
        self._open(resume)

    def _open(self, resume: dict | None) -> None:
        dataloader = self.task.modules["nanochat.dataloader"]
        loader = dataloader.tokenizing_distributed_data_loader_with_state_bos_bestfit(
            self.task.tokenizer, self.batch_size, self.task.args.max_seq_len, split="train",
            tokenizer_threads=1, device=str(self.device.type), resume_state_dict=resume)
        self._pending = self._copy(first_batch_as(dataloader, loader, (True, self.worker, self.worker, self.num_workers)))
        self.loader = loader
        self.position = self._pending[2]

    def _copy(self, item: tuple) -> tuple:
        x, y, state = item
        return x.clone(), y.clone(), dict(state)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, state = self._pending if self._pending is not None else self._copy(next(self.loader))
        self._pending = None
        self.position = state
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"nanochat_loader": {k: int(v) for k, v in self.position.items()}}

    def load_state_dict(self, state: dict) -> None:
        position = state.get("nanochat_loader") if isinstance(state, dict) else None
        if not isinstance(position, dict) or not all(isinstance(position.get(k), int) and position[k] >= 0
                                                     for k in ("pq_idx", "rg_idx")):
            raise ValueError(f"worker state: 'nanochat_loader' must hold ints pq_idx, rg_idx >= 0, got {position!r}")
        self._open(position)


class NanoChatTask:
    """The runtime :class:`~ringmaster_kernels.runtime.trainer.Task` for NanoChat (see the module doc).

    Args:
        nanochat_dir: root of a NanoChat checkout (its data and tokenizer under
            ``$NANOCHAT_BASE_DIR``, as base_train expects).
        base_train_args: base_train's model/data/optimizer arguments (see
            :func:`base_train_parser`), e.g. ``["--depth=2", "--max-seq-len=128"]``.
        batch_tokens: tokens per update the recipe's lr/weight-decay scaling assumes
            (base_train's total batch size); default ``--total-batch-size``, else the
            ``accum_steps`` device batches of one worker's gradient.
        accum_steps: device batches each worker accumulates per gradient.
        device: where models are built (workers move their replicas to their device).
        export_dir: where :meth:`export` writes NanoChat checkpoints (default
            ``<NanoChat base dir>/base_checkpoints``).
        tag_prefix: the exported model's tag is ``<prefix>_<method>_d<depth>`` (or
            ``--model-tag``), e.g. to keep runs of the two clocks apart.
        optimizer_options: passed to ``RingmasterMuonAdamW`` (e.g. ``backend``).
    """

    metric_name = "val_bpb"

    def __init__(self, nanochat_dir: str | os.PathLike, base_train_args: Sequence[str] = (), *,
                 batch_tokens: int | None = None, accum_steps: int = 1, device: str | torch.device = "cpu",
                 export_dir: str | os.PathLike | None = None, tag_prefix: str = "ringmaster",
                 optimizer_options: dict | None = None) -> None:
        self.args = parse_base_train_args(base_train_args)
        self.modules = load_checkout(nanochat_dir)
        self.device = torch.device(device)
        tokenizer_mod = self.modules["nanochat.tokenizer"]
        self.tokenizer = tokenizer_mod.get_tokenizer()
        self.token_bytes = tokenizer_mod.get_token_bytes(device="cpu")
        self.config = self._config(self.args.depth)
        a = self.args
        if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"accum_steps must be an int >= 1, got {accum_steps!r}")
        if batch_tokens is None:  # one update is one worker's gradient: accum_steps device batches
            batch_tokens = a.total_batch_size if a.total_batch_size > 0 else a.device_batch_size * a.max_seq_len * accum_steps
        scaling = self._scaling_params(self.config)
        self.recipe = Recipe(a, batch_tokens, scaling, self._scaling_params(self._config(12)))
        self.optimizer_options = dict(optimizer_options or {})
        self.tag_prefix = tag_prefix
        base_dir = self.modules["nanochat.common"].get_base_dir()
        self.export_dir = os.fspath(export_dir) if export_dir is not None else os.path.join(base_dir, "base_checkpoints")
        self.eval_steps = max(1, a.eval_tokens // (a.device_batch_size * a.max_seq_len))

    # ------------------------------------------------------------------ model
    def _config(self, depth: int):
        """base_train's ``build_model_meta`` config for ``depth``."""
        a = self.args
        model_dim = ((depth * a.aspect_ratio + a.head_dim - 1) // a.head_dim) * a.head_dim
        heads = model_dim // a.head_dim
        return self.modules["nanochat.gpt"].GPTConfig(
            sequence_len=a.max_seq_len, vocab_size=self.tokenizer.get_vocab_size(), n_layer=depth,
            n_head=heads, n_kv_head=heads, n_embd=model_dim, window_pattern=a.window_pattern)

    def _scaling_params(self, config) -> int:
        with torch.device("meta"), _quiet():
            model = self.modules["nanochat.gpt"].GPT(config)
        counts = model.num_scaling_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    def build_model(self) -> torch.nn.Module:
        with torch.device("meta"), _quiet():
            model = self.modules["nanochat.gpt"].GPT(self.config)
        model.to_empty(device=self.device)
        model.init_weights()
        return model

    def update_rule(self, model: torch.nn.Module) -> OptimizerRule:
        """``model.setup_optimizer`` (base_train's scaled lrs and weight decay) with
        RingmasterMuonAdamW in place of MuonAdamW, and base_train's schedules per version."""
        from .nanochat import patch

        r, a = self.recipe, self.args
        with patch(**self.optimizer_options), _quiet():
            optimizer = model.setup_optimizer(
                unembedding_lr=a.unembedding_lr * r.batch_lr_scale, embedding_lr=a.embedding_lr * r.batch_lr_scale,
                scalar_lr=a.scalar_lr * r.batch_lr_scale, matrix_lr=a.matrix_lr * r.batch_lr_scale,
                weight_decay=r.weight_decay_scaled)
        return OptimizerRule(optimizer, schedule=r)

    # ------------------------------------------------------------------ data and loss
    def data_stream(self, *, worker: int, num_workers: int, batch_size: int, device: torch.device, seed: int) -> NanoChatStream:
        # NanoChat's data order is fixed by the shards, not by a seed: each worker reads its slice
        return NanoChatStream(self, worker, num_workers, batch_size, device)

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return model(x, y)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> float:
        """Validation bits per byte over ``eval_steps`` batches of the val split."""
        device = next(model.parameters()).device
        dataloader = self.modules["nanochat.dataloader"]
        loader = dataloader.tokenizing_distributed_data_loader_bos_bestfit(
            self.tokenizer, self.args.device_batch_size, self.args.max_seq_len, split="val",
            tokenizer_threads=1, device=str(device.type))
        # the whole val split, as one process: under torchrun NanoChat's own answer would be
        # this rank's slice of it, so ranks would report different metrics for one model
        first = first_batch_as(dataloader, loader, (False, 0, 0, 1))
        token_bytes = self.token_bytes.to(device)
        nats, nbytes = 0.0, 0
        for step in range(self.eval_steps):
            x, y = first if step == 0 else next(loader)
            loss = model(x, y, loss_reduction="none").view(-1)
            y = y.view(-1)
            valid = y >= 0
            counted = torch.where(valid, token_bytes[y.clamp_min(0)], torch.zeros_like(y, dtype=token_bytes.dtype))
            nats += float((loss * (counted > 0)).sum())
            nbytes += int(counted.sum())
        return nats / (math.log(2) * nbytes) if nbytes else math.inf

    # ------------------------------------------------------------------ export
    def model_tag(self, method: str) -> str:
        return self.args.model_tag or f"{self.tag_prefix}_{method}_d{self.args.depth}"

    def export(self, model: torch.nn.Module, policy: Any, version: int, metric: float | None) -> str:
        """Write ``model`` and the update rule's optimizer in NanoChat's checkpoint layout
        under ``export_dir/<tag>`` (``metric``: the final val bpb); returns that directory."""
        out = os.path.join(self.export_dir, self.model_tag(policy.name))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        optimizer = getattr(policy.rule, "optimizer", None)
        meta = {
            "step": version,
            "val_bpb": metric,
            "model_config": dataclasses.asdict(self.config),
            "user_config": {**vars(self.args), "async_method": policy.name},
            "device_batch_size": self.args.device_batch_size,
            "max_seq_len": self.args.max_seq_len,
            "total_batch_size": self.recipe.batch_tokens,
            "dataloader_state_dict": None,
            "loop_state": {"min_val_bpb": None, "smooth_train_loss": None, "total_training_time": None},
        }
        json.dumps(meta)  # NanoChat writes it as JSON: fail here, not half-way through its writer
        with _quiet():
            self.modules["nanochat.checkpoint_manager"].save_checkpoint(
                out, version, state, optimizer.state_dict() if optimizer is not None else None, meta, rank=0)
        return out


_QUIET = threading.RLock()


@contextlib.contextmanager
def _quiet():
    """NanoChat prints banners and lr-scale lines from every replica; keep them off stdout.
    ``sys.stdout`` is process-wide and worker threads build replicas at once, so the
    redirections are serialised (interleaved ones would leave stdout on a closed file)."""
    with _QUIET, open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield
