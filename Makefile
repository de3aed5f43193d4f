# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stepcache-setup

.PHONY: setup demo test lint format bench

$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/stepcache calibrate tiny-dit --steps 50 --samples 4 -o stepcache-demo/calibration.json --plot stepcache-demo/curves.png
	$(BIN)/stepcache schedule stepcache-demo/calibration.json --compute-fraction 0.5 -o stepcache-demo/schedule.json

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts benchmarks
	$(BIN)/ruff format src tests scripts benchmarks

test: lint
	$(BIN)/python -m pytest
