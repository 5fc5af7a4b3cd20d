# dqo_verl: `make demo` and `make test` do all the set-up (a virtualenv in .venv/).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# pip's notices about this machine's optional local package indexes are noise
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install install-gpu test test-fast demo bench-train clean

# CPU install: torch 2.13.0 (CPU wheel) first, then the package, its deps and the test tools.
$(STAMP): pyproject.toml
	set -o pipefail; test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP) install -q torch==2.13.0 $(QUIET)
	set -o pipefail; $(PIP) install -q -e ".[test]" $(QUIET)
	touch $(STAMP)

install: $(STAMP)

# GPU cluster nodes: torch 2.11.0 + vLLM 0.24.0 (what verl 0.9.1 is tested with), then flash-attn.
install-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[gpu,test]"
	$(PIP) install flash-attn --no-build-isolation

test: install
	$(PY) -m pytest -q

# the pure tests only (seconds)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m dqo_verl.demo

# benchmarks (not tests): ratios measured in one run on this machine
bench-train: install
	$(PY) bench/bench_train.py

clean:
	rm -rf outputs
