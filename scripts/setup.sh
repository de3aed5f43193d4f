#!/usr/bin/env bash
# Set up a virtual environment with stepcache and everything its demo, tests and benchmarks need.
#
# The benchmark peers (dit-smoothcache, cache-dit) are no extra of the package: they come from
# benchmarks/requirements.txt, installed after the package so the side-by-side tests and `make bench`
# run; they cannot change torch either (see below).
#
# torch: a torch that is already importable (from the venv, or the base interpreter seen through
# --system-site-packages) is kept exactly as it is: a constraint pins it while the rest installs, so
# pip can neither upgrade nor downgrade it. Only when there is no torch at all is `torch==2.13.0`
# installed; set TORCH_INDEX_URL to PyTorch's CPU wheel index to make sure that is the CPU build
# (a bare `torch` from the default index can pull several GB of CUDA packages).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
BENCH_REQUIREMENTS=${BENCH_REQUIREMENTS-benchmarks/requirements.txt}  # set empty to skip the peers

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: no torch found; installing the CPU build torch==2.13.0"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
echo "setup: using torch $TORCH_VERSION"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"
"${PIP[@]}" -c "$constraints" -e ".[$EXTRAS]"
if [ -n "$BENCH_REQUIREMENTS" ]; then
  "${PIP[@]}" -c "$constraints" -r "$BENCH_REQUIREMENTS"
fi
echo "setup: done ($("$VENV/bin/stepcache" --help >/dev/null && echo 'stepcache CLI ready'))"
