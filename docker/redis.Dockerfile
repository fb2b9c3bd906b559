#
# Redis for the scale-out setup (deploy/compose/docker-compose.scale.yml): Debian's or Ubuntu's
# redis-server package on BASE_IMAGE, so no Redis image is pulled. Runs as the package's `redis` user,
# with its data in /data (the compose file's `redis` volume).
#
#   docker build -f docker/redis.Dockerfile --target redis --build-arg BASE_IMAGE=debian:bookworm-slim \
#     -t lstmserve-redis:0.1.0 .

ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS redis
ENV DEBIAN_FRONTEND=noninteractive
# redis-server is left unpinned: the base image fixes the release (Debian 12: Redis 7.0).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data \
 && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
