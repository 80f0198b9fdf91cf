"""What the service benchmarks need from the runner: the stack's addresses and a scratch dir."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client

from chio_receipts.schemas import KafkaConnection
from chio_receipts.streamer import ReceiptStreamer, StreamerConfig, TopicsConfig, ensure_topics

__all__ = ["Env"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Env:
    """A running local stack (real Kafka broker, real Temporal dev server) and a scratch dir."""

    kafka_bootstrap: str
    temporal_client: Client
    scratch: Path

    @property
    def kafka(self) -> KafkaConnection:
        """The connection to the stack's broker (plaintext)."""
        return KafkaConnection(bootstrap_servers=self.kafka_bootstrap)

    def unique(self, prefix: str) -> str:
        """A name unique to this run (topics, task queues, groups)."""
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    def directory(self, prefix: str) -> Path:
        """A fresh directory under the scratch dir."""
        path = self.scratch / self.unique(prefix)
        path.mkdir(parents=True)
        return path

    async def started_streamer(self, prefix: str, durability: str = "queued") -> ReceiptStreamer:
        """A started :class:`ReceiptStreamer` on fresh topics (6 partitions) named after
        ``prefix``, spooling under the scratch dir."""
        topics = TopicsConfig(prefix=self.unique(prefix) + ".", partitions=6)
        await ensure_topics(self.kafka, topics)
        streamer = ReceiptStreamer(
            StreamerConfig(
                kafka=self.kafka,
                spool_dir=str(self.directory("spool")),
                topics=topics,
                durability=durability,  # type: ignore[arg-type]
            )
        )
        await streamer.start()
        return streamer
