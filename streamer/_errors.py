"""Errors of the streamer package.

    StreamerError                     base of every error raised here
    ├── SpoolError                    the local spool cannot be used (I/O error, bad directory)
    │   └── SpoolFull                 capacity reached; also a ``schemas.ReceiptSinkError``, so
    │                                 the interceptor fails the attempt retryably (Temporal retries)
    ├── StreamerClosed                publish after ``stop()``; also a ``schemas.ReceiptSinkError``
    ├── TopicError                    topics could not be created or described
    │   └── TopicMismatch             existing topics break co-partitioning (steps != runs)
    └── WatcherError                  the completion watcher cannot read Temporal or its checkpoint

aiokafka and temporalio errors never escape this package: they are translated at the edge with
``raise ... from exc`` or handled (spooled, retried) inside the background sender.
"""

from __future__ import annotations

from chio_receipts.schemas import ReceiptSinkError

__all__ = [
    "SpoolError",
    "SpoolFull",
    "StreamerClosed",
    "StreamerError",
    "TopicError",
    "TopicMismatch",
    "WatcherError",
]


class StreamerError(Exception):
    """Base of every error raised by the streamer package."""

    retriable = False


class SpoolError(StreamerError, ReceiptSinkError):
    """The spool directory cannot be written or read; the receipt was not accepted."""

    retriable = True


class SpoolFull(SpoolError):
    """The spool reached its capacity; the receipt was not accepted (retry later)."""

    retriable = True


class StreamerClosed(StreamerError, ReceiptSinkError):
    """The streamer is stopped and accepts no more receipts."""

    retriable = True


class TopicError(StreamerError):
    """Topics could not be created or described."""


class TopicMismatch(TopicError):
    """Existing topics do not match the configuration (e.g. steps and runs partition counts)."""


class WatcherError(StreamerError):
    """The completion watcher could not read Temporal or its checkpoint."""

    retriable = True
