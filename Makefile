# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stepcache-setup
# The ComfyUI tests run in an environment of their own (ComfyUI needs a torchvision that matches its torch):
# scripts/setup_comfyui.sh makes it from tests/comfyui/requirements.txt.
COMFY_VENV ?= .venv-comfyui
COMFY_STAMP := $(COMFY_VENV)/.stepcache-setup

.PHONY: setup setup-comfyui demo calibrations bench test test-fast test-all test-comfyui lint typecheck format

$(STAMP): pyproject.toml scripts/setup.sh benchmarks/requirements.txt
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	touch $@

setup: $(STAMP)

$(COMFY_STAMP): pyproject.toml scripts/setup_comfyui.sh tests/comfyui/requirements.txt
	PYTHON=$(PYTHON) VENV=$(COMFY_VENV) bash scripts/setup_comfyui.sh
	touch $@

setup-comfyui: $(COMFY_STAMP)

demo: $(STAMP)
	$(BIN)/stepcache demo --out stepcache-demo

# Regenerate the calibrations shipped with the reference model (one command each).
calibrations: $(STAMP)
	$(BIN)/stepcache calibrate reference --scheduler ddim --steps 50 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 5 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/ddim-50.json
	$(BIN)/stepcache calibrate reference --scheduler dpm --steps 20 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 5 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/dpm-20.json
	$(BIN)/stepcache calibrate reference --model flow --scheduler flow-euler --steps 20 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 5 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/flow-euler-20.json
	$(BIN)/stepcache calibrate reference --model flow --scheduler flow-euler --steps 50 --samples 16 --batch 10 --guidance-scale 1.0 --lookahead 5 --sensitivity 5 --sensitivity-samples 2 -o src/stepcache/reference/calibrations/flow-euler-50.json

# The committed benchmark run (suite A quality vs peers, suite B speed): ~1 h on 2 CPU cores.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks comfyui-stepcache
	$(BIN)/ruff format --check src tests scripts benchmarks comfyui-stepcache
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts benchmarks comfyui-stepcache
	$(BIN)/ruff format src tests scripts benchmarks comfyui-stepcache

typecheck: $(STAMP)
	$(BIN)/python -m mypy

# The suite on every core (pytest-xdist; tests sharing a module-scoped fixture stay on one worker).
# tests/comfyui runs in its own environment, after it (COMFY_PYTEST); in .venv the tests there skip.
PYTEST := $(BIN)/python -m pytest -n auto --dist loadgroup --ignore=tests/comfyui
COMFY_PYTEST := $(COMFY_VENV)/bin/python -m pytest tests/comfyui

# Lint, types and the test suite (what CI runs): every behaviour, the nightly tests left out (pyproject's
# addopts). `make test-fast` also skips the tests marked slow; `make test-all` runs every test.
test: lint typecheck $(COMFY_STAMP)
	$(PYTEST)
	$(COMFY_PYTEST)

test-fast: $(STAMP) $(COMFY_STAMP)
	$(PYTEST) -m "not slow and not nightly"
	$(COMFY_PYTEST) -m "not slow and not nightly"

test-all: lint typecheck $(COMFY_STAMP)
	$(PYTEST) -m ""
	$(COMFY_PYTEST) -m ""

# The ComfyUI tests alone (real ComfyUI sampling on tiny models of its model classes).
test-comfyui: $(COMFY_STAMP)
	$(COMFY_PYTEST)
