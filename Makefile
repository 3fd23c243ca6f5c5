# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# A CPU wheel of this version lies on disk on our machines; installing it first keeps
# pip from resolving the bare `torch` requirement to a multi-GB CUDA build.
# On a GPU machine: make install TORCH_SPEC=torch  (or any CUDA build already installed).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench tsan asan clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PIP) install -q --no-build-isolation -e ".[test]"

demo: install
	ringmaster train --out runs/demo

test: install
	$(PYTHON) -m pytest -q -x tests

bench: install
	ringmaster bench queue --json

tsan:
	$(MAKE) -C csrc tsan

asan:
	$(MAKE) -C csrc asan

clean:
	rm -rf build *.egg-info ringmaster_kernels/*.so
	$(MAKE) -C csrc clean
