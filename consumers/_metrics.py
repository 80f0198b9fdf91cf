"""Prometheus metrics of the consumers (one registry per service object, no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["ConsumerMetrics"]


class ConsumerMetrics:
    """Consumed, written, dead-lettered (by reason), duplicates, lag and open runs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "chio_consumer_messages_consumed", "Messages consumed", ["topic"], registry=r
        )
        self.written = Counter(
            "chio_consumer_rows_written", "Rows accepted by ClickHouse", ["table"], registry=r
        )
        self.dead_letters = Counter(
            "chio_consumer_dead_letters",
            "Messages sent to the dead-letter topic",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "chio_consumer_duplicate_steps", "Step receipts ignored as duplicates", registry=r
        )
        self.exported = Counter(
            "chio_siem_events_exported",
            "Events accepted by a SIEM output",
            ["output"],
            registry=r,
        )
        self.refused = Counter(
            "chio_siem_events_refused",
            "Events the SIEM exporter did not export because a receipt check failed",
            ["reason"],
            registry=r,
        )
        self.lag = Gauge(
            "chio_consumer_lag",
            "Messages behind the end of the partition",
            ["topic", "partition"],
            registry=r,
        )
        self.open_runs = Gauge("chio_consumer_open_runs", "Runs held in memory", registry=r)
