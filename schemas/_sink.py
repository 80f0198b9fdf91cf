"""The receipt sink protocol: how the interceptor hands receipts on without knowing Kafka.

``streamer.ReceiptStreamer`` implements it on Kafka; ``interceptor.InMemoryReceiptSink`` for tests
and single-process use. Structural typing: implementations need not import this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from chio_receipts.schemas._records import RunCompletion, StepReceipt

__all__ = ["ReceiptSink", "ReceiptSinkError"]


class ReceiptSinkError(Exception):
    """The sink could not accept a receipt (e.g. spool full). The activity attempt must fail
    with a retryable error so Temporal retries it; a receipt is never dropped silently."""

    retriable = True


@runtime_checkable
class ReceiptSink(Protocol):
    """Where receipts go. Calls return once the receipt is accepted under the sink's durability
    policy; they never wait on a remote broker. They raise :class:`ReceiptSinkError` when the
    receipt cannot be accepted."""

    async def publish_step(self, receipt: StepReceipt, body: bytes) -> None:
        """Accept one signed step receipt; ``body`` is its signed schemaless Avro body."""
        ...

    async def publish_completion(self, event: RunCompletion) -> None:
        """Accept one run-completion event."""
        ...

    async def publish_envelope(self, envelope: Mapping[str, Any]) -> None:
        """Accept one finalized ``chio-temporal/v1`` envelope (the seed's flush path)."""
        ...
