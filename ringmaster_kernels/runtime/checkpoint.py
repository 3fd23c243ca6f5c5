"""Checkpoints of the async runtime: atomic writes and safe, validated loads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts written with
``torch.save``. It is written atomically (temporary file in the same directory, fsync,
rename, fsync of the directory), so a kill mid-write leaves the previous checkpoint
intact; temporaries left by a killed writer are removed before the next write. It is
read with ``torch.load(weights_only=True)``: a file a user points us at is untrusted and
must never run code when unpickled. Every failure to read or validate is one
``ValueError`` naming the file and what is wrong.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any

import torch

FORMAT = 2


def write_atomic(path: str, state: dict[str, Any]) -> str:
    """``torch.save(state)`` to ``path`` atomically; returns ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp*"):
        try:
            os.remove(stale)
        except OSError:
            pass  # another writer's, or already gone: not ours to fail on
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read(path: str) -> dict[str, Any]:
    """Load a checkpoint dict without executing code (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise ValueError(f"path: checkpoint {path!r}: not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, random bytes, a pickle with code: all "not a checkpoint"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"path: checkpoint {path!r} cannot be read ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"path: checkpoint {path!r} holds a {type(state).__name__}, not a checkpoint dict")
    return state


def require(path: str, state: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """``state[key]``, checked to be of ``kind``; ValueError naming the file and key otherwise."""
    if key not in state:
        raise ValueError(f"path: checkpoint {path!r} lacks {key!r}")
    value = state[key]
    if not isinstance(value, kind):
        raise ValueError(f"path: checkpoint {path!r}: {key!r} is a {type(value).__name__}")
    return value


def check_finite(path: str, what: str, tensors: Any) -> None:
    """Every floating tensor inside ``tensors`` (nested lists/dicts) is finite."""
    if isinstance(tensors, torch.Tensor):
        if tensors.is_floating_point() and not bool(torch.isfinite(tensors).all()):
            raise ValueError(f"path: checkpoint {path!r}: {what} holds NaN or inf")
    elif isinstance(tensors, dict):
        for key, value in tensors.items():
            check_finite(path, f"{what}[{key!r}]", value)
    elif isinstance(tensors, (list, tuple)):
        for i, value in enumerate(tensors):
            check_finite(path, f"{what}[{i}]", value)


def read_trainer_state(path: str, *, method: str, layout: list, num_workers: int, shape: torch.Size) -> dict[str, Any]:
    """A trainer checkpoint read from the untrusted ``path`` and checked against the trainer
    that loads it (``method``, ``layout.as_list()``, worker count, flat parameter
    ``shape``): format, types, finite parameters and policy state, counters, totals and
    elapsed time. Returns the state dict; its parts may still fail to fit when loaded
    (each part's ``load_state_dict`` validates itself). ValueError naming ``path``."""
    state = read(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"path: checkpoint {path!r} has format {state.get('format')!r}; this version reads {FORMAT}")
    saved_method = require(path, state, "method", str)
    saved_layout = require(path, state, "layout", list)
    if saved_method != method or [(n, tuple(s)) for n, s in saved_layout] != layout:
        raise ValueError(f"path: checkpoint {path!r} is for another model or method ({saved_method!r}); "
                         f"this trainer runs {method!r}")
    workers = require(path, state, "workers", list)
    if len(workers) != num_workers:
        raise ValueError(f"path: checkpoint {path!r} has {len(workers)} workers, this trainer {num_workers}")
    params = require(path, state, "params", torch.Tensor)
    if params.shape != shape:
        raise ValueError(f"path: checkpoint {path!r}: params has shape {tuple(params.shape)}, expected {tuple(shape)}")
    policy_state = require(path, state, "policy", dict)
    check_finite(path, "params", params)
    check_finite(path, "policy", policy_state)
    counters = policy_state.get("counters", {})
    if not all(isinstance(counters.get(k), int) and counters[k] >= 0 for k in ("version", "accepted", "discarded")):
        raise ValueError(f"path: checkpoint {path!r}: policy counters must be ints >= 0, got {counters!r}")
    require(path, state, "history", dict)
    totals = require(path, state, "totals", dict)
    if not all(isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in totals.items()):
        raise ValueError(f"path: checkpoint {path!r}: totals must map names to ints >= 0")
    elapsed = require(path, state, "elapsed", (int, float))
    if not (math.isfinite(elapsed) and elapsed >= 0):
        raise ValueError(f"path: checkpoint {path!r}: elapsed must be a finite number >= 0, got {elapsed!r}")
    require(path, state, "rng", dict)
    return state
