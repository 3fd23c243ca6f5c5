"""The Makefile's choice of interpreter and its stamp, read from ``make -n`` (nothing runs)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(cwd: str, *argv: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON", "MAKEFLAGS", "MAKELEVEL")}
    done = subprocess.run(["make", "-n", *argv], cwd=cwd, env={**environ, **env}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def tree(tmp_path):
    """The Makefile and the files its stamp depends on, in a folder of its own."""
    shutil.copy(os.path.join(ROOT, "Makefile"), tmp_path)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc", ignore=shutil.ignore_patterns("build"))
    return tmp_path


def test_without_a_venv_the_project_venv_is_made_and_used(tree):
    out = dry_run(str(tree), "demo")
    assert "-m venv .venv" in out
    assert ".venv/bin/python -m pip install" in out
    assert ".venv/bin/python -m ringmaster_kernels.cli train --out runs/demo" in out


def test_an_active_venv_or_python_is_used_as_it_is(tree):
    out = dry_run(str(tree), "test", VIRTUAL_ENV="/opt/myenv")
    assert "/opt/myenv/bin/python -m pytest" in out and "-m venv" not in out
    out = dry_run(str(tree), "demo", "PYTHON=/usr/local/bin/python3.12")
    assert "/usr/local/bin/python3.12 -m ringmaster_kernels.cli train" in out and "-m venv" not in out


def test_nothing_is_installed_again_until_a_build_input_changes(tree):
    assert "pip install" in dry_run(str(tree), "install", "PYTHON=/p/python")
    stamp = tree / "build" / ("installed" + os.path.abspath("/p/python").replace("/", "_"))
    stamp.parent.mkdir()
    stamp.touch()
    future = time.time() + 100  # newer than every input, without waiting for the clock
    os.utime(stamp, (future, future))
    assert "pip install" not in dry_run(str(tree), "install", "PYTHON=/p/python")
    os.utime(tree / "csrc" / "bindings.cpp", (future + 1, future + 1))
    assert "pip install" in dry_run(str(tree), "install", "PYTHON=/p/python")
