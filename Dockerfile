# syntax=docker/dockerfile:1
# The isomax-serve image: the HTTP service over ONNX bundles. Service dependencies only, no torch.
#
#   docker build -t isomax-serve:gpu .                # default target: gpu
#   docker build --target cpu -t isomax-serve:cpu .   # hosts without an NVIDIA GPU
#
# gpu: CUDA 12.8 + cuDNN 9 runtime with onnxruntime-gpu 1.26.0, the newest onnxruntime-gpu built
#      for CUDA 12 + cuDNN 9 (1.27 and later need CUDA 13). A CUDA 12.x build runs on any 12.x
#      runtime; the host needs an NVIDIA driver for CUDA 12 and the NVIDIA Container Toolkit.
# cpu: Debian slim Python with the CPU build of onnxruntime, same version.
# Exactly one of onnxruntime / onnxruntime-gpu is installed per image, checked at build time:
# both at once is a known cause of sessions that silently run on the CPU.
# Versions and sha256 of every wheel come from deploy/docker/locked-{cpu,gpu}.txt
# (scripts/lock_image_deps.py); pip installs them with --require-hashes.
#
# Base images are given by tag. To pin them by digest (recommended for production; the digest
# needs registry access to look up, e.g. `docker buildx imagetools inspect python:3.12-slim-bookworm`):
#   docker build --build-arg PYTHON_IMAGE=python:3.12-slim-bookworm@sha256:<digest> ...
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@sha256:<digest> ...
# or write `@sha256:<digest>` into the two ARG defaults below (tests/deploy checks the form).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------- GPU base: CUDA + Python 3.12
FROM ${CUDA_IMAGE} AS cuda-python
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Ubuntu 24.04's python3 is 3.12, the version the locks were resolved for; the base image's
# apt sources pin the rest, so package versions are left to the base image tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------- GPU builder: the venv
FROM cuda-python AS gpu-builder
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY deploy/docker/locked-gpu.txt deploy/docker/image_deps.py deploy/docker/check_runtime.py /build/
COPY pyproject.toml README.md ./
# Dependencies first (their own layer): pyproject's base list with onnxruntime -> onnxruntime-gpu
# (image_deps.py, so that the project's metadata asks for the GPU build), installed from the
# hash-locked list (scripts/lock_image_deps.py): every wheel is checked against its sha256, and
# setuptools comes from the lock too, so building the project below fetches nothing.
RUN python /build/image_deps.py gpu pyproject.toml /build/requirements.txt \
    && pip install --require-hashes -r /build/locked-gpu.txt
COPY isomax ./isomax
COPY service ./service
COPY training ./training
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && python /build/check_runtime.py gpu

# ---------------------------------------------------------------- CPU builder: the venv
FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY deploy/docker/locked-cpu.txt deploy/docker/image_deps.py deploy/docker/check_runtime.py /build/
COPY pyproject.toml README.md ./
RUN python /build/image_deps.py cpu pyproject.toml /build/requirements.txt \
    && pip install --require-hashes -r /build/locked-cpu.txt
COPY isomax ./isomax
COPY service ./service
COPY training ./training
RUN pip install --no-deps --no-build-isolation . \
    && pip check \
    && python /build/check_runtime.py cpu

# ---------------------------------------------------------------- CPU runtime
FROM ${PYTHON_IMAGE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ISOMAX_HOST=0.0.0.0 \
    ISOMAX_PORT=8000 \
    ISOMAX_MODELS_DIR=/opt/isomax/models \
    ISOMAX_DEVICE=cpu
RUN groupadd --system --gid 10001 isomax \
    && useradd --system --uid 10001 --gid isomax --no-create-home --shell /usr/sbin/nologin isomax
COPY --from=cpu-builder /opt/venv /opt/venv
WORKDIR /opt/isomax
COPY deploy/docker/healthcheck.py /opt/isomax/healthcheck.py
# The default bundle(s), read-only for the service user; mount a directory over it to serve others.
COPY models /opt/isomax/models
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/isomax/healthcheck.py"]
CMD ["isomax", "serve"]

# ---------------------------------------------------------------- GPU runtime (default target)
FROM cuda-python AS gpu
ENV PATH=/opt/venv/bin:$PATH \
    ISOMAX_HOST=0.0.0.0 \
    ISOMAX_PORT=8000 \
    ISOMAX_MODELS_DIR=/opt/isomax/models \
    ISOMAX_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 isomax \
    && useradd --system --uid 10001 --gid isomax --no-create-home --shell /usr/sbin/nologin isomax
COPY --from=gpu-builder /opt/venv /opt/venv
WORKDIR /opt/isomax
COPY deploy/docker/healthcheck.py /opt/isomax/healthcheck.py
COPY models /opt/isomax/models
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/isomax/healthcheck.py"]
CMD ["isomax", "serve"]
