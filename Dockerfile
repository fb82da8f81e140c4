# genforge serve in a container: a builder stage installs genforge and its pinned dependencies into
# a virtual environment, a slim runtime stage gets only that environment and runs as a non-root user.
#
#   docker build -t genforge:0.1.0 .                       # CPU: torch's CPU wheel (~200 MB, not ~3 GB)
#   docker run --rm -p 8000:8000 -v "$PWD/runs/demo:/models/model:ro" -e GENFORGE_API_KEYS=sk-... genforge:0.1.0
#
# CUDA: a CUDA runtime base and torch's CUDA wheel, e.g.
#   docker build -t genforge:0.1.0-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all ... genforge:0.1.0-cuda
# (pick the cuXXX index that matches the base image's CUDA; the base needs no Python of its own:
# the stages below install Debian/Ubuntu's python3 when the image has none).
#
# The model is not in the image: mount a run directory or Hugging Face model folder at /models/model
# (or give another path after `serve`). tests/test_deploy.py lints this file (hadolint) and checks
# the properties below; deploy/kubernetes/ runs the image as a Deployment.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
# torch comes from its own index: PyPI's Linux wheel is the CUDA build (several GB) and would be
# picked for a CPU image too. Every other package is pinned by constraints.txt.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=serve,app,trace
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/genforge
ENV PATH=/opt/genforge/bin:$PATH
WORKDIR /src
# the dependency layer first (pyproject + constraints), so a change to src/ reuses it
COPY pyproject.toml constraints.txt README.md ./
# the version is constraints.txt's; of the two wheels that match it, pip takes the index's
# (2.13.0+cpu sorts above PyPI's 2.13.0)
# hadolint ignore=DL3013
RUN pip install --extra-index-url "${TORCH_INDEX}" -c constraints.txt torch
COPY src ./src
# a regular (non-editable) install: the runtime stage needs the venv only, not the source tree
RUN pip install -c constraints.txt ".[${EXTRAS}]" \
    && pip check

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 genforge \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/genforge --shell /usr/sbin/nologin genforge \
    && mkdir -p /models \
    && chown genforge:genforge /models
COPY --from=builder /opt/genforge /opt/genforge
# HF_HUB_OFFLINE: a server never downloads a model at run time; everything it loads is on disk.
# PYTHONUNBUFFERED: log lines reach `docker logs` / `kubectl logs` as they are written.
ENV PATH=/opt/genforge/bin:$PATH \
    HOME=/home/genforge \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd
USER 10001:10001
WORKDIR /home/genforge
VOLUME ["/models"]
EXPOSE 8000
# /health answers 503 while the engine is failing; python is there anyway (slim images have no curl).
# Serving on another --port: give `docker run` a matching --health-cmd.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["genforge"]
CMD ["serve", "/models/model", "--host", "0.0.0.0", "--port", "8000"]
