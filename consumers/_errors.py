"""Errors of the consumers package.

    ChioReceiptsError           the project's root (``schemas``)
    └── ConsumerError           base; every failure the consumers raise is one of these
        ├── ConfigError         bad configuration, e.g. steps/runs partition counts differ
        ├── KafkaUnavailable    the broker cannot be reached yet: retry, commit nothing
        ├── KeyResolutionError  public keys could not be loaded (sidecar down, bad encoding)
        ├── SinkError           ClickHouse failed
        │   ├── SinkDataError   the rows were refused (bad data): dead-letter, do not retry
        │   ├── SinkUnavailable server down, timeout, engine busy: retry, commit nothing
        │   └── DatabaseBusy    an embedded chDB path is owned by another process
        ├── OutputError         a SIEM output failed
        │   ├── OutputRejected  the output refused the batch (4xx): dead-letter it, go on
        │   └── OutputUnavailable  network error, 5xx, timeout: retry with backoff
        └── FailpointError      a fault-injection point configured to raise

``retriable`` says whether the same input can succeed on a later attempt (read it with
``schemas.is_retriable``). A deployment that breaks the topic contract raises ``ConfigError``.
clickhouse-connect, httpx and aiokafka errors are translated at the edge (``raise ... from``).
"""

from __future__ import annotations

from chio_receipts.schemas import ChioReceiptsError

__all__ = [
    "ConfigError",
    "ConsumerError",
    "DatabaseBusy",
    "FailpointError",
    "KafkaUnavailable",
    "KeyResolutionError",
    "OutputError",
    "OutputRejected",
    "OutputUnavailable",
    "SinkDataError",
    "SinkError",
    "SinkUnavailable",
]


class ConsumerError(ChioReceiptsError):
    """Base of every error raised by the consumers package."""


class ConfigError(ConsumerError):
    """The configuration cannot work (e.g. steps and runs topics are not co-partitioned)."""


class KafkaUnavailable(ConsumerError):
    """Kafka could not be reached (e.g. at start, while the broker is down)."""

    retriable = True


class KeyResolutionError(ConsumerError):
    """The verification keys could not be loaded."""

    retriable = True


class SinkError(ConsumerError):
    """ClickHouse did not accept a statement."""


class SinkDataError(SinkError):
    """ClickHouse refused the data itself; retrying the same rows cannot help."""


class SinkUnavailable(SinkError):
    """ClickHouse is unreachable, timed out or failed transiently; retry later."""

    retriable = True


class DatabaseBusy(SinkError):
    """An embedded chDB path is owned by another running process."""

    retriable = True


class OutputError(ConsumerError):
    """A SIEM output did not accept a batch."""


class OutputRejected(OutputError):
    """The output refused the batch (e.g. HTTP 4xx)."""


class OutputUnavailable(OutputError):
    """The output is unreachable, failed transiently or timed out."""

    retriable = True


class FailpointError(ConsumerError):
    """Raised by a fault-injection point configured with the ``raise`` action."""

    retriable = True
