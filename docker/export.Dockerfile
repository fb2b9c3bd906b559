#
# lstmserve export image: trains and exports a model (`lstmserve export`), with torch.
# The CPU build of torch is enough for these small models, and keeps the image gigabytes lighter
# than the default CUDA build. It installs the `export` extra (torch, onnx, matplotlib) plus the
# `cpu` extra (onnxruntime), which `lstmserve export` uses to check the ONNX model against PyTorch.
#
# The container runs docker/export-if-missing.sh: it exports into $LSTMSERVE_MODEL_DIR (a named
# volume in docker-compose.yml) unless a finished model is already there.
#
# BASE_IMAGE: any Debian or Ubuntu image (Python comes from its python3 and python3-venv packages).
#
# Where torch comes from, on purpose (an unpinned `pip install torch` would take PyPI's CUDA build,
# several GB):
#   - the build context `wheels` (compose: LSTMSERVE_WHEELS_DIR; docker build: --build-context
#     wheels=DIR), when it holds a torch 2.13.0+cpu wheel for the image's Python: installed from there
#     with --no-index, so nothing is downloaded for torch;
#   - otherwise PyTorch's CPU-only index (TORCH_INDEX_URL).
#
# Build from the repository root (the compose file does this):
#   docker build -f docker/export.Dockerfile --target export -t lstmserve-export:0.1.0 .
#   docker build -f docker/export.Dockerfile --target export --build-context wheels=/opt/wheels \
#     --build-arg BASE_IMAGE=local/debian:bookworm -t lstmserve-export:0.1.0 .

ARG BASE_IMAGE=debian:bookworm-slim

# ---- wheels: empty unless a build context of that name replaces it (see above)
FROM scratch AS wheels

# ---- base: Python and the unprivileged user the export runs as, with the models volume's folder
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 lstmserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/lstmserve --shell /usr/sbin/nologin lstmserve \
 && mkdir -p /models \
 && chown 10001:10001 /models

# ---- builder: the virtual environment with torch (CPU) and the project
FROM base AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
# torch first, pinned to the version of the `export` extra (2.13.0+cpu satisfies torch==2.13.0), without
# its dependencies: they and everything else come from PyPI below.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,from=wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    if ls /wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then \
      /opt/venv/bin/pip install --no-deps --no-index --find-links /wheels "torch==2.13.0+cpu"; \
    else \
      /opt/venv/bin/pip install --no-deps --index-url "$TORCH_INDEX_URL" "torch==2.13.0+cpu"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lstmserve/ lstmserve/
COPY server/ server/
COPY client/ client/
COPY export/ export/
COPY bench/ bench/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install "/src[export,cpu]"

# ---- runtime
FROM base AS export
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 docker/export-if-missing.sh /usr/local/bin/export-if-missing
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    LSTMSERVE_MODEL_DIR=/models/default
USER 10001:10001
WORKDIR /home/lstmserve
CMD ["export-if-missing"]
