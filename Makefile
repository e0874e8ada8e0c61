# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch first, then kdpipe (editable, with the test extra), then run.
#
# Which torch: version TORCH_SPEC, build from TORCH_INDEX. By default the CPU build: on Linux,
# PyPI's torch wheels are CUDA builds of several GB, so there TORCH_INDEX is PyTorch's CPU index
# (pip also looks in the other sources it is configured with, e.g. a folder of wheels given by
# find-links); on macOS and Windows PyPI's wheels are the CPU builds, so PyPI is used. torch is
# installed without its dependencies, which the next step takes from PyPI. Another build, on a
# fresh .venv (rm -rf .venv first):
#   make TORCH_INDEX=https://download.pytorch.org/whl/cu128 setup   # CUDA 12.8 (pytorch.org lists the others)
#   make TORCH_INDEX= setup                                          # PyPI's build (CUDA on Linux)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ifeq ($(shell uname -s),Linux)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
TORCH_INDEX_ARGS = $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-deps $(TORCH_INDEX_ARGS) "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kdpipe demo --out runs/demo

test: setup
	$(VENV)/bin/python -m pytest -q
