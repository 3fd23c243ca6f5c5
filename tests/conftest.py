"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors through the interpreter; the
variable must be set before anything imports triton, hence here, at collection.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Where kernel tests run: the GPU when there is one, else the CPU via TRITON_INTERPRET.
KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(params=["default", "tiny"])
def tiles(request, monkeypatch):
    """Default LMO-kernel tiles, and tiny ones so every tensor spans many tiles (atomics across tiles)."""
    if request.param == "tiny":
        from ringmaster_kernels.kernels import lmo as lmo_kernels  # triton: only after TRITON_INTERPRET is set

        monkeypatch.setattr(lmo_kernels, "_TILE_INTERPRET", 32)
        monkeypatch.setattr(lmo_kernels, "_TILE", 32)
        monkeypatch.setattr(lmo_kernels, "_MAX_BC", 4)
    return request.param


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test. ``_thread.interrupt_main`` (our Ctrl-C)
    does nothing when SIGINT is not handled by Python, and a shell starts background jobs
    with SIGINT ignored (e.g. `make test &`), which Python then keeps: without this such
    a run would wait for a Ctrl-C that never comes."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def kernel_device() -> torch.device:
    return KERNEL_DEVICE


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` filled with NaN, so unwritten outputs show up."""
    return torch.full_like(t, float("nan"))
