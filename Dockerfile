# imdb-dist training image: TensorFlow 2.21, Ray 2.60, the imdb-dist CLI.
# One Dockerfile, two images (docs/kubernetes.md#docker):
#
#   docker build -t imdb-dist:0.1.0 .                                # NVIDIA GPUs (the default)
#   docker build --build-arg DEVICE=cpu -t imdb-dist:0.1.0-cpu .     # CPU only, without the CUDA wheels
#
# Behind a TLS-intercepting proxy, give pip the proxy's CA bundle as the build
# secret pip-ca (`--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt`):
# it is mounted only into the RUN steps that download, never stored in a
# layer, and leaves the layer cache alone (a bind mount with -v does not).
#
# Base: nvidia/cuda 12.5.1 "base" (CUDA runtime and the NVIDIA container
# runtime's settings, no cuDNN): TensorFlow 2.21 is built against CUDA 12.5.1
# and cuDNN 9 (tf.sysconfig.get_build_info()), and gets cuDNN, cuBLAS, NCCL
# and the rest as pip wheels from its and-cuda extra (the project's `gpu`
# extra), pinned to CUDA 12.5 by docker/constraints-cuda.txt. Only the NVIDIA
# driver comes from the host: one that supports CUDA 12.5 (R555 or newer).
# Where no registry can be reached, docker/debian-base.sh makes a local
# Debian base to pass as CUDA_IMAGE.
#
# Two stages: the builder creates a virtual environment with the
# dependencies, and the project as a wheel; the runtime stage copies the
# environment onto a fresh base with only the Python interpreter and installs
# the wheel into it, so no pip caches, build dependencies or compilers are
# left in the image, and a change to the code rebuilds only the small layers
# after the dependencies. The same image runs `imdb-dist train` (batch Job),
# the Ray head and workers, and the RayJob entrypoint `python job/train.py`.
ARG CUDA_IMAGE=nvidia/cuda:12.5.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gpu: TensorFlow with its CUDA libraries (the project's gpu extra); cpu:
# TensorFlow alone, for machines without NVIDIA GPUs and for CI.
ARG DEVICE=gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu 24.04's Python 3.12. Versions are not pinned: the Ubuntu archive
# drops superseded versions, so a pin breaks the build within weeks.
# /opt/venv is the image's environment; /opt/build only builds the wheel.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && python3 -m venv /opt/build
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# 1. Dependencies only, from pyproject.toml: this multi-GB layer is rebuilt
#    when the dependencies change, not when the code does. setuptools (the
#    build backend pyproject.toml names) goes into /opt/build, so that the
#    wheel is built without the network. Every image has the tracking extra
#    (the MLflow client): a cluster's job logs to MLflow with tracking.uri alone.
COPY pyproject.toml ./
COPY docker/requirements.py docker/constraints-cuda.txt ./docker/
RUN --mount=type=secret,id=pip-ca \
    case "${DEVICE}" in \
        gpu) extra=gpu ;; \
        cpu) extra= ;; \
        *) echo "error: DEVICE is gpu or cpu, not '${DEVICE}'" >&2; exit 2 ;; \
    esac \
    && if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 docker/requirements.py pyproject.toml tracking ${extra:+"$extra"} > /tmp/requirements.txt \
    && pip install --no-cache-dir -c docker/constraints-cuda.txt -r /tmp/requirements.txt \
    && python3 docker/requirements.py --build-system pyproject.toml > /tmp/build-requirements.txt \
    && /opt/build/bin/pip install --no-cache-dir -r /tmp/build-requirements.txt

# 2. The project itself (the package the README installs), as a wheel.
COPY README.md ./
COPY imdb_dist ./imdb_dist
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .


FROM ${CUDA_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Not "UID": bash keeps its own read-only UID variable.
ARG APP_UID=10001
# A login shell resets PATH (/etc/profile): KubeRay starts Ray with
# `/bin/bash -lc -- "... ray start ..."`, so the login profile puts the
# virtual environment first again.
# python3: the interpreter the virtual environment links to. wget: KubeRay's
# default liveness/readiness probes call it. ca-certificates: HTTPS downloads
# (the tfds data source). Unpinned for the reason given in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 wget ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "${APP_UID}" imdb \
    && useradd --uid "${APP_UID}" --gid "${APP_UID}" --create-home --shell /bin/bash imdb \
    && echo "export PATH=\"/opt/venv/bin:\${PATH}\"" > /etc/profile.d/imdb-dist-venv.sh
COPY --from=builder /opt/venv /opt/venv
# The project's wheel into the environment, without its dependencies (they
# are the layer above) or the network; then pip checks what is installed.
COPY --from=builder /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && /opt/venv/bin/pip check
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
