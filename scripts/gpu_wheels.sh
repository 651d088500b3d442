#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_suite.py needs on a GPU machine that has torch, torchvision, triton and
# accelerate but no package index (an offline cluster node, a lent H200): the shard loader (webdataset),
# CLIP text (open_clip) and the nuScenes devkit, each with its pure dependencies. Never torch.
#
#   bash scripts/gpu_wheels.sh [DIR=.whl] [PYTHON_VERSION=3.12]
#   python benchmarks/gpu_suite.py --wheels DIR --out benchmarks/results/gpu_suite.json   # on the GPU machine
#
# Versions are the ones this project's venv resolved (pyproject.toml's ranges); one version of each.
set -euo pipefail
dir="${1:-.whl}"
py="${2:-3.12}"
here="$(cd "$(dirname "$0")/.." && pwd)"
pip_py="${PIP_PYTHON:-$here/.venv/bin/python}"
[ -x "$pip_py" ] || pip_py=python3
# name==version from this venv where installed, else the newest
pkgs=(webdataset braceexpand open_clip_torch ftfy wcwidth nuscenes-devkit cachetools descartes fire termcolor
      parameterized pycocotools pyquaternion shapely)
specs=()
for p in "${pkgs[@]}"; do
    v="$("$pip_py" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p' || true)"
    specs+=("${p}${v:+==$v}")
done
mkdir -p "$dir"
plat=()
for n in 2_28 2_27 2_17 2014 1; do
    case $n in 2014|1) plat+=(--platform "manylinux${n}_x86_64");; *) plat+=(--platform "manylinux_${n}_x86_64");; esac
done
"$pip_py" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${plat[@]}" -d "$dir" "${specs[@]}"
echo "wheels in $dir: $(ls "$dir"/*.whl | wc -l) files, $(du -sh "$dir" | cut -f1)"
