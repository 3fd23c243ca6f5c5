"""Smoke test of ``ringmaster bench optim``: it runs, reports every contestant and sane ratios."""
import json

from ringmaster_kernels.cli import main
from ringmaster_kernels.commands.bench_optim import hidden_shapes


def test_nanochat_like_shapes():
    shapes = hidden_shapes(12, 768)
    assert len(shapes) == 72
    assert sum(r * c for r, c in shapes) == 12 * 12 * 768 ** 2  # 4 d^2 attention + 8 d^2 MLP per layer


def test_bench_optim_json(capsys):
    assert main(["bench", "optim", "--model", "tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                 "--no-compile", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tiny = out["models"]["tiny"]
    assert set(tiny["times"]) == {"ours", "torch_muon"}
    assert all(t["median_s"] > 0 for t in tiny["times"].values())
    assert tiny["ratios"]["torch_muon/ours"] > 0
    assert out["machine"]["device"] == "cpu"
