#
# lstmserve server images. Neither has torch in it: the server needs only ONNX Runtime.
#
#   --target server-gpu   ONNX Runtime with the CUDA execution provider: `pip install .[gpu]`
#                         (onnxruntime-gpu), on the NVIDIA CUDA + cuDNN runtime image (the default BASE_IMAGE).
#   --target server-cpu   ONNX Runtime on the CPU: `pip install .[cpu]` (onnxruntime), on any Debian or
#                         Ubuntu image given as BASE_IMAGE (docker-compose.cpu.yml: debian:bookworm-slim).
#
# Every stage starts from BASE_IMAGE and installs Python with Debian's and Ubuntu's package names
# (python3, python3-venv), so the virtual environment built in the builder stage runs unchanged in the
# runtime stage: both have the same base image and so the same Python (3.12 on Ubuntu 24.04, 3.11 on
# Debian 12; the project's requires-python is >=3.11). No image is pulled that BASE_IMAGE does not name.
#
# Which CUDA base image, and why (re-check whenever the onnxruntime-gpu pin in pyproject.toml moves):
#   onnxruntime-gpu 1.31.1 (the `gpu` extra) is built for CUDA 13.0 and cuDNN 9:
#   - its wheel's onnxruntime/capi/build_and_package_info.py says cuda_version = '13.0', and
#     libonnxruntime_providers_cuda.so links libcudart.so.13, libcublas.so.13, libcublasLt.so.13 and
#     libcurand.so.10 (readelf -d);
#   - its package metadata pins the NVIDIA wheels of the same majors for its optional extras:
#     [cuda] nvidia-cuda-runtime~=13.0, nvidia-cuda-nvrtc~=13.0, nvidia-cufft~=12.0,
#     nvidia-curand~=10.0; [cudnn] nvidia-cudnn-cu13~=9.0;
#   - the ONNX Runtime CUDA EP documentation: a build for CUDA 13.x works with any CUDA 13.x runtime
#     (minor version compatibility), and cuDNN major versions are not interchangeable (8 vs 9).
#   So the base is NVIDIA's CUDA 13.0 image with cuDNN 9 (the `cudnn-runtime` flavour: cudart, cuBLAS,
#   cuRAND, cuFFT, NVRTC and cuDNN 9 for CUDA 13, no compilers), and onnxruntime-gpu is installed
#   *without* its [cuda,cudnn] extras, so only one set of CUDA libraries is present (the image's).
#   lstmserve calls onnxruntime.preload_dlls(), which finds no NVIDIA wheels here and falls back to
#   the system libraries of the base image. Host requirement: NVIDIA driver R580 or newer (CUDA 13.0)
#   and the NVIDIA Container Toolkit.
#
# Build from the repository root (the compose files do this, with BASE_IMAGE from their build args):
#   docker build -f docker/server.Dockerfile --target server-gpu -t lstmserve-server:0.1.0-cuda13.0 .
#   docker build -f docker/server.Dockerfile --target server-cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#     -t lstmserve-server:0.1.0-cpu .

ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- base: Python and the unprivileged user the server runs as, with the folders of its two volumes
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive
# python3 is left unpinned: the base image fixes the release (and so the Python version), and the
# archive drops superseded package versions, which would break a pinned build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 lstmserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/lstmserve --shell /usr/sbin/nologin lstmserve \
 && mkdir -p /models /state \
 && chown 10001:10001 /models /state

# ---- builder: a virtual environment and the project sources (nothing from here reaches the runtime but /opt/venv)
FROM base AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lstmserve/ lstmserve/
COPY server/ server/
COPY client/ client/
COPY export/ export/
COPY bench/ bench/

# ---- the server's Python environment, one per ONNX Runtime flavour (never both in one venv)
FROM builder AS venv-gpu
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install "/src[gpu]"

FROM builder AS venv-cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install "/src[cpu]"

# ---- runtime: GPU (CUDA 13.0 + cuDNN 9 base image, see above)
FROM base AS server-gpu
COPY --from=venv-gpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LSTMSERVE_MODEL=/models/default/model.onnx \
    LSTMSERVE_HOST=0.0.0.0 \
    LSTMSERVE_PORT=50051 \
    LSTMSERVE_METRICS_PORT=9100 \
    LSTMSERVE_PROVIDERS=cuda
USER 10001:10001
WORKDIR /home/lstmserve
EXPOSE 50051 9100
STOPSIGNAL SIGTERM
# Shell form on purpose: the port comes from the container's environment at check time.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD lstmserve health --target "127.0.0.1:${LSTMSERVE_PORT:-50051}" --timeout 3
CMD ["lstmserve", "serve"]

# ---- runtime: CPU only (for machines without an NVIDIA GPU)
FROM base AS server-cpu
COPY --from=venv-cpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LSTMSERVE_MODEL=/models/default/model.onnx \
    LSTMSERVE_HOST=0.0.0.0 \
    LSTMSERVE_PORT=50051 \
    LSTMSERVE_METRICS_PORT=9100 \
    LSTMSERVE_PROVIDERS=cpu
USER 10001:10001
WORKDIR /home/lstmserve
EXPOSE 50051 9100
STOPSIGNAL SIGTERM
# Shell form on purpose: the port comes from the container's environment at check time.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD lstmserve health --target "127.0.0.1:${LSTMSERVE_PORT:-50051}" --timeout 3
CMD ["lstmserve", "serve"]
