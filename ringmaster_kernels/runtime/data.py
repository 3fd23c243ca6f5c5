"""Byte-level text that every machine already has: the Python standard library's sources.

No download, no tokenizer: a token is a byte (vocabulary 256). The corpus is the
top-level ``*.py`` files of the running interpreter's stdlib, read in sorted order, so
two machines with the same Python version see the same bytes.
"""
from __future__ import annotations

import glob
import os
import sysconfig

import torch

VOCAB_SIZE = 256


def stdlib_corpus(max_bytes: int = 4_000_000, root: str | None = None) -> torch.Tensor:
    """Concatenate the stdlib's top-level ``.py`` files (sorted by name) into one byte tensor.

    Args:
        max_bytes: cap on the corpus length; must be positive.
        root: directory to read instead of the stdlib (tests and odd installs).

    Returns:
        A 1-D ``torch.uint8`` tensor of at most ``max_bytes`` bytes.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be an int, got {type(max_bytes).__name__}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    root = root or sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise ValueError(f"root: no .py files found in {root!r}")
    chunks: list[bytes] = []
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes - total)
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class ByteData:
    """A byte corpus split into a training head and a held-out tail.

    Training batches are random windows drawn with a caller-owned ``torch.Generator``
    (one per worker, so workers see independent streams and a checkpoint can save
    each stream's state). Validation batches are fixed windows, identical for every
    method and run, so losses are comparable.
    """

    def __init__(self, corpus: torch.Tensor, seq_len: int, val_fraction: float = 0.05):
        if not isinstance(corpus, torch.Tensor) or corpus.dim() != 1 or corpus.dtype != torch.uint8:
            raise TypeError("corpus must be a 1-D torch.uint8 tensor")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = int(corpus.numel() * val_fraction)
        if n_val <= seq_len + 1 or corpus.numel() - n_val <= seq_len + 1:
            raise ValueError(
                f"corpus of {corpus.numel()} bytes is too short for seq_len={seq_len} "
                f"and val_fraction={val_fraction}"
            )
        self.seq_len = seq_len
        self.train = corpus[:-n_val].long()
        self.val = corpus[-n_val:].long()

    def _windows(self, source: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = source[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: ``(x, y)``, each ``(batch_size, seq_len)`` int64, y = x shifted by one."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        high = self.train.numel() - self.seq_len - 1
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        return self._windows(self.train, starts)

    def validation(self, batch_size: int, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``num_batches`` fixed, evenly spaced held-out batches of ``(batch_size, seq_len)``."""
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"batch_size and num_batches must be >= 1, got {batch_size}, {num_batches}")
        count = batch_size * num_batches
        high = self.val.numel() - self.seq_len - 1
        starts = torch.linspace(0, high, count).long()
        return [self._windows(self.val, s) for s in starts.split(batch_size)]
