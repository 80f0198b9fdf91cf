"""Prometheus metrics of the streamer and the completion watcher.

Each :class:`StreamerMetrics` registers into the :class:`CollectorRegistry` it is given (a new
private one by default, so tests never hit duplicate registration); a process passes one shared
registry to every component and serves it with :func:`start_metrics_server`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["StreamerMetrics", "start_metrics_server"]


class StreamerMetrics:
    """Counters, the spool depth gauge and the send latency histogram."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.produced = Counter(
            "chio_streamer_produced", "Records acknowledged by Kafka.", ["topic"], registry=r
        )
        self.spooled = Counter(
            "chio_streamer_spooled", "Records written to the local spool.", ["reason"], registry=r
        )
        self.replayed = Counter(
            "chio_streamer_replayed", "Spooled records acknowledged by Kafka.", registry=r
        )
        self.failed = Counter(
            "chio_streamer_failed",
            "Failed send attempts (records kept for retry).",
            ["error"],
            registry=r,
        )
        self.rejected = Counter(
            "chio_streamer_rejected",
            "Receipts the sink refused (spool full or closed).",
            registry=r,
        )
        self.producer_restarts = Counter(
            "chio_streamer_producer_restarts",
            "Producers recreated after a fatal state.",
            registry=r,
        )
        self.spool_depth = Gauge(
            "chio_streamer_spool_depth", "Unacknowledged records in the spool.", registry=r
        )
        self.queue_depth = Gauge(
            "chio_streamer_queue_depth", "Records in the in-memory send queue.", registry=r
        )
        self.send_latency = Histogram(
            "chio_streamer_send_latency_seconds",
            "Time from handing a batch to the producer to Kafka's acknowledgement.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.completions = Counter(
            "chio_watcher_completions",
            "Run-completion events emitted by the watcher.",
            ["outcome"],
            registry=r,
        )


def start_metrics_server(
    port: int, registry: CollectorRegistry, *, addr: str = "127.0.0.1"
) -> None:
    """Serve ``registry`` at ``http://addr:port/metrics`` (daemon thread; loopback by default)."""
    start_http_server(port, addr=addr, registry=registry)
