# aiworker node image (CPU). The full multi-stage/CUDA image comes with the operations issue.
FROM python:3.11-slim
RUN useradd --create-home --uid 1000 aiworker
WORKDIR /app
COPY pyproject.toml README.md ./
COPY aiworker ./aiworker
COPY config ./config
RUN pip install --no-cache-dir . && mkdir -p /data && chown aiworker /data
USER aiworker
ENV AIWORKER_STORAGE__DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 11112 8080
CMD ["aiworker", "serve", "--config", "config/aiworker.yaml"]
