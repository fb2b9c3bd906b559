#!/usr/bin/env bash
# A Docker engine for the container tests (tests/test_containers_run.py), on a Debian bookworm machine run
# as root without systemd that reaches Debian's package archive but no container registry.
#
#   bash scripts/docker_engine.sh start    # install the engine if missing, start dockerd, build the base image
#   bash scripts/docker_engine.sh stop     # stop the dockerd this script started (by its PID)
#   bash scripts/docker_engine.sh status   # exit 0 when an engine answers
#
# start (when an engine already answers, only step 3 is done; otherwise root is needed):
# 1. Installs Debian's docker.io, docker-cli, docker-compose (Compose v2) and docker-buildx when `docker
#    compose`, buildx or `dockerd` is missing. Bookworm has only Compose v1 and no buildx, so these four .debs come
#    from trixie, fetched through a private apt configuration (the system's sources stay bookworm-only);
#    their dependencies (containerd, runc, tini, iptables) come from bookworm. All need only libc6 >= 2.34.
# 2. Sets net.ipv4.ip_forward=1 and starts dockerd by hand (no systemd), unless an engine already answers.
#    ip_forward first: otherwise dockerd sets the host's iptables FORWARD policy to DROP.
# 3. Builds the base image local/debian:bookworm (scripts/docker_base_image.sh, which installs mmdebstrap
#    if needed) unless the engine has it.
#
# An engine this script did not start is used as it is and never stopped by `stop`.
# Adapted from shared/docker-local-engine.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PID_FILE=${LSTMSERVE_DOCKERD_PID_FILE:-/var/run/lstmserve-dockerd.pid}
LOG=${LSTMSERVE_DOCKERD_LOG:-/tmp/lstmserve-dockerd.log}

log() { printf 'docker_engine: %s\n' "$*" >&2; }

# The Debian archive this machine's apt already uses (its URIs: or deb lines; nothing hard-coded).
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  grep -rhE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -1 || true
}

install_engine() {
  local mirror t
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || { log "set DEBIAN_MIRROR to a Debian archive URL (ending in /debian)"; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  log "installing the Docker engine from Debian ($mirror)"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends iptables ca-certificates >/dev/null
  t=/tmp/lstmserve-trixie-apt
  mkdir -p "$t/lists/partial" "$t/cache/archives/partial" "$t/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$t/sources.list"
  local apt_opts=(-o "Dir::Etc::SourceList=$t/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o "Dir::State::Lists=$t/lists" -o "Dir::Cache=$t/cache")
  apt-get "${apt_opts[@]}" update -qq
  # apt-get download as root warns that the download is unsandboxed: harmless.
  (cd "$t/debs" && rm -f ./*.deb && apt-get "${apt_opts[@]}" download docker.io docker-cli docker-compose docker-buildx 2>/dev/null)
  apt-get install -y -qq --no-install-recommends "$t"/debs/*.deb >/dev/null
}

engine_answers() { docker info >/dev/null 2>&1; }

# Starts dockerd and waits up to 90 s for it to answer; on a busy machine dockerd sometimes gives up on
# the containerd it starts ("timeout waiting for containerd to start") and exits: that try fails, and
# whatever it left running is stopped.
start_dockerd() {
  local pid
  setsid nohup dockerd --pidfile "$PID_FILE" >"$LOG" 2>&1 </dev/null &
  pid=$!
  for _ in $(seq 90); do
    engine_answers && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  log "dockerd did not answer (it $(kill -0 "$pid" 2>/dev/null && echo 'still runs after 90 s' || echo exited))"
  tail -3 "$LOG" >&2
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  pkill -TERM -f '^containerd --config /var/run/docker/containerd/containerd.toml' 2>/dev/null || true
  rm -f "$PID_FILE"
  return 1
}

start() {
  if engine_answers; then
    log "an engine is already running: using it"
    docker compose version >/dev/null 2>&1 || { log "that engine's docker CLI has no compose plugin (Compose v2)"; exit 2; }
  else
    if [ "$(id -u)" -ne 0 ]; then
      log "no engine answers, and installing and starting dockerd needs root (CI and this project's machines"
      log "run as root); elsewhere start Docker as usual (or set DOCKER_HOST) and run this script again"
      exit 2
    fi
    if ! command -v dockerd >/dev/null 2>&1 || ! docker compose version >/dev/null 2>&1 \
        || ! docker buildx version >/dev/null 2>&1; then
      install_engine
    fi
    sysctl -qw net.ipv4.ip_forward=1
    start_dockerd || start_dockerd || start_dockerd \
      || { log "dockerd did not start in 3 tries; its last log: $LOG"; tail -20 "$LOG" >&2; exit 1; }
    log "dockerd started (PID $(cat "$PID_FILE"), log $LOG)"
  fi
  docker info --format 'engine {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}' >&2
  docker compose version >&2
  bash scripts/docker_base_image.sh
}

stop() {
  if [ ! -s "$PID_FILE" ]; then log "no dockerd started by this script (no $PID_FILE)"; return 0; fi
  local pid
  pid=$(cat "$PID_FILE")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then log "dockerd (PID $pid) still runs 60 s after SIGTERM"; exit 1; fi
    log "dockerd (PID $pid) stopped"
  fi
  rm -f "$PID_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) engine_answers ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
