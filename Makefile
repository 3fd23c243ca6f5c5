# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
#
# Where things go: a project virtual environment `.venv/` (created on first use, reused
# after), the C++ extension `ringmaster_kernels/_queue*.so`, build files under `build/`,
# demo output under `runs/`. `make clean` removes the build; `make distclean` also `.venv/`
# and `runs/`. Nothing is installed outside this folder.
#
# Which Python: `make PYTHON=/path/to/python ...` uses that interpreter as it is; else an
# active virtual environment ($VIRTUAL_ENV); else `.venv/`, made by the first Python >= 3.10
# on PATH that can create one (Debian's system Python refuses pip installs, PEP 668).
VENV ?= .venv
ifdef PYTHON
PY := $(PYTHON)
else ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(VENV)/bin/python
endif
PIP = $(PY) -m pip
CLI = $(PY) -m ringmaster_kernels.cli
# A CPU wheel of this version lies on disk on our machines; installing it first keeps
# pip from resolving the bare `torch` requirement to a multi-GB CUDA build.
# On a GPU machine: make install TORCH_SPEC=torch  (or any CUDA build already installed).
TORCH_SPEC ?= torch==2.13.0
# What the install builds from: when none of these changed, `make install` does nothing
# (pip would rebuild the extension, about 30 s, every time).
BUILD_INPUTS = setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/ringmaster/*.hpp)
# One stamp per interpreter, so that switching PYTHON= installs into the new one.
STAMP = build/installed$(subst /,_,$(abspath $(PY)))

.PHONY: install demo test bench tsan asan clean distclean

install: $(STAMP)

$(VENV)/bin/python:
	@base=""; for cand in python3 python3.13 python3.12 python3.11 python3.10; do \
	  if command -v $$cand >/dev/null 2>&1 && $$cand -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then \
	    base=$$cand; break; fi; done; \
	if [ -z "$$base" ]; then \
	  echo "make: no Python >= 3.10 with the venv module on PATH (Debian/Ubuntu: apt install python3-venv); or run make PYTHON=/path/to/python" >&2; \
	  exit 1; fi; \
	echo "creating $(VENV) with $$(command -v $$base) ($$($$base -V))"; \
	$$base -m venv $(VENV)

$(STAMP): $(BUILD_INPUTS) $(if $(PYTHON)$(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PIP) install -q --no-build-isolation -e ".[test]"
	@mkdir -p build && touch $@

demo: install
	$(CLI) train --out runs/demo

test: install
	$(PY) -m pytest -q -x tests

bench: install
	$(CLI) bench queue --json

tsan:
	$(MAKE) -C csrc tsan

asan:
	$(MAKE) -C csrc asan

clean:
	rm -rf build *.egg-info ringmaster_kernels/*.so
	$(MAKE) -C csrc clean

distclean: clean
	rm -rf $(VENV) runs
