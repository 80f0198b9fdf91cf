"""Smoke tests that prove each real component of the local stack works."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

from chio_receipts.stack import connect_clickhouse


@activity.defn
async def add_one(x: int) -> int:
    return x + 1


@activity.defn
async def double(x: int) -> int:
    return x * 2


@activity.defn
async def describe(x: int) -> str:
    return f"result={x}"


@workflow.defn(sandboxed=False)
class ThreeSteps:
    @workflow.run
    async def run(self, x: int) -> str:
        opts = {"start_to_close_timeout": timedelta(seconds=10)}
        y = await workflow.execute_activity(add_one, x, **opts)  # type: ignore[arg-type]
        z = await workflow.execute_activity(double, y, **opts)  # type: ignore[arg-type]
        return await workflow.execute_activity(describe, z, **opts)  # type: ignore[arg-type]


@pytest.mark.integration
async def test_kafka_thousand_messages_idempotent_acks_all(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    topic = unique("smoke")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        await admin.close()
    sent = {f"m{i}".encode() for i in range(1000)}
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=str(i % 17).encode())
            for i, value in enumerate(sorted(sent))
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=unique("g"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(60):
            while len(got) < len(sent):
                batch = await consumer.getmany(timeout_ms=1000)
                got.extend(m.value for msgs in batch.values() for m in msgs if m.value)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert len(got) == 1000
    assert set(got) == sent


@pytest.mark.integration
async def test_temporal_workflow_with_three_activities(
    temporal_client: Client, unique: Callable[[str], str]
) -> None:
    queue = unique("tq")
    async with Worker(
        temporal_client,
        task_queue=queue,
        workflows=[ThreeSteps],
        activities=[add_one, double, describe],
    ):
        result = await temporal_client.execute_workflow(
            ThreeSteps.run, 20, id=unique("wf"), task_queue=queue
        )
    assert result == "result=42"


@pytest.mark.integration
def test_clickhouse_ten_thousand_rows(clickhouse_dsn: str) -> None:
    client = connect_clickhouse(clickhouse_dsn)
    table = f"smoke_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE TABLE {table} (id UInt64, name String) ENGINE = MergeTree ORDER BY id")
    client.insert(table, [[i, f"n{i}"] for i in range(10_000)], column_names=["id", "name"])
    rows = client.query(f"SELECT count(), sum(id), max(name) FROM {table}").result_rows
    assert rows == [(10_000, sum(range(10_000)), "n9999")]
    client.command(f"DROP TABLE {table}")
