# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install tarflow (runtime dependencies only), tokenize the bundled sample
#   make test   the same .venv plus the test extras, run the test suite
# Both install through constraints.txt, the exact versions tested (`make lock` rewrites it).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# On the development machines ../shared/offline.sh keeps Ray and Hugging Face from reaching the network.
OFFLINE := if [ -f ../shared/offline.sh ]; then . ../shared/offline.sh; fi;

.PHONY: run test bench clean lock

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

test: $(VENV)/.test
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.runtime
	$(OFFLINE) $(PY) bench/tokenize.py

clean:
	rm -rf $(VENV) out .pytest_cache

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
