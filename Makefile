# The two commands: `make run` and `make test`. Both set up .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet -e ".[dev,flower,tensorboard,dp,hf]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/fedmoe run

# three workers on two cores, each test to whichever worker is free (--maxschedchunk 2: xdist's `load` would
# otherwise hand each worker a quarter of the suite ahead); the tests that start processes and wait on them go
# first, the longest first (tests/conftest.py), and a third worker fills the time they leave a core idle
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 3 --dist load --maxschedchunk 2 tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/expert_lora.py

clean-venv:
	rm -rf $(VENV)
