# Two entry points for a fresh machine: `make demo` and `make test` (`make test-fast` while developing).
# Both create .venv, install the locked dependencies, then kdpipe itself (editable), then run.
#
# Locked install (the default on Linux x86_64; what CI runs): every package, pip and torch
# included, comes from locks/cpu-dev.txt with `pip install --require-hashes`: exact versions, and
# pip refuses any file whose sha256 is not in the lock. torch is the CPU build 2.13.0+cpu, taken
# first and alone from PyTorch's CPU index TORCH_INDEX (pip also looks in the other sources it is
# configured with, e.g. a folder of wheels given by find-links); the rest from PyPI. Then kdpipe
# with --no-deps --no-build-isolation, so nothing unhashed is installed. The lock is for CPython
# 3.11 on Linux x86_64 (PYTHON=python3.11 where python3 is another version). The venv records the
# lock it was made from in $(VENV)/kdpipe-lock.txt (tests/test_locks.py compares the venv with it).
#
# Unlocked install (LOCK= , the default on other systems): torch TORCH_SPEC from TORCH_INDEX,
# then `pip install -e ".[test]"` resolving pyproject.toml's ranges. Another torch build, on a
# fresh .venv (rm -rf .venv first):
#   make LOCK= TORCH_INDEX=https://download.pytorch.org/whl/cu128 setup   # CUDA 12.8 (pytorch.org lists the others)
#   make LOCK= TORCH_INDEX= setup                                          # PyPI's build (CUDA on Linux)
#
# `make lock` refreshes locks/*.txt from pyproject.toml and locks/*.in with uv, keeping the pins
# that still fit; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest releases,
# LOCK_FLAGS="--upgrade-package NAME" one package (see locks/README.md).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ifeq ($(shell uname -s),Linux)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
ifeq ($(shell uname -sm),Linux x86_64)
LOCK ?= locks/cpu-dev.txt
endif
TORCH_INDEX_ARGS = $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: setup demo test test-fast lock

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
ifneq ($(LOCK),)
	@$(VENV)/bin/python -c 'import platform, sys; sys.exit(0 if sys.version_info[:2] == (3, 11) and platform.system() == "Linux" and platform.machine() == "x86_64" else 1)' \
	  || { echo "make: $(LOCK) is for CPython 3.11 on Linux x86_64; use PYTHON=python3.11, or 'make LOCK= ...' to install from pyproject.toml's ranges" >&2; exit 1; }
	awk '/^[^ #]/ { p = /^torch==/ } p' $(LOCK) > $(VENV)/torch-lock.txt
	$(VENV)/bin/pip install --quiet --require-hashes --no-deps $(TORCH_INDEX_ARGS) -r $(VENV)/torch-lock.txt
	$(VENV)/bin/pip install --quiet --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -c 'import hashlib, sys; print(sys.argv[1], hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' $(LOCK) > $(VENV)/kdpipe-lock.txt
else
	rm -f $(VENV)/kdpipe-lock.txt
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-deps $(TORCH_INDEX_ARGS) "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
endif
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kdpipe demo --out runs/demo

# The whole suite, what CI runs (.ci/run). On a 2-core machine it takes about 18 minutes when the
# machine is otherwise idle, and several times longer when other jobs share the cores.
test: setup
	$(VENV)/bin/python -m pytest -q

# While developing: every test but those marked slow (whole demos, torchrun, subprocess pipelines,
# timing bounds), docker (the image build) and packaging (building and installing the wheel).
# Still imports and exercises every module. FAST_MARKERS changes the selection.
FAST_MARKERS ?= not slow and not docker and not packaging
test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "$(FAST_MARKERS)"

# --- locks ------------------------------------------------------------------------------------
# uv resolves from PyPI's metadata without downloading the wheels (the CUDA lock's multi-GB torch
# and nvidia-* wheels included) and writes every file's sha256 that PyPI lists for each pinned
# version. The CPU torch (2.13.0+cpu) is not on PyPI: uv takes it from LOCK_FIND_LINKS, a folder
# holding the cp311 wheel downloaded from PyTorch's CPU index (default /opt/wheels, where this
# project's machines keep it), and hashes that file.
# uv: this version, installed into build/lock-tools on first use; UV=uv takes the one on PATH.
UV_VERSION ?= 0.13.9
UV ?= build/lock-tools/bin/uv
LOCK_INDEX ?= https://pypi.org/simple
LOCK_FIND_LINKS ?= /opt/wheels
LOCK_TARGET = --python-version 3.11 --python-platform x86_64-manylinux_2_28
LOCK_FLAGS ?=
UV_COMPILE = $(UV) pip compile --quiet --generate-hashes $(LOCK_FLAGS) $(LOCK_TARGET) \
	--index-url $(LOCK_INDEX) --custom-compile-command "make lock"

build/lock-tools/bin/uv:
	$(PYTHON) -m venv build/lock-tools
	build/lock-tools/bin/pip install --quiet "uv==$(UV_VERSION)"

lock: $(filter build/lock-tools/bin/uv,$(UV))
	$(UV_COMPILE) --find-links $(LOCK_FIND_LINKS) pyproject.toml locks/cpu-dev.in --extra test -o locks/cpu-dev.txt
	$(UV_COMPILE) --find-links $(LOCK_FIND_LINKS) pyproject.toml locks/image-cpu.in -o locks/image-cpu.txt
	$(UV_COMPILE) pyproject.toml locks/image-cuda.in -o locks/image-cuda.txt
