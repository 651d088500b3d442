#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras.
# pip resolves a matching torch + torchvision pair from PyPI (a few GB, a couple of minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, torchvision, open_clip, nuscenes, webdataset; print(f'env ok: torch {torch.__version__}, torchvision {torchvision.__version__}')"
