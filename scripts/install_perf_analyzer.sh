#!/usr/bin/env bash
# Installs NVIDIA Triton's perf_analyzer into .perf-analyzer/ (or DEST), for tests/test_oip.py and the
# perf_analyzer figures in docs/benchmarks.md. No GPU is needed.
#
# perf_analyzer ships as a binary inside the tritonclient 2.51.0 wheel (later wheels leave it out).
# It goes into a folder of its own with `pip install --target`, never into .venv: lstmserve pins
# tritonclient 2.73.0 and protobuf 7 there. The binary links against Debian's libb64 (libb64-0d) and
# CUDA's runtime library (libcudart.so.12, from the nvidia-cuda-runtime-cu12 wheel), so a wrapper,
# DEST/perf_analyzer, puts that wheel's lib folder on LD_LIBRARY_PATH and runs it.
#
# Usage: scripts/install_perf_analyzer.sh [DEST]   (PYTHON: the interpreter whose pip installs; default .venv/bin/python)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/.perf-analyzer}"
py="${PYTHON:-$root/.venv/bin/python}"
TRITONCLIENT_VERSION=2.51.0
CUDA_RUNTIME_VERSION=12.9.79

if [ -x "$dest/perf_analyzer" ] && "$dest/perf_analyzer" --version 2>/dev/null | grep -q "Version $TRITONCLIENT_VERSION"; then
  echo "perf_analyzer $TRITONCLIENT_VERSION is already in $dest"
  exit 0
fi

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi

"$py" -m pip install --quiet --no-deps --upgrade --target "$dest" \
  "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME_VERSION"

cat > "$dest/perf_analyzer" <<'EOF'
#!/bin/sh
# Runs the perf_analyzer of tritonclient 2.51.0 with CUDA's runtime library on the loader's path.
here="$(dirname "$(readlink -f "$0")")"
LD_LIBRARY_PATH="$here/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/perf_analyzer" "$@"
EOF
chmod +x "$dest/perf_analyzer"
"$dest/perf_analyzer" --version
