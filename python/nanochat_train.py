"""Run NanoChat's ``scripts.base_train`` with RingmasterMuonAdamW in place of its MuonAdamW.

No edit to NanoChat: ``nanochat.gpt.MuonAdamW`` (what ``GPT.setup_optimizer`` calls) is
replaced, then the script runs as ``python -m scripts.base_train`` would, from the
checkout given by ``--nanochat-dir``, with every argument after ``--`` passed to it.

    python python/nanochat_train.py --nanochat-dir ~/nanochat -- --depth=4 --device-type=cpu
    torchrun --nproc_per_node=8 python/nanochat_train.py --nanochat-dir ~/nanochat -- --depth=20

base_train needs NanoChat's prepared data (parquet shards, trained tokenizer) and its
dependencies installed; this launcher adds nothing to that.

Under torchrun on a CPU, NanoChat creates no process group (it does so only on CUDA), so
every rank would silently train its own model. This launcher then sets up Gloo itself
before base_train starts: ranks read their own data slices and RingmasterMuonAdamW
averages the gradients over the group, so they train one model.
"""
import argparse
import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ringmaster_kernels.integrations.nanochat import EXTRAS, install  # noqa: E402


def device_type(script_args: list[str]) -> str:
    """base_train's ``--device-type`` (``""``: autodetect, CUDA when available)."""
    for i, arg in enumerate(script_args):
        if arg.startswith("--device-type="):
            return arg.split("=", 1)[1]
        if arg == "--device-type" and i + 1 < len(script_args):
            return script_args[i + 1]
    return ""


def join_gloo_if_cpu(script_args: list[str]) -> None:
    """Under torchrun with a non-CUDA device, initialise a Gloo process group (see the module doc)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    kind = device_type(script_args) or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return  # NanoChat's compute_init creates the NCCL group itself
    if kind != "cpu":
        raise SystemExit(f"nanochat_train: torchrun with --device-type={kind}: only cpu (Gloo) and cuda (NCCL) "
                         "can average gradients across ranks; refusing to train independent models")
    dist.init_process_group("gloo")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanochat-dir", required=True, help="root of a NanoChat checkout")
    parser.add_argument("--without", action="append", default=[], choices=[*EXTRAS, "all"],
                        help="turn a NanoChat extra off in the muon groups (repeatable; 'all' gives plain Muon)")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--nonfinite", default="skip", choices=["skip", "raise", "ignore"])
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then base_train's own arguments")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.nanochat_dir)
    if not os.path.isfile(os.path.join(root, "scripts", "base_train.py")):
        parser.error(f"--nanochat-dir: {root} has no scripts/base_train.py")
    rest = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    off = EXTRAS if "all" in args.without else args.without
    options = {key: False for key in off}
    if args.backend != "auto":
        options["backend"] = args.backend
    if args.nonfinite != "skip":
        options["nonfinite"] = args.nonfinite
    sys.path.insert(0, root)
    join_gloo_if_cpu(rest)
    install(**options)
    sys.argv = [os.path.join(root, "scripts", "base_train.py"), *rest]
    runpy.run_module("scripts.base_train", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
