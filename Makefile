# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install tarflow (runtime dependencies only), tokenize the bundled sample
#   make test   the same .venv plus the test extras, run the test suite (`make test-cluster`: the heavier group,
#               multi-node simulations and fault injection, which .ci/run runs too)
# Both install through constraints.txt, the exact versions tested (`make lock` rewrites it); `make test-lowest`
# runs the model tests at the lowest transformers of pyproject.toml's range.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# On the development machines ../shared/offline.sh keeps Ray and Hugging Face from reaching the network.
OFFLINE := if [ -f ../shared/offline.sh ]; then . ../shared/offline.sh; fi;

.PHONY: run test test-cluster bench clean lock test-lowest

$(VENV)/.runtime: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e '.[test]'
	touch $@

run: $(VENV)/.runtime
	$(OFFLINE) $(PY) jobs/tokenize_laion.py $(ARGS)

# the suite without the multi-node simulations (under 15 min on 2 cores); .ci/run runs both
test: $(VENV)/.test
	$(OFFLINE) $(PY) -m pytest -q -m "not cluster" --durations=15 $(PYTEST_ARGS)

# the heavier group (marker `cluster`): simulated multi-node clusters (a node removed mid-job, an autoscaler adding
# GPU nodes), fault injection (killed drivers, actors and training workers, failing stages), longer trainer runs,
# second runs of a path `make test` already runs end to end, the GPU check on CPU. `make test` keeps one end-to-end
# run per job, one Ray Train run (the TA-Tok trainer's; the other trainers' data checks, batches and losses run
# without Ray), one stop-and-resume (SIGTERM to a tokenize job), and every check before Ray
test-cluster: $(VENV)/.test
	$(OFFLINE) $(PY) -m pytest -q -m cluster --durations=10 $(PYTEST_ARGS)

bench: $(VENV)/.runtime
	$(OFFLINE) $(PY) -m bench.tokenize

# Re-resolve the newest versions within pyproject.toml's ranges (all extras) in a scratch venv and pin them in
# constraints.txt; then run `make clean test` and commit both. torch's local label (+cpu) is dropped so that
# the pin also admits the CUDA build of the same release. LOCK_TORCH: the CPU wheel on the development machines.
LOCK_TORCH ?= 2.13.0
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q 'torch==$(LOCK_TORCH)' -e '.[test,diffusion]'
	{ echo "# Exact versions of the tested environment, made by \`make lock\`; \`make run/test\` install through it."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt
	rm -rf .venv-lock

# The lowest transformers this machine can install, with the model tests that use it (an overlay folder on
# PYTHONPATH shadows the venv's transformers, tokenizers and huggingface_hub; diffusers is not exercised).
LOWEST_TRANSFORMERS ?= transformers==4.57.3 tokenizers==0.22.2 huggingface_hub==0.36.2
test-lowest: $(VENV)/.test
	rm -rf .venv-lowest && $(PY) -m pip install -q --no-deps --target .venv-lowest $(LOWEST_TRANSFORMERS)
	$(OFFLINE) PYTHONPATH=$$PWD/.venv-lowest $(PY) -m pytest -q -p no:cacheprovider \
	    -m "not cluster" tests/test_tatok.py tests/test_train_tatok.py tests/test_mllm.py tests/test_generation.py

clean:
	rm -rf $(VENV) .venv-lowest out .pytest_cache

# The whole chain on the bundled sample with the RANDOM demo models: tokenize (with the demo pixel VQ and SANA
# VAE), train a tiny Tar MLLM until it gives back the sample's captions, caption, generate, train the AR and SANA
# de-tokenizers and the TA-Tok a few steps; prints where each output is (out/demo/). ARGS="--output DIR" to write
# elsewhere. It adds the `diffusion` extra (diffusers) to .venv for the SANA de-tokenizer's steps.
.PHONY: demo
$(VENV)/.diffusion: $(VENV)/.runtime
	$(PIP) -e '.[diffusion]'
	touch $@

demo: $(VENV)/.diffusion
	$(OFFLINE) $(PY) jobs/demo.py $(ARGS)
