#!/usr/bin/env bash
# Install, then run the main job on bundled synthetic data: synthetic nuScenes -> shards -> train the tiny
# student with the live teacher (RANDOM teacher weights: no weights can be downloaded) -> zero-shot eval with
# text embeddings from scripts/text_embeddings.py (RANDOM text tower) -> retrieval benchmark -> a picture.
# Re-runnable: a second run reuses the data, the shards and the trained model it made, and says so.
# POP3D_PYTHON=/path/to/python uses an existing environment instead of creating .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${POP3D_PYTHON:-}" ]; then
  PY=$POP3D_PYTHON
else
  bash scripts/setup_env.sh
  PY=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's code, whatever the environment holds
DATA=data/synthetic_nuscenes
SHARDS=data/synthetic_shards
BENCH=data/synthetic_retrieval
RUN=runs/tiny
TEXT=$RUN/text_embeddings_random.safetensors
echo "== 1/7 synthetic nuScenes (real on-disk format) -> $DATA"
$PY scripts/make_synthetic_nuscenes.py --out "$DATA" --seed 0
echo "== 2/7 shards (train, val, test) -> $SHARDS (val with its eval GT for configs/tiny.yaml's 25x25x4 grid)"
# shards of an older schema made by an earlier quick start are rebuilt (--overwrite: the builder's own files only)
OLD=$($PY - "$SHARDS" <<'PY'
import json, sys
from pathlib import Path
from shards.schema import SCHEMA_VERSION
man = Path(sys.argv[1], "manifest.json")
print("--overwrite" if man.is_file() and json.loads(man.read_text()).get("schema_version") != SCHEMA_VERSION else "")
PY
)
if [ -n "$OLD" ]; then echo "$SHARDS holds shards of an older schema: rebuilding them"; fi
$PY scripts/build_shards.py --dataroot "$DATA" --version v1.0-mini v1.0-test --splits train val test \
    --out "$SHARDS" --workers 2 --samples-per-shard 4 --no-progress $OLD \
    --eval-gt-splits val --eval-gt-grid 25 25 4 --eval-gt-range -51.2 -51.2 -5 51.2 51.2 3
echo "== 3/7 train configs/tiny.yaml -> $RUN (CPU, a few minutes)"
cat <<'MSG'
############################################################################################################
#  QUICK START: the teacher has RANDOM weights and the text embeddings come from a RANDOM text tower.      #
#  This run shows that the pipeline works end to end. Its numbers mean nothing.                             #
#  Real weights: see README.md "Weights" (convert the released checkpoints with scripts/convert_weights.py).#
############################################################################################################
MSG
# A finished run of this configuration is reused, an interrupted one resumed; a run of another configuration
# (e.g. made by an older tiny.yaml) is left alone and reported.
STATE=$($PY - "$RUN" <<'PY'
import sys
from pathlib import Path
from pop3d.config import load_config
run = Path(sys.argv[1])
if not (run / "config.yaml").is_file():
    print("new")
elif load_config(run / "config.yaml").model != load_config("configs/tiny.yaml").model:
    print("other")
else:
    print("done" if (run / "student.safetensors").is_file() else "resume")
PY
)
case "$STATE" in
  new) $PY scripts/train.py --config configs/tiny.yaml ;;
  resume) echo "resuming the interrupted run in $RUN"; $PY scripts/train.py --config configs/tiny.yaml --resume ;;
  done) echo "reusing the trained model $RUN/student.safetensors (train.py --overwrite retrains)" ;;
  other) echo "error: $RUN holds a run of another model configuration than configs/tiny.yaml; move it away" \
              "or retrain with: $PY scripts/train.py --config configs/tiny.yaml --overwrite" >&2; exit 2 ;;
esac
echo "== 4/7 text embeddings of the nuScenes classes (scripts/text_embeddings.py, RANDOM text tower) -> $TEXT"
$PY scripts/text_embeddings.py --random --small-random-model --out "$TEXT"
echo "== 5/7 zero-shot evaluation on the synthetic val split"
$PY scripts/eval.py --config configs/tiny.yaml --weights $RUN/student.safetensors --text-embeddings "$TEXT"
echo "== 5b/7 both protocols: POP-3D's ray-cast GT and Occ3D-nuScenes (synthetic Occ3D GT in $DATA/gts)"
$PY scripts/eval.py --config configs/tiny.yaml --weights $RUN/student.safetensors --text-embeddings "$TEXT" \
    --protocol both --occ3d-gt "$DATA" --out $RUN/eval_both.json
echo "== 6/7 open-vocabulary retrieval on a synthetic benchmark in the original format -> $BENCH"
$PY scripts/make_synthetic_retrieval.py --dataroot "$DATA" --out "$BENCH"
$PY scripts/retrieval.py --config configs/tiny.yaml --weights $RUN/student.safetensors --benchmark "$BENCH" \
    --random-queries --out $RUN/retrieval --no-progress
echo "== 7/7 picture of the predicted occupancy (cameras with the teacher's targets, top views, 3D)"
$PY scripts/visualize.py --config configs/tiny.yaml --weights $RUN/student.safetensors \
    --text-embeddings "$TEXT" --teacher --index 0 --out $RUN/sample_val_0.png
echo "== 7b/7 free-text query viewer (HTML that opens offline, and a PNG; RANDOM text tower)"
$PY scripts/query.py --config configs/tiny.yaml --weights $RUN/student.safetensors --random-text-embeddings \
    --text "a parked car" --text "a tree" --index 0 --out $RUN/query_val_0.html
echo "quick start done: $RUN/ holds the log, checkpoints, student.safetensors, the eval JSON, retrieval results" \
     "and a PNG"
