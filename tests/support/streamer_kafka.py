"""Helpers for the streamer's real-broker tests."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer


async def consume(
    bootstrap: str, topics: list[str], expected: int, *, timeout: float = 60.0
) -> list[ConsumerRecord[Any, Any]]:
    """Read from the beginning of ``topics`` until ``expected`` records arrived (or timeout)."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[ConsumerRecord[Any, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(got) < expected:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    got.extend(records)
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return got


def config(bootstrap: str, spool_dir: str, prefix: str, **kw: Any) -> streamer.StreamerConfig:
    """A streamer config with short timeouts for tests."""
    defaults: dict[str, Any] = {
        "send_timeout_s": 3.0,
        "delivery_timeout_s": 5.0,
        "request_timeout_ms": 5000,
        "start_timeout_s": 5.0,
        "stop_timeout_s": 6.0,
        "retry_backoff_s": 0.2,
        "max_retry_backoff_s": 1.0,
    }
    defaults.update(kw)
    return streamer.StreamerConfig(
        kafka=schemas.KafkaConnection(bootstrap_servers=bootstrap),
        spool_dir=spool_dir,
        topics=streamer.TopicsConfig(prefix=prefix, partitions=3),
        **defaults,
    )


def receipt_id_of(value: bytes, codec: schemas.Codec | None = None) -> str:
    """The receipt id inside a step record's value."""
    decoded = (codec or schemas.Codec()).decode(value)
    return str(decoded.record["receipt_id"])
