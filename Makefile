# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stepcache-setup

.PHONY: setup demo calibrations bench test test-fast lint typecheck format

$(STAMP): pyproject.toml scripts/setup.sh benchmarks/requirements.txt
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/stepcache demo --out stepcache-demo

# Regenerate the calibrations shipped with the reference model (one command each).
calibrations: $(STAMP)
	$(BIN)/stepcache calibrate reference --scheduler ddim --steps 50 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 4 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/ddim-50.json
	$(BIN)/stepcache calibrate reference --scheduler dpm --steps 20 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 4 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/dpm-20.json
	$(BIN)/stepcache calibrate reference --model flow --scheduler flow-euler --steps 20 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 4 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/flow-euler-20.json
	$(BIN)/stepcache calibrate reference --model flow --scheduler flow-euler --steps 50 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 4 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/flow-euler-50.json

# The committed benchmark run (suite A quality vs peers, suite B speed): ~1 h on 2 CPU cores.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts benchmarks
	$(BIN)/ruff format src tests scripts benchmarks

typecheck: $(STAMP)
	$(BIN)/python -m mypy

# Everything: lint, types, every test (what CI runs). `make test-fast` skips the tests marked slow.
test: lint typecheck
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"
