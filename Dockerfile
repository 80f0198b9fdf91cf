# One image for every project service (sidecar, demo worker, completion watcher, receipt builder,
# SIEM exporter); compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
# The folders keep their places: chio_receipts/ holds relative symlinks (chio_receipts/sidecar ->
# ../sidecar, ...), which COPY keeps as symlinks, so the package folders must sit next to it.
COPY pyproject.toml constraints.txt README.md ./
COPY interceptor ./interceptor
COPY sidecar ./sidecar
COPY streamer ./streamer
COPY consumers ./consumers
COPY schemas ./schemas
COPY chio_receipts ./chio_receipts
# /var/lib/chio is created owned by the service user (uid 10001): a fresh named volume mounted
# there takes that owner, so every service can write its data directory.
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --system --uid 10001 --home-dir /var/lib/chio chio \
 && mkdir -p /var/lib/chio && chown chio:chio /var/lib/chio
USER 10001
ENV CHIO_DATA_DIR=/var/lib/chio
ENTRYPOINT ["chio-receipts"]
