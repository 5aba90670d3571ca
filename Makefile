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

# --dist loadgroup (no groups are declared): one test at a time to whichever worker is free (xdist's default
# `load` hands out chunks ahead; on the same host on the same day the two took 17 min 26 s and 17 min 48 s)
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/expert_lora.py

clean-venv:
	rm -rf $(VENV)
