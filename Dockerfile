# One image for every project service (sidecar, demo worker, completion watcher, receipt builder,
# SIEM exporter); compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY interceptor ./interceptor
COPY sidecar ./sidecar
COPY streamer ./streamer
COPY consumers ./consumers
COPY schemas ./schemas
COPY chio_receipts ./chio_receipts
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --system --uid 10001 chio \
 && mkdir -p /var/lib/chio && chown chio /var/lib/chio
USER chio
ENV CHIO_DATA_DIR=/var/lib/chio
ENTRYPOINT ["chio-receipts"]
