"""The README's code blocks run as written.

Python blocks are executed, each on its own in a fresh namespace and an empty folder (a
block that needs a NanoChat checkout, i.e. imports ``nanochat``, is skipped without
one). Shell blocks are checked without running them (they train for minutes): every
``make`` target exists, every ``ringmaster`` command line parses, and every script named
exists and accepts each flag given to it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest

from ringmaster_kernels.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of ``language``."""
    with open(README) as fh:
        text = fh.read()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def commands(code: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


PYTHON_BLOCKS = blocks("python")
SHELL_COMMANDS = [(line, command) for line, code in blocks("bash") for command in commands(code)]


def test_the_readme_has_the_blocks_this_test_checks():
    assert len(PYTHON_BLOCKS) >= 6 and len(SHELL_COMMANDS) >= 10


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code, tmp_path, monkeypatch):
    if re.search(r"^\s*(from|import) nanochat\b", code, re.M) and importlib.util.find_spec("nanochat") is None:
        pytest.skip("the block needs a NanoChat checkout on sys.path")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


@lru_cache(maxsize=None)
def script_help(script: str) -> str:
    """``--help`` of a script path, or of a module given as ``-m name``."""
    target = ["-m", script[3:]] if script.startswith("-m ") else [script]
    done = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script} --help failed:\n{done.stderr}"
    return done.stdout


def check_script(script: str, argv: list[str]) -> None:
    path = script[3:].replace(".", "/") + ".py" if script.startswith("-m ") else script
    assert os.path.isfile(os.path.join(ROOT, path)), f"{script} does not exist"
    own = argv[:argv.index("--")] if "--" in argv else argv  # after "--": NanoChat's own flags
    flags = {arg.split("=", 1)[0] for arg in own if arg.startswith("--")}
    help_text = script_help(script)
    missing = sorted(flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", help_text))
    assert not missing, f"{script} has no {missing}"


def check_cli(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`ringmaster {' '.join(argv)}` does not parse (exit {exc.code})")


def check_make(target: str) -> None:
    with open(os.path.join(ROOT, "Makefile")) as fh:
        assert re.search(rf"^{re.escape(target)}:", fh.read(), re.M), f"the Makefile has no target {target!r}"


@pytest.mark.parametrize("line,command", SHELL_COMMANDS, ids=[f"line{line}-{c.split()[0]}" for line, c in SHELL_COMMANDS])
def test_shell_command_exists(line, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a --plot path is checked for writability where it would be written
    argv = shlex.split(command)
    program, rest = argv[0], argv[1:]
    if program == "make":
        for target in rest:
            check_make(target)
    elif program == "ringmaster":
        check_cli(rest)
    elif program in ("python", "python3", "torchrun"):
        while rest and program == "torchrun" and rest[0].startswith("--") and rest[0] != "-m":
            rest = rest[2:] if "=" not in rest[0] else rest[1:]  # torchrun's own options
        if rest[:2] == ["-m", "ringmaster_kernels.cli"]:
            check_cli(rest[2:])
        elif rest[:2] == ["-m", "pytest"]:
            assert all(os.path.exists(os.path.join(ROOT, p)) for p in rest[2:] if not p.startswith("-")), command
        elif rest[0] == "-m":
            check_script(f"-m {rest[1]}", rest[2:])  # a module of this package run as a program
        else:
            check_script(rest[0], rest[1:])
    else:
        pytest.fail(f"README.md:{line}: no check for `{command}`; teach tests/test_readme.py this program")
