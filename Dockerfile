# imdb-dist training image: TensorFlow 2.21 on NVIDIA GPUs, Ray 2.60, the imdb-dist CLI.
#
#   docker build -t imdb-dist:0.1.0 .
#
# Running it, locally and on Kubernetes: docs/kubernetes.md.
#
# Base: nvidia/cuda 12.5.1 "base" (CUDA runtime and the NVIDIA container
# runtime's settings, no cuDNN): TensorFlow 2.21 is built against CUDA 12.5.1
# and cuDNN 9 (tf.sysconfig.get_build_info()), and gets cuDNN, cuBLAS, NCCL
# and the rest as pip wheels from its and-cuda extra (the project's `gpu`
# extra), pinned to CUDA 12.5 by docker/constraints-cuda.txt. Only the NVIDIA
# driver comes from the host: one that supports CUDA 12.5 (R555 or newer).
#
# Two stages: the builder creates a virtual environment with everything
# installed; the runtime stage copies it onto a fresh base with only the
# Python interpreter, so no pip caches, build dependencies or compilers are
# left in the image. The same image runs `imdb-dist train` (batch Job), the
# Ray head and workers, and the RayJob entrypoint `python job/train.py`.
ARG CUDA_IMAGE=nvidia/cuda:12.5.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 24.04's Python 3.12. Versions are not pinned: the Ubuntu archive
# drops superseded versions, so a pin breaks the build within weeks.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# 1. Dependencies only, from pyproject.toml: this multi-GB layer is rebuilt
#    when the dependencies change, not when the code does.
COPY pyproject.toml ./
COPY docker/requirements.py docker/constraints-cuda.txt ./docker/
RUN python3 docker/requirements.py pyproject.toml gpu > /tmp/requirements.txt \
    && pip install --no-cache-dir -c docker/constraints-cuda.txt -r /tmp/requirements.txt

# 2. The project itself (the package the README installs), without
#    re-resolving its dependencies.
COPY README.md ./
COPY imdb_dist ./imdb_dist
RUN pip install --no-cache-dir --no-deps . \
    && pip check


FROM ${CUDA_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Not "UID": bash keeps its own read-only UID variable.
ARG APP_UID=10001
# python3: the interpreter the virtual environment links to. wget: KubeRay's
# default liveness/readiness probes call it. ca-certificates: HTTPS downloads
# (the tfds data source). Unpinned for the reason given in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${APP_UID}" imdb \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --shell /bin/bash imdb
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# The code directory: the Ray job's entrypoint `python job/train.py --config
# job/configs/ray-gpu.yaml` runs from here (the pods' workingDir). Owned by
# root, so the training user cannot modify it.
WORKDIR /app
COPY imdb_dist ./imdb_dist
COPY job ./job

LABEL org.opencontainers.image.title="imdb-dist" \
      org.opencontainers.image.description="Distributed IMDB sentiment training (TensorFlow 2.21, tf_keras, Ray Train 2.60)" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric, so Kubernetes can check runAsNonRoot against it.
USER ${APP_UID}:${APP_UID}
ENTRYPOINT ["imdb-dist"]
CMD ["--help"]
