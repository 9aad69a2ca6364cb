#!/usr/bin/env bash
# The main job end to end on Spark local[*]: make data, train_model, compute_codes, recall.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
SPARK_SUBMIT="$VENV/bin/spark-submit"
OUT=${OUT:-demo-out}
export SPARK_LOCAL_IP=${SPARK_LOCAL_IP:-127.0.0.1}
export PYSPARK_PYTHON="$PWD/$PY" PYSPARK_DRIVER_PYTHON="$PWD/$PY"
export SPARK_CONF_DIR="$PWD/conf"
rm -rf "$OUT"
echo "== 1/4 make data"
"$PY" scripts/demo_data.py make --out "$OUT"
echo "== 2/4 spark-submit spark/train_model.py (local[*])"
"$SPARK_SUBMIT" spark/train_model.py --data "$OUT/data.txt" --V 16 --M 8 --seed 1 \
  --model_proto "$OUT/model.lopq" --model_pkl "$OUT/model.pkl"
echo "== 3/4 spark-submit spark/compute_codes.py"
"$SPARK_SUBMIT" --files "$OUT/model.lopq" spark/compute_codes.py --data "$OUT/data.txt" \
  --output "$OUT/codes" --model_proto model.lopq
head -n 3 "$OUT/codes/part-00000"
echo "== 4/4 recall of the codes against exact neighbours"
"$PY" scripts/demo_data.py report --out "$OUT"
