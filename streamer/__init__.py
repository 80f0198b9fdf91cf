"""Carries receipts to Kafka without losing one: producer, spool, completion watcher, topics.

``ReceiptStreamer`` implements ``schemas.ReceiptSink`` on aiokafka; ``Spool`` is its local
write-ahead log; ``CompletionWatcher`` emits a run-completion event for every closed Temporal
run; ``ensure_topics`` creates the pipeline's topics.
"""

from __future__ import annotations

from chio_receipts.streamer._cloudevents import (
    COMPLETION_TYPE,
    CONTENT_TYPE,
    ENVELOPE_TYPE,
    STEP_TYPE,
    Framer,
    completion_record,
    envelope_record,
    step_record,
)
from chio_receipts.streamer._config import (
    Compression,
    Durability,
    StreamerConfig,
    TopicsConfig,
    TopicSettings,
)
from chio_receipts.streamer._errors import (
    SpoolError,
    SpoolFull,
    StreamerClosed,
    StreamerError,
    TopicError,
    TopicMismatch,
    WatcherError,
)
from chio_receipts.streamer._history import HistoryFacts, completion_event, history_facts
from chio_receipts.streamer._metrics import StreamerMetrics, start_metrics_server
from chio_receipts.streamer._partition import PartitionCache, murmur2, partition_for
from chio_receipts.streamer._spool import AsyncSpool, Spool, SpoolBatch, SpoolPosition, SpoolRecord
from chio_receipts.streamer._streamer import ReceiptStreamer
from chio_receipts.streamer._topics import TopicState, describe_topics, ensure_topics
from chio_receipts.streamer._watcher import (
    DEFAULT_LAG_WINDOW_S,
    Checkpoint,
    CompletionWatcher,
    WatcherConfig,
)

__all__ = [
    "COMPLETION_TYPE",
    "CONTENT_TYPE",
    "DEFAULT_LAG_WINDOW_S",
    "ENVELOPE_TYPE",
    "STEP_TYPE",
    "AsyncSpool",
    "Checkpoint",
    "CompletionWatcher",
    "Compression",
    "Durability",
    "Framer",
    "HistoryFacts",
    "PartitionCache",
    "ReceiptStreamer",
    "Spool",
    "SpoolBatch",
    "SpoolError",
    "SpoolFull",
    "SpoolPosition",
    "SpoolRecord",
    "StreamerClosed",
    "StreamerConfig",
    "StreamerError",
    "StreamerMetrics",
    "TopicError",
    "TopicMismatch",
    "TopicSettings",
    "TopicState",
    "TopicsConfig",
    "WatcherConfig",
    "WatcherError",
    "completion_event",
    "completion_record",
    "describe_topics",
    "ensure_topics",
    "envelope_record",
    "history_facts",
    "murmur2",
    "partition_for",
    "start_metrics_server",
    "step_record",
]
