#!/usr/bin/env bash
# Triton's perf_analyzer against a running `lstmserve serve`, over the Open Inference Protocol: one
# concurrency sweep per mode (streaming, async, sync), single-token requests of long sequences, one
# CSV per mode and level in OUT. The figures in docs/benchmarks.md ("perf_analyzer") come from it.
#
# Usage: scripts/oip_perf_sweep.sh HOST:PORT MODEL OUT [LEVELS]   (LEVELS default "1 4 16 64 256")
# Needs scripts/install_perf_analyzer.sh first (or PERF_ANALYZER=path). Each level measures 3 s
# windows until three agree within 50% (at most 10).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="$1"
model="$2"
out="$3"
levels="${4:-1 4 16 64 256}"
perf_analyzer="${PERF_ANALYZER:-$root/.perf-analyzer/perf_analyzer}"
mkdir -p "$out"
# Single tokens, drawn from the first 60 ids of the vocabulary (every model of `lstmserve export` has them).
python3 -c 'import json; print(json.dumps({"data": [{"tokens": [1 + (i * 7) % 60]} for i in range(100)]}))' > "$out/tokens.json"
for mode in streaming async sync; do
  for level in $levels; do
    "$perf_analyzer" -m "$model" -i grpc -u "$target" "--$mode" \
      --input-data "$out/tokens.json" --shape tokens:1 \
      --sequence-length 1000 --sequence-id-range 1:1000000 \
      --concurrency-range "$level:$level" \
      --measurement-interval 3000 --stability-percentage 50 --max-trials 10 \
      -f "$out/$mode-$level.csv" > "$out/$mode-$level.log" 2>&1 \
      || { echo "perf_analyzer --$mode at concurrency $level failed: see $out/$mode-$level.log" >&2; exit 1; }
    echo "$mode $level: $(grep -m1 'Throughput' "$out/$mode-$level.log" | sed 's/^ *//')"
  done
done
