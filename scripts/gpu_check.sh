#!/usr/bin/env bash
# Verifies the CUDA path on a machine with an NVIDIA GPU and onnxruntime-gpu installed:
#  1. ONNX Runtime offers the CUDA execution provider;
#  2. the isolation tests pass with the CUDA provider and device-resident state
#     (served logits vs PyTorch whole-sequence, max abs diff <= 1e-4; TF32 off for fp32 parity);
#  3. a short sweep of `lstmserve bench` runs against `lstmserve serve --providers cuda`
#     (results under results/gpu-check), after `lstmserve info` prints the provider in use.
# Usage: PYTHON=.venv/bin/python scripts/gpu_check.sh [MODEL_DIR]
set -euo pipefail
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export NVIDIA_TF32_OVERRIDE=0 LSTMSERVE_TEST_PROVIDERS=cuda
"$PY" - <<'PYEOF'
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, providers)
if "CUDAExecutionProvider" not in providers:
    raise SystemExit("CUDAExecutionProvider is not available: install lstmserve[gpu] (onnxruntime-gpu)")
PYEOF
"$PY" -m pytest -q tests/test_server_isolation.py tests/test_state_stores.py tests/test_server_sessions.py
MODEL_DIR="${1:-models/gpu-check}"
if [ ! -f "$MODEL_DIR/model.onnx" ]; then
  "$PY" -m lstmserve.cli export --preset tiny --out "$MODEL_DIR" >/dev/null
fi
log="$(mktemp)"
"$PY" -m lstmserve.cli serve --model "$MODEL_DIR/model.onnx" --port 0 --providers cuda >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "serving on" "$log" && break; sleep 0.1; done
grep "serving on\|session state" "$log"
port="$(sed -n 's/.*serving on [^:]*:\([0-9]*\).*/\1/p' "$log" | head -1)"
"$PY" -m lstmserve.cli info --target "127.0.0.1:$port"
"$PY" -m lstmserve.cli bench --model "$MODEL_DIR/model.onnx" --target "127.0.0.1:$port" --series server \
  --levels 1,16,64,256 --duration-s 3 --out results/gpu-check
kill -TERM $pid; wait $pid
