#!/usr/bin/env bash
# `make demo`: export the default model if missing, serve it on a free port, wait for SERVING,
# stream a generation with a latency/throughput summary, then stop the server with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
MODEL_DIR="${LSTMSERVE_MODEL_DIR:-models/default}"
PROMPT="${LSTMSERVE_DEMO_PROMPT:-def }"

if [ -f "$MODEL_DIR/model.onnx" ]; then
  echo "== model already exported: $MODEL_DIR/model.onnx"
else
  echo "== exporting the default model to $MODEL_DIR (about 2 minutes on 2 cores)"
  "$PY" -m lstmserve.cli export --out "$MODEL_DIR"
fi

log="$(mktemp)"
echo "== starting lstmserve serve on a free port"
"$PY" -m lstmserve.cli serve --model "$MODEL_DIR/model.onnx" --port 0 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 600); do
  port="$(sed -n 's/^lstmserve: serving on [^:]*:\([0-9]*\).*/\1/p' "$log" | head -1)"
  [ -n "$port" ] && break
  if ! kill -0 $server 2>/dev/null; then cat "$log"; echo "server failed to start" >&2; exit 1; fi
  sleep 0.1
done
[ -n "$port" ] || { cat "$log"; echo "server did not start in time" >&2; exit 1; }
until "$PY" -m lstmserve.cli health --target "127.0.0.1:$port" >/dev/null 2>&1; do sleep 0.1; done
echo "== server SERVING on 127.0.0.1:$port; streaming a generation from the prompt ${PROMPT@Q}"
echo
"$PY" scripts/demo_stream.py --target "127.0.0.1:$port" --prompt "$PROMPT"
echo
echo "== stopping the server (SIGTERM, graceful drain)"
kill -TERM $server
wait $server
trap 'rm -f "$log"' EXIT
echo "== done"
