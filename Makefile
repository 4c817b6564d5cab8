# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install tarflow, tokenize the bundled sample with the default small TA-Tok
#   make test   create .venv, install tarflow with test extras, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On the development machines ../shared/offline.sh keeps Ray and Hugging Face from reaching the network.
OFFLINE := if [ -f ../shared/offline.sh ]; then . ../shared/offline.sh; fi;

.PHONY: run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(OFFLINE) $(PY) jobs/tokenize_laion.py $(ARGS)

test: $(VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(OFFLINE) $(PY) bench/tokenize.py

clean:
	rm -rf $(VENV) out .pytest_cache

# The whole chain on the bundled sample with the RANDOM demo models (~5 min on 2 CPUs): tokenize (with the demo
# pixel VQ), train a tiny Tar MLLM until it gives back the sample's captions, caption, generate, train the AR
# de-tokenizer a few steps; prints where each output is (out/demo/). ARGS="--output DIR" to write elsewhere.
.PHONY: demo
demo: $(VENV)/.installed
	$(OFFLINE) $(PY) jobs/demo.py $(ARGS)
