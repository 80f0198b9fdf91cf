"""Errors of the streamer package.

    schemas.ChioReceiptsError         the project's root (``retriable`` read by ``is_retriable``)
    └── StreamerError                 base of every error raised here
        ├── SpoolError                the local spool cannot be used (I/O error, bad directory);
        │   │                         retriable, and a ``schemas.ReceiptSinkError``
        │   └── SpoolFull             capacity reached; the interceptor fails the attempt
        │                             retryably (Temporal retries it later)
        ├── StreamerClosed            publish after ``stop()``; retriable, a ``ReceiptSinkError``
        ├── TopicError                topics could not be created or described
        │   └── TopicMismatch         existing topics break co-partitioning (steps != runs);
        │                             also a ``schemas.ContractError``
        └── WatcherError              the completion watcher cannot read Temporal or its
                                      checkpoint (retriable: the watcher polls again)

aiokafka and temporalio errors never escape this package: they are translated at the edge with
``raise ... from exc`` or handled (spooled, retried) inside the background sender. Code that
branches on retry semantics reads them with ``schemas.is_retriable``.
"""

from __future__ import annotations

from chio_receipts.schemas import ChioReceiptsError, ContractError, ReceiptSinkError

__all__ = [
    "SpoolError",
    "SpoolFull",
    "StreamerClosed",
    "StreamerError",
    "TopicError",
    "TopicMismatch",
    "WatcherError",
]


class StreamerError(ChioReceiptsError):
    """Base of every error raised by the streamer package."""


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


class TopicMismatch(TopicError, ContractError):
    """Existing topics do not match the configuration (e.g. steps and runs partition counts)."""


class WatcherError(StreamerError):
    """The completion watcher could not read Temporal or its checkpoint."""

    retriable = True
