#!/usr/bin/env bash
# Regenerates the Python gRPC code for proto/ into lstmserve/ (one copy, package-qualified imports).
# Usage: scripts/gen_proto.sh [OUTPUT_ROOT]   (default: the repository root; tests pass a temp dir)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
py="${PYTHON:-python}"
mkdir -p "$out/lstmserve/v1"
"$py" -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/proto/lstmserve/v1/lstmserve.proto"
