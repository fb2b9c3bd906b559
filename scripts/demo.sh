#!/usr/bin/env bash
# The main job end to end: export the default model if it is missing.
set -euo pipefail
PY="${PYTHON:-python}"
LSTMSERVE="$(dirname "$PY")/lstmserve"
MODEL_DIR="${LSTMSERVE_MODEL_DIR:-models/default}"
if [ ! -f "$MODEL_DIR/model.onnx" ]; then
  "$LSTMSERVE" export --out "$MODEL_DIR"
else
  echo "model already exported: $MODEL_DIR/model.onnx"
fi
