#!/usr/bin/env bash
# The figures of docs/deployment.md: how long each image takes to build, how big it is, and how long the
# compose setups take to start and stop, on the Docker engine the docker CLI reaches.
#
#   bash scripts/container_times.sh            # prints a Markdown table; build logs in $LOGS
#
# Builds: `docker build --no-cache` of each image on BASE_IMAGE (default local/debian:bookworm, see
# scripts/docker_base_image.sh), so every layer is built again; BuildKit's pip cache mounts stay, unless
# `docker builder prune -af` ran first (then every package is downloaded again: a cold build).
# The export image takes torch from LSTMSERVE_WHEELS_DIR (default /opt/wheels) when it holds the wheel.
# Starts: the CPU compose files with a tiny model (LSTMSERVE_EXPORT_ARGS, default "--preset tiny"), each
# under a project of its own that is removed at the end with its volumes (the images stay).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${LSTMSERVE_BASE_IMAGE:-local/debian:bookworm}
WHEELS=${LSTMSERVE_WHEELS_DIR:-/opt/wheels}
EXPORT_ARGS=${LSTMSERVE_EXPORT_ARGS:---preset tiny}
LOGS=${LOGS:-$(mktemp -d /tmp/lstmserve-times.XXXXXX)}
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
ENVOY_VERSION=1.40.0

rows=()
# timed LABEL COMMAND...: runs the command with its output in $LOGS/LABEL.log, and records its wall time.
timed() {
  local label=$1 start end
  shift
  start=$(date +%s.%N)
  if ! "$@" >"$LOGS/$label.log" 2>&1; then
    echo "container_times: '$label' failed; its log: $LOGS/$label.log" >&2
    tail -20 "$LOGS/$label.log" >&2
    exit 1
  fi
  end=$(date +%s.%N)
  rows+=("| $label | $(python3 -c "print(f'{$end - $start:.1f} s')") |")
}

size() { docker image inspect --format '{{.Size}}' "$1" | python3 -c 'import sys; print(f"{int(sys.stdin.read()) / 1e6:.0f} MB")'; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wheels=$WHEELS
ls "$WHEELS"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 || wheels=docker/wheels

build=(docker build --no-cache --progress=plain --build-arg "BASE_IMAGE=$BASE")
timed "build lstmserve-server:$VERSION-cpu" "${build[@]}" -f docker/server.Dockerfile --target server-cpu \
  -t "lstmserve-server:$VERSION-cpu" .
timed "build lstmserve-export:$VERSION" "${build[@]}" -f docker/export.Dockerfile --target export \
  --build-context "wheels=$wheels" -t "lstmserve-export:$VERSION" .
timed "build lstmserve-redis:$VERSION" "${build[@]}" -f docker/redis.Dockerfile --target redis \
  -t "lstmserve-redis:$VERSION" .
timed "build lstmserve-envoy:$ENVOY_VERSION" "${build[@]}" -f docker/envoy.Dockerfile --target envoy \
  --build-arg "ENVOY_VERSION=$ENVOY_VERSION" -t "lstmserve-envoy:$ENVOY_VERSION" .

# Compose with these settings only: an empty env file stands in for a .env in the repository.
empty_env=$LOGS/empty.env
: >"$empty_env"
export LSTMSERVE_BASE_IMAGE=$BASE LSTMSERVE_WHEELS_DIR=$wheels LSTMSERVE_EXPORT_ARGS=$EXPORT_ARGS
single=(docker compose -p lstmserve-times --env-file "$empty_env" -f docker-compose.yml -f docker-compose.cpu.yml)
scale=(docker compose -p lstmserve-times-scale --env-file "$empty_env"
       -f deploy/compose/docker-compose.scale.yml -f deploy/compose/docker-compose.scale.cpu.yml)
cleanup() {
  "${single[@]}" down --volumes --timeout 30 >/dev/null 2>&1 || true
  "${scale[@]}" down --volumes --timeout 30 >/dev/null 2>&1 || true
}
trap cleanup EXIT
LSTMSERVE_PORT=$(free_port) LSTMSERVE_METRICS_PORT=$(free_port)
LSTMSERVE_PROXY_PORT=$(free_port) LSTMSERVE_ENVOY_ADMIN_PORT=$(free_port)
export LSTMSERVE_PORT LSTMSERVE_METRICS_PORT LSTMSERVE_PROXY_PORT LSTMSERVE_ENVOY_ADMIN_PORT

timed "first up --wait (export $EXPORT_ARGS, then server healthy)" "${single[@]}" up -d --wait
timed "down (SIGTERM, drain, containers removed)" "${single[@]}" down
timed "second up --wait (model in the volume)" "${single[@]}" up -d --wait
timed "scale-out up --wait --scale server=3 (export, Redis, 3 replicas, Envoy)" "${scale[@]}" up -d --wait --scale server=3
timed "scale-out: stop one replica (SIGTERM, drain)" docker stop lstmserve-times-scale-server-1

echo "| step | wall time |"
echo "|------|-----------|"
printf '%s\n' "${rows[@]}"
echo
echo "| image | size |"
echo "|-------|------|"
for image in "lstmserve-server:$VERSION-cpu" "lstmserve-export:$VERSION" "lstmserve-redis:$VERSION" \
    "lstmserve-envoy:$ENVOY_VERSION" "$BASE"; do
  echo "| $image | $(size "$image") |"
done
echo
echo "logs: $LOGS"
