# syntax=docker/dockerfile:1.7
#
# lstmserve export image: trains and exports a model (`lstmserve export`), with torch.
# The CPU build of torch is enough for these small models, and keeps the image about 1 GB lighter
# than the default CUDA build. It installs the `export` extra (torch, onnx, matplotlib) plus the
# `cpu` extra (onnxruntime), which `lstmserve export` uses to check the ONNX model against PyTorch.
#
# The container runs docker/export-if-missing.sh: it exports into $LSTMSERVE_MODEL_DIR (a named
# volume in docker-compose.yml) unless a finished model is already there.
#
# Build from the repository root (the compose file does this):
#   docker build -f docker/export.Dockerfile --target export -t lstmserve-export:0.1.0 .

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- builder: the virtual environment with torch (CPU) and the project
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
# torch first, from PyTorch's CPU-only index and pinned to the version of the `export` extra
# (2.13.0+cpu satisfies torch==2.13.0); its dependencies and everything else come from PyPI below.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lstmserve/ lstmserve/
COPY server/ server/
COPY client/ client/
COPY export/ export/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install "/src[export,cpu]"

# ---- runtime
FROM ${PYTHON_IMAGE} AS export
RUN groupadd --system --gid 10001 lstmserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/lstmserve --shell /usr/sbin/nologin lstmserve \
 && mkdir -p /models \
 && chown 10001:10001 /models
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 docker/export-if-missing.sh /usr/local/bin/export-if-missing
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    LSTMSERVE_MODEL_DIR=/models/default
USER 10001:10001
WORKDIR /home/lstmserve
CMD ["export-if-missing"]
