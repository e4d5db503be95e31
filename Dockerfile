# aiworker node image: the DICOM listener (11112), the web dashboard and API (8080), the
# inference and outbox stages, all in one `aiworker serve`.
#
#   docker build -t aiworker:cpu .                              CPU (default, slim)
#   docker build --build-arg VARIANT=cuda -t aiworker:cuda .    CUDA (run with --gpus all)
#
# Both install through scripts/install.sh, the same script `make run` and `make test` use.
# Config: the YAML at /etc/aiworker/aiworker.yaml (AIWORKER_CONFIG; the shipped defaults send
# nowhere: mount your own over it) and AIWORKER_<SECTION>__<KEY> variables on top, for every
# command, so `docker exec <container> aiworker status` reads the server's file. State and
# spool live in the /data volume.
#
# Hospital networks (no direct internet, a TLS-inspecting proxy): every build arg below is
# empty by default and then changes nothing.
#   --build-arg PIP_INDEX_URL=https://mirror.example.org/pypi/simple   the PyPI mirror
#   --build-arg PIP_EXTRA_INDEX_URL=...  PIP_TRUSTED_HOST=mirror.example.org   (pip's own)
#   --build-arg TORCH_INDEX_URL=https://mirror.example.org/pytorch-cpu/simple   the mirror of
#       the PyTorch index torch comes from (cpu: download.pytorch.org/whl/cpu by default; its
#       --index-url replaces PIP_INDEX_URL for the torch step only)
#   --build-arg EXTRA_CA_CERT="$(cat hospital-ca.pem)"   one or more PEM certificates added
#       to the system trust store (update-ca-certificates) of both stages; pip (PIP_CERT),
#       requests (REQUESTS_CA_BUNDLE) and Python's ssl (SSL_CERT_FILE) use that bundle.
# Build args are visible in `docker history`: no credentials in the mirror URLs.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/venv with aiworker and the chosen torch ----------
FROM ${PYTHON_IMAGE} AS build
# cpu: the CPU-only torch wheel; cuda: PyPI's torch wheel, built with CUDA 13 (NVIDIA driver
# r580+); TORCH_INDEX_URL picks a PyTorch cuXYZ index instead, e.g. for an older driver
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
# pip reads these from the environment of the RUN steps (empty: ignored); not kept in the image
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_TRUSTED_HOST=""
# PEM text of extra CA certificates (a hospital's root, a TLS-inspecting proxy's CA)
ARG EXTRA_CA_CERT=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# one file per certificate, so each gets its hash link as well as a place in the bundle
RUN if [ -n "${EXTRA_CA_CERT}" ]; then \
        printf '%s\n' "${EXTRA_CA_CERT}" > /tmp/extra-ca.pem \
        && awk '/-----BEGIN CERTIFICATE-----/ { n++ } \
            n { print > ("/usr/local/share/ca-certificates/aiworker-extra-" n ".crt") }' \
            /tmp/extra-ca.pem \
        && rm /tmp/extra-ca.pem \
        && update-ca-certificates; \
    fi
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
# the extra CA certificates of the build stage (none by default) in this stage's trust store
COPY --from=build /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/
RUN update-ca-certificates \
    && groupadd --system --gid 1000 aiworker \
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
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    AIWORKER_VARIANT=${VARIANT} \
    AIWORKER_CONFIG=/etc/aiworker/aiworker.yaml \
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
CMD ["serve"]
