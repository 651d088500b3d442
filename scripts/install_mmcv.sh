#!/usr/bin/env bash
# Optional extra: build mmcv-full 1.7.2 from its PyPI source into .venv, to cross-check our DCNv2 and
# deformable attention against mmcv's ops (tests/test_student_ops.py picks them up when importable).
# mmcv 1.7.2's setup.py compiles with -std=c++14 while current torch headers need C++20: the flag is raised
# in a temporary copy of the source. CPU ops always; CUDA ops too where nvcc and a CUDA torch are present.
# Takes roughly 10-60 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -m pip install -q "setuptools<70" wheel addict yapf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PY -m pip download -q --no-deps --no-build-isolation "mmcv-full==1.7.2" -d "$tmp"
tar xzf "$tmp"/mmcv-full-1.7.2.tar.gz -C "$tmp"
sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$tmp"/mmcv-full-1.7.2/setup.py
(cd "$tmp"/mmcv-full-1.7.2 && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" \
    "$OLDPWD/$PY" -m pip wheel --no-build-isolation --no-deps . -w "$tmp/wheel")
$PY -m pip install --no-deps "$tmp"/wheel/mmcv_full-*.whl
$PY -c "import mmcv, mmcv.ops; print('mmcv-full', mmcv.__version__, 'with ops')"
