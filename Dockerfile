# Tunehouse image: one image for every role (`tunehouse api|serve|worker|migrate|run`).
#
#   docker build -t tunehouse .                                   # CPU (the default)
#   docker build -t tunehouse:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # GPU workers
#   docker build -t tunehouse:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# torch's CUDA wheels carry their CUDA libraries, so a CUDA image only needs TORCH_INDEX: the
# host's NVIDIA driver comes in through the NVIDIA container toolkit. BASE_IMAGE is for a base
# of your own (a CUDA image, a patched Python); it needs Python >= 3.11 as `python3`, or an apt
# that can install it (Ubuntu 24.04 has 3.12). Builder and runtime use the same base, so the
# virtual environment's interpreter path holds in both. See docs/deploy.md.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
# A CUDA base image is plain Ubuntu: add Python and venv there; python:3.11-slim has them.
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

FROM base AS builder
# The pinned torch first, from the index of the build (CPU by default), so that installing the
# package keeps it (torch==2.13.0 matches 2.13.0+cpu) and never pulls a multi-GB CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# A regular (not editable) install: the runtime stage copies the venv alone, not the source.
RUN pip install . && pip check

FROM base AS runtime
# A numeric, non-root user (Kubernetes' runAsNonRoot can verify a number, not a name).
ARG TUNEHOUSE_UID=10001
RUN groupadd --system --gid "${TUNEHOUSE_UID}" tunehouse \
    && useradd --system --uid "${TUNEHOUSE_UID}" --gid "${TUNEHOUSE_UID}" --create-home \
      --home-dir /home/tunehouse --shell /usr/sbin/nologin tunehouse \
    && mkdir -p /data \
    && chown tunehouse:tunehouse /data
COPY --from=builder /opt/venv /opt/venv
# Everything lives under /data (a volume: uploads, checkpoints, models; SQLite and the
# filesystem broker in the embedded mode). Nothing is fetched at run time.
# (DL3064 takes TOKENIZERS_PARALLELISM for a secret.)
# hadolint ignore=DL3064
ENV TUNEHOUSE_DATA_DIR=/data \
    TUNEHOUSE_HOST=0.0.0.0 \
    TUNEHOUSE_PORT=8000 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
USER ${TUNEHOUSE_UID}:${TUNEHOUSE_UID}
WORKDIR /home/tunehouse

# The tests' smoke check, on the installed package as the user that runs it: the app on SQLite
# answers /healthz and /readyz in-process, the control role imports no torch, and torch embeds
# with the packaged base model. No network. It stays in the image, to run again on a host:
# `docker compose run --rm api python /opt/tunehouse/smoke.py`. (A COPY, not a RUN --mount,
# so that the classic builder of Debian's docker-compose builds this file too.)
COPY tests/smoke.py /opt/tunehouse/smoke.py
RUN python /opt/tunehouse/smoke.py

VOLUME ["/data"]
EXPOSE 8000
# For the HTTP roles (`run`, `api`, `serve`); docker-compose.yml gives workers their own check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TUNEHOUSE_PORT', '8000'), timeout=4)"]
# The embedded mode (SQLite, filesystem broker, one worker) by default; compose runs each role.
CMD ["tunehouse", "run"]
