# One image for every project service (sidecar, demo worker, completion watcher, receipt builder,
# SIEM exporter); compose.yaml picks the command.

# The native core (native/, Rust) is built into a wheel in a stage of its own (Debian bookworm's
# python3 is 3.11, as in the image below); the image installs the wheel and carries no Rust.
FROM rust:1.93-slim-bookworm AS native
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /build \
 && /build/bin/pip install --no-cache-dir 'maturin>=1.9,<2'
WORKDIR /src
COPY native/Cargo.toml native/Cargo.lock native/pyproject.toml native/chio_receipts_native.pyi ./native/
COPY native/src ./native/src
RUN /build/bin/maturin build --release --locked --manifest-path native/Cargo.toml --out /wheels

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
RUN --mount=type=bind,from=native,source=/wheels,target=/wheels \
    pip install --no-cache-dir -c constraints.txt /wheels/*.whl . \
 && useradd --system --uid 10001 --home-dir /var/lib/chio chio \
 && mkdir -p /var/lib/chio && chown chio:chio /var/lib/chio
USER 10001
ENV CHIO_DATA_DIR=/var/lib/chio
ENTRYPOINT ["chio-receipts"]
