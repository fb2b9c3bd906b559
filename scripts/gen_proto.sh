#!/usr/bin/env bash
# Regenerates the Python gRPC code for proto/ into lstmserve/ (one copy, package-qualified imports).
# Usage: scripts/gen_proto.sh [OUTPUT_ROOT]   (default: the repository root; tests pass a temp dir)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root}"
py="${PYTHON:-python}"
mkdir -p "$out/lstmserve/v1" "$out/lstmserve/inference"
"$py" -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/proto/lstmserve/v1/lstmserve.proto"

# The Open Inference Protocol (package `inference`). Its messages go into a descriptor pool of
# their own, not protobuf's default one, where tritonclient registers the same names.
inference="$out/lstmserve/inference"
"$py" -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/proto/lstmserve/inference/model_config.proto" "$root/proto/lstmserve/inference/grpc_service.proto"
rm -f "$inference/model_config_pb2_grpc.py"  # model_config.proto declares no service
for module in "$inference/model_config_pb2.py" "$inference/grpc_service_pb2.py"; do
  sed -i.bak 's/^from google\.protobuf import descriptor_pool as _descriptor_pool$/from lstmserve.inference import _pool as _descriptor_pool  # not the default pool: see lstmserve.inference/' "$module"
  rm -f "$module.bak"
  grep -q '^from lstmserve.inference import _pool' "$module" || { echo "gen_proto.sh: pool import not found in $module" >&2; exit 1; }
done
