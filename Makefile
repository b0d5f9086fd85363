# The README's two commands. Each sets up .venv on a fresh machine (idempotent, so a second
# run reinstalls nothing) and then does its job.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED = 0
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel; an unpinned resolve would pull CUDA packages
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedcredit demo --out demo-output

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/fedcredit bench datagen --borrowers 1000000 --json

clean:
	rm -rf $(VENV) demo-output .pytest_cache fedcredit.egg-info
