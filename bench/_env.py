"""What the service benchmarks need from the runner: the stack's addresses and a scratch dir."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client

from chio_receipts.schemas import KafkaConnection

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
