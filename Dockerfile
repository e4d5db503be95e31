# aiworker node image: the DICOM listener (11112), the web dashboard and API (8080), the
# inference and outbox stages, all in one `aiworker serve`.
#
#   docker build -t aiworker:cpu .                              CPU (default, slim)
#   docker build --build-arg VARIANT=cuda -t aiworker:cuda .    CUDA (run with --gpus all)
#
# Both install through scripts/install.sh, the same script `make run` and `make test` use.
# Config: the YAML at /etc/aiworker/aiworker.yaml (the shipped defaults; mount your own over
# it) and AIWORKER_<SECTION>__<KEY> variables on top. State and spool live in the /data volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/venv with aiworker and the chosen torch ----------
FROM ${PYTHON_IMAGE} AS build
# cpu: the CPU-only torch wheel; cuda: PyPI's torch wheel, built with CUDA 13 (NVIDIA driver
# r580+); TORCH_INDEX_URL picks a PyTorch cuXYZ index instead, e.g. for an older driver
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/
COPY aiworker aiworker/
RUN AIWORKER_TORCH="${VARIANT}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
    sh scripts/install.sh --venv /opt/venv

# --- runtime: the venv, the shipped config and rules, a non-root user ----------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="aiworker" \
      org.opencontainers.image.description="DICOM AI node for knee MRI (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 1000 aiworker \
    && useradd --system --uid 1000 --gid aiworker --home-dir /home/aiworker --create-home \
       --shell /usr/sbin/nologin aiworker \
    && install -d -o aiworker -g aiworker -m 0750 /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# the rule files: pipelines name them relative to the working directory (config/rules/...)
COPY config ./config
COPY config/aiworker.yaml /etc/aiworker/aiworker.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AIWORKER_VARIANT=${VARIANT} \
    AIWORKER_NODE__HOST=0.0.0.0 \
    AIWORKER_WEB__HOST=0.0.0.0 \
    AIWORKER_STORAGE__DATA_DIR=/data
# numeric, so Kubernetes runAsNonRoot can check it
USER 1000:1000
VOLUME ["/data"]
EXPOSE 11112 8080
# the web server answers /healthz while the process is up (no curl in a slim image)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('AIWORKER_WEB__PORT', '8080') + '/healthz', timeout=4)"]
ENTRYPOINT ["aiworker"]
CMD ["serve", "--config", "/etc/aiworker/aiworker.yaml"]
