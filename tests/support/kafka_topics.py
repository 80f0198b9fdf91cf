"""Topic setup and plain produce/consume helpers for the consumer tests (real Kafka)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from chio_receipts.schemas import TopicNames


@dataclass(frozen=True)
class TopicSet:
    """Unique topic names of one test."""

    topics: TopicNames
    partitions: int


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    """Create ``names`` with ``partitions`` partitions each (replication 1)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(name=n, num_partitions=partitions, replication_factor=1) for n in names]
        )
    finally:
        await admin.close()


async def make_topics(bootstrap: str, unique: Any, partitions: int = 4) -> TopicNames:
    """Fresh steps/runs/envelopes/dlq topics; steps and runs co-partitioned."""
    topics = TopicNames(
        steps=unique("steps"), runs=unique("runs"), envelopes=unique("env"), dlq=unique("dlq")
    )
    await create_topics(bootstrap, [topics.steps, topics.runs, topics.envelopes], partitions)
    await create_topics(bootstrap, [topics.dlq], 1)
    return topics


async def produce(
    bootstrap: str,
    topic: str,
    messages: Sequence[tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]],
) -> None:
    """Produce (key, value, headers) messages and wait for all acks."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Any]:
    """Read ``topic`` from the beginning until ``expected`` messages (or the timeout)."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    out: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < expected and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out
