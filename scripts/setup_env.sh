#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras; skips the install when .venv
# already holds this checkout, installed from this very pyproject.toml (delete .venv, or set POP3D_REINSTALL=1,
# to reinstall).
# pip resolves a matching torch + torchvision pair from PyPI (a few GB, a couple of minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CHECK='import pathlib, torch, torchvision, open_clip, nuscenes, webdataset, pop3d
assert pathlib.Path(pop3d.__file__).resolve().parents[1] == pathlib.Path.cwd().resolve(), "another checkout"
print(f"env ok: torch {torch.__version__}, torchvision {torchvision.__version__}")'
STAMP=.venv/pop3d-installed-from.sha256   # sha256 of the pyproject.toml the last install used
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -z "${POP3D_REINSTALL:-}" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] \
   && .venv/bin/python -c "$CHECK" 2>/dev/null; then
  echo "(.venv already set up for this checkout: no install)"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "$CHECK"
echo "$WANT" > "$STAMP"
