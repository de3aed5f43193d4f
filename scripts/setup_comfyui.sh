#!/usr/bin/env bash
# Set up the ComfyUI tests' environment: a second virtual environment (.venv-comfyui) with the torch
# and torchvision ComfyUI imports together, ComfyUI's Python dependencies (tests/comfyui/requirements.txt)
# and stepcache itself (editable). ComfyUI is not on the package index: the tests import the vendored copy
# (../shared/vendor/ComfyUI, or COMFYUI_DIR), which this script only checks for.
#
# Why a second environment: the project's .venv keeps the torch it finds (here a local CPU build), and the
# index's torchvision, built against the index's torch, fails to import beside it. torch==2.14.1 from the
# index is a CUDA build (it runs on CPU); with its CUDA libraries it is about 2.8 GB to download and
# 5.5 GB installed. Set TORCH_INDEX_URL to PyTorch's CPU wheel index where it is reachable to install the
# much smaller CPU build instead.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-comfyui}
COMFYUI_DIR=${COMFYUI_DIR:-../shared/vendor/ComfyUI}
REQUIREMENTS=tests/comfyui/requirements.txt

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -E '^(torch|torchvision)==' "$REQUIREMENTS" >"$constraints"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" -c "$constraints" torch torchvision --index-url "$TORCH_INDEX_URL"
fi
"${PIP[@]}" -c "$constraints" -r "$REQUIREMENTS"
"${PIP[@]}" -c "$constraints" -e .
echo "setup-comfyui: torch $("$PY" -c 'import torch; print(torch.__version__)') in $VENV"
if [ -f "$COMFYUI_DIR/comfy/samplers.py" ]; then
  echo "setup-comfyui: ComfyUI found at $COMFYUI_DIR"
else
  echo "setup-comfyui: no ComfyUI at $COMFYUI_DIR (set COMFYUI_DIR): the ComfyUI tests will skip"
fi
