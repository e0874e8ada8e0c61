# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (CPU torch first, so no multi-GB CUDA build is pulled), install kdpipe, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kdpipe demo --out runs/demo

test: setup
	$(VENV)/bin/python -m pytest -q
