"""Ringmaster on NanoChat's own model, data and recipe.

CI has no NanoChat checkout: the checkout's API checks run on fake checkouts written here;
the training runs need ``NANOCHAT_DIR`` (a karpathy/nanochat checkout with its data and
tokenizer prepared under ``NANOCHAT_BASE_DIR``) and are skipped with the reason otherwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest

from ringmaster_kernels.integrations.nanochat_task import (
    NanoChatAPIError,
    first_batch_as,
    load_checkout,
    parse_base_train_args,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOCHAT_DIR = os.environ.get("NANOCHAT_DIR")
needs_checkout = pytest.mark.skipif(
    not NANOCHAT_DIR, reason="needs a NanoChat checkout: set NANOCHAT_DIR (and NANOCHAT_BASE_DIR with its data)")
TINY = ["--depth=2", "--max-seq-len=128", "--device-batch-size=4", "--num-iterations=2000", "--eval-tokens=4096",
        "--window-pattern=L"]

GOOD_GPT = """
import dataclasses
@dataclasses.dataclass
class GPTConfig:
    n_layer: int = 1
class GPT:
    def setup_optimizer(self):
        pass
MuonAdamW = object
"""
MODULES = {
    "dataloader.py": "def tokenizing_distributed_data_loader_with_state_bos_bestfit(): pass\n"
                     "def tokenizing_distributed_data_loader_bos_bestfit(): pass\n",
    "tokenizer.py": "def get_tokenizer(): pass\ndef get_token_bytes(): pass\n",
    "checkpoint_manager.py": "def save_checkpoint(): pass\ndef build_model(): pass\n",
    "common.py": "def get_base_dir(): pass\n",
}


def _fake_checkout(tmp_path, gpt: str, base_train: bool = True) -> str:
    root = tmp_path / "nanochat_checkout"
    (root / "nanochat").mkdir(parents=True)
    (root / "scripts").mkdir()
    if base_train:
        (root / "scripts" / "base_train.py").write_text("")
    (root / "nanochat" / "__init__.py").write_text("")
    (root / "nanochat" / "gpt.py").write_text(textwrap.dedent(gpt))
    for name, text in MODULES.items():
        (root / "nanochat" / name).write_text(text)
    return str(root)


def _load_in_subprocess(root: str) -> subprocess.CompletedProcess:
    # a fresh interpreter: the checkout's modules are imported as `nanochat.*`
    code = ("import sys; from ringmaster_kernels.integrations.nanochat_task import load_checkout\n"
            f"try:\n    load_checkout({root!r})\nexcept ValueError as e:\n    print('ERROR', e); sys.exit(3)\nprint('OK')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_a_checkout_without_base_train_is_refused(tmp_path):
    with pytest.raises(NanoChatAPIError, match="scripts/base_train.py"):
        load_checkout(_fake_checkout(tmp_path, GOOD_GPT, base_train=False))


@pytest.mark.parametrize("gpt, missing", [
    (GOOD_GPT, None),
    (GOOD_GPT.replace("    def setup_optimizer(self):\n        pass\n", "    pass\n"), "nanochat.gpt.GPT.setup_optimizer"),
    (GOOD_GPT.replace("class GPTConfig:", "class Config:"), "nanochat.gpt.GPTConfig"),
    (GOOD_GPT.replace("MuonAdamW = object", ""), "nanochat.gpt.MuonAdamW"),
])
def test_a_checkout_whose_api_moved_is_refused_naming_what_is_missing(tmp_path, gpt, missing):
    result = _load_in_subprocess(_fake_checkout(tmp_path, gpt))
    if missing is None:
        assert result.stdout.strip() == "OK", result.stderr
    else:
        assert result.returncode == 3, result.stderr
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1 and missing in lines[0] and "missing" in lines[0]


def test_a_loader_reads_the_rank_it_is_given_and_the_real_one_is_put_back():
    """Workers' train loaders read their slice, the val loader (under torchrun too) all of it."""
    real = lambda: (True, 3, 3, 4)  # noqa: E731  what get_dist_info says on rank 3 of torchrun
    dataloader = types.SimpleNamespace(get_dist_info=real)

    def loader():
        yield dataloader.get_dist_info()
        yield dataloader.get_dist_info()

    gen = loader()
    assert first_batch_as(dataloader, gen, (False, 0, 0, 1)) == (False, 0, 0, 1)
    assert dataloader.get_dist_info is real and next(gen) == (True, 3, 3, 4)

    def failing():
        raise OSError("no shard")
        yield

    with pytest.raises(OSError):
        first_batch_as(dataloader, failing(), (True, 1, 1, 2))
    assert dataloader.get_dist_info is real


def test_launcher_refuses_bad_input_before_any_work(tmp_path):
    script = os.path.join(ROOT, "python", "nanochat_async.py")
    cases = [
        (["--nanochat-dir", str(tmp_path), "--methods", "ringmaster,bogus"], "methods"),
        (["--nanochat-dir", str(tmp_path)], "scripts/base_train.py"),
        (["--nanochat-dir", str(tmp_path), "--workers", "0"], "--workers"),
        (["--nanochat-dir", str(tmp_path), "--clock", "virtual", "--distributed"], "--distributed"),
    ]
    for argv, needle in cases:
        result = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and needle in result.stderr, (argv, result.stderr)
    with pytest.raises(ValueError, match="--num-iterations"):
        parse_base_train_args(["--num-iterations=0"])
    with pytest.raises(ValueError, match="not supported"):
        parse_base_train_args(["--fp8"])


def test_nanochat_train_refuses_silent_independent_models_on_other_devices():
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import nanochat_train
    finally:
        sys.path.pop(0)
    assert nanochat_train.device_type(["--depth=2", "--device-type=cpu"]) == "cpu"
    assert nanochat_train.device_type(["--device-type", "mps"]) == "mps"
    assert nanochat_train.device_type([]) == ""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    code = "import nanochat_train; nanochat_train.join_gloo_if_cpu(['--device-type=mps'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.join(ROOT, "python"), env=env)
    assert result.returncode != 0 and "independent models" in result.stderr


@needs_checkout
@pytest.mark.slow
@pytest.mark.parametrize("clock", ["real", "virtual"])
def test_ringmaster_reaches_sync_final_val_bpb_in_half_the_time(clock, tmp_path):
    from ringmaster_kernels.integrations.nanochat_task import NanoChatTask
    from ringmaster_kernels.runtime import task_experiment

    task = NanoChatTask(NANOCHAT_DIR, TINY, export_dir=str(tmp_path / "base_checkpoints"))
    summaries = task_experiment.run_methods(task, ["ringmaster", "sync"], clock=clock, num_workers=8, profile="linear",
                                            seconds=60.0, out=str(tmp_path), batch_size=4, eval_every=5.0)
    ring, sync = summaries["ringmaster"], summaries["sync"]
    sync_time = sync["target"]["first_hit_s"]  # when sync itself first reached its final value
    assert ring["target"]["sustained_s"] is not None
    assert ring["target"]["sustained_s"] <= 0.5 * sync_time, (ring["target"], sync["target"])
    # the exported checkpoint loads with NanoChat's own checkpoint manager
    import torch
    from nanochat.checkpoint_manager import build_model

    model, _, meta = build_model(ring["exported"], ring["updates"], torch.device("cpu"), phase="eval")
    assert meta["step"] == ring["updates"] and meta["model_config"]["n_layer"] == 2
    assert sum(p.numel() for p in model.parameters()) > 0
