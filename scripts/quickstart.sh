#!/usr/bin/env bash
# Install, then run the main job on bundled synthetic data: synthetic nuScenes -> shards -> train the tiny
# student with the live teacher (RANDOM teacher weights: no weights can be downloaded) -> zero-shot eval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
DATA=data/synthetic_nuscenes
SHARDS=data/synthetic_shards
echo "== 1/5 synthetic nuScenes (real on-disk format) -> $DATA"
$PY scripts/make_synthetic_nuscenes.py --out "$DATA" --seed 0
echo "== 2/5 shards -> $SHARDS"
$PY scripts/build_shards.py --dataroot "$DATA" --version v1.0-mini --splits train val --out "$SHARDS" \
    --workers 2 --samples-per-shard 4
echo "== 3/5 train configs/tiny.yaml (CPU, a few minutes)"
cat <<'MSG'
############################################################################################################
#  QUICK START: the teacher has RANDOM weights and the eval uses RANDOM text embeddings.                   #
#  This run shows that the pipeline works end to end. Its numbers mean nothing.                             #
#  Real weights: see README.md "Weights" (convert the released checkpoints with scripts/convert_weights.py).#
############################################################################################################
MSG
$PY scripts/train.py --config configs/tiny.yaml --resume   # --resume: a second quick start continues the first
echo "== 4/5 zero-shot evaluation on the synthetic val split"
$PY scripts/eval.py --config configs/tiny.yaml --weights runs/tiny/student.safetensors --random-text-embeddings
echo "== 5/5 picture of the predicted occupancy (cameras with the teacher's targets, top views, 3D)"
$PY scripts/visualize.py --config configs/tiny.yaml --weights runs/tiny/student.safetensors \
    --random-text-embeddings --teacher --index 0 --out runs/tiny/sample_val_0.png
echo "quick start done: runs/tiny/ holds the log, checkpoints, student.safetensors, the eval JSON and a PNG"
