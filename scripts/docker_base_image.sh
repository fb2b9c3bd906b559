#!/usr/bin/env bash
# The base image of the local container builds: local/debian:bookworm, a minimal Debian bookworm
# (python3 is 3.11, as the machine's torch wheel needs) built from Debian's packages with mmdebstrap,
# so no container registry is needed. It carries this machine's extra CA certificates
# (/usr/local/share/ca-certificates: HTTPS to the package registries goes through a proxy that
# re-signs it) and points pip, requests and OpenSSL at the system bundle, so builds can use pip and apt.
#
#   bash scripts/docker_base_image.sh      # does nothing when the engine already has the image
#
# The root filesystem tarball is kept in $LSTMSERVE_CACHE_DIR (default ~/.cache/lstmserve) and reused
# by later runs (about 1 minute saved); delete it to rebuild from the archive.
set -euo pipefail

IMAGE=${LSTMSERVE_LOCAL_BASE_IMAGE:-local/debian:bookworm}
SUITE=bookworm
CACHE=${LSTMSERVE_CACHE_DIR:-$HOME/.cache/lstmserve}
TAR=$CACHE/debian-$SUITE-rootfs.tar

log() { printf 'docker_base_image: %s\n' "$*" >&2; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE is there"
  exit 0
fi
if [ ! -s "$TAR" ]; then
  mirror=${DEBIAN_MIRROR:-$(grep -rhE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -1 || true)}
  [ -n "$mirror" ] || { log "set DEBIAN_MIRROR to a Debian archive URL (ending in /debian)"; exit 2; }
  if ! command -v mmdebstrap >/dev/null 2>&1; then
    log "installing mmdebstrap (Debian's package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null; }
  fi
  mkdir -p "$CACHE"
  log "building the $SUITE root filesystem with mmdebstrap ($mirror) into $TAR"
  hook='mkdir -p "$1/usr/local/share/ca-certificates" && { cp /usr/local/share/ca-certificates/*.crt'
  hook+=' "$1/usr/local/share/ca-certificates/" 2>/dev/null || true; } && chroot "$1" update-ca-certificates'
  # Like Docker's debian:*-slim images: no recommended packages, no manuals, documentation or locales.
  mmdebstrap --quiet --format=tar --variant=minbase --mode=root --include=ca-certificates \
    --aptopt='APT::Install-Recommends "false"' --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="$hook" "$SUITE" "$TAR.partial" "deb $mirror $SUITE main"
  mv "$TAR.partial" "$TAR"
fi
bundle=/etc/ssl/certs/ca-certificates.crt
docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' -c "ENV SSL_CERT_FILE=$bundle" -c "ENV PIP_CERT=$bundle" \
  -c "ENV REQUESTS_CA_BUNDLE=$bundle" "$TAR" "$IMAGE" >/dev/null
log "imported $IMAGE from $TAR"
