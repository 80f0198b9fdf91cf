"""The Kafka path over SASL (PLAIN) against a real broker with a second, authenticated listener:
``topics ensure`` from the command line, the streamer, the receipt builder."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    KafkaUnavailable,
    ReceiptBuilderService,
)
from chio_receipts.schemas import (
    CompletionSource,
    KafkaConnection,
    KeyPair,
    Outcome,
    RunCompletion,
    Secret,
    TopicNames,
)
from chio_receipts.stack import KafkaBroker, KafkaConfig
from chio_receipts.streamer import (
    ReceiptStreamer,
    StreamerConfig,
    TopicsConfig,
    describe_topics,
    ensure_topics,
)
from tests.support.faults.receipts import signed_receipts
from tests.support.helpers import eventually

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "chio-writer", "pw-" + uuid.uuid4().hex


def sasl(password: str = PASSWORD) -> dict[str, Any]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": USER,
        "sasl_plain_password": password,
    }


def sasl_connection(broker: KafkaBroker, password: str = PASSWORD) -> KafkaConnection:
    return KafkaConnection(
        bootstrap_servers=broker.sasl_bootstrap,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username=USER,
        sasl_password=Secret(password),
        request_timeout_ms=5000,
    )


async def topics_ensure_cli(broker: KafkaBroker, prefix: str, password: str) -> tuple[int, str]:
    """``chio-receipts topics ensure`` over the SASL listener, as a child process."""
    env = {**os.environ, "CHIO_KAFKA_SASL_PASSWORD": password}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chio_receipts", "topics", "ensure",
        "--bootstrap", broker.sasl_bootstrap,
        "--kafka-security-protocol", "SASL_PLAINTEXT",
        "--kafka-sasl-mechanism", "PLAIN",
        "--kafka-sasl-username", USER,
        "--prefix", prefix, "--partitions", "2",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


@pytest.fixture(scope="module")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KafkaBroker]:
    kafka = KafkaBroker(
        KafkaConfig(
            data_dir=tmp_path_factory.mktemp("sasl"),
            cache_dir=Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache")),
            sasl_users=((USER, PASSWORD),),
        )
    )
    await kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.mark.integration
async def test_topics_ensure_runs_over_sasl_from_the_command_line(
    broker: KafkaBroker, unique: Callable[[str], str]
) -> None:
    prefix = unique("sasl-cli") + "."
    code, out = await topics_ensure_cli(broker, prefix, PASSWORD)
    assert code == 0, out
    topics = TopicsConfig(prefix=prefix)
    assert out.count("\tcreated") == 4, out
    counts = await describe_topics(sasl_connection(broker), list(topics.settings()))
    assert counts[topics.steps] == counts[topics.runs] == 2
    assert PASSWORD not in out

    refused, out = await topics_ensure_cli(broker, unique("sasl-cli-bad") + ".", "not-it")
    assert refused == 1, out
    assert "topics ensure failed" in out


@pytest.mark.integration
async def test_receipts_travel_over_sasl_into_clickhouse(
    broker: KafkaBroker, clickhouse_dsn: str, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    topics = TopicsConfig(prefix=unique("sasl") + ".", partitions=2)
    await ensure_topics(sasl_connection(broker), topics)
    key = KeyPair.generate("sasl-sidecar")
    workflow_id, run_id = unique("wf"), str(uuid.uuid4())
    receipts = signed_receipts(key, workflow_id, run_id, 5)
    now = time.time_ns() // 1000
    async with ReceiptStreamer(
        StreamerConfig(
            kafka=sasl_connection(broker),
            spool_dir=str(tmp_path / "spool"),
            topics=topics,
            durability="queued",
        )
    ) as sink:
        for signed, body in receipts:
            await sink.publish_step(signed, body)
        await sink.publish_completion(
            RunCompletion(
                event_id=str(uuid.uuid4()),
                namespace="default",
                workflow_id=workflow_id,
                run_id=run_id,
                workflow_type="SaslWorkflow",
                task_queue="sasl",
                outcome=Outcome.SUCCESS,
                started_at=now - 1000,
                closed_at=now,
                expected_steps=5,
                source=CompletionSource.WATCHER,
                emitted_at=now,
            )
        )
        assert await sink.flush(20)
    service = ReceiptBuilderService(
        BuilderConfig(
            kafka=sasl_connection(broker),
            clickhouse=ClickHouseConfig(dsn=clickhouse_dsn),
            builder_key=KeyPair.generate("sasl-builder"),
            public_keys={key.key_id: key.public_key},
            topics=TopicNames(
                steps=topics.steps,
                runs=topics.runs,
                envelopes=topics.envelopes_topic,
                dlq=topics.dlq_topic,
            ),
            group_id=unique("g"),
            grace_seconds=5,
        )
    )
    stop = asyncio.Event()
    async with service:
        task = asyncio.create_task(service.run(stop))
        try:

            async def envelope() -> Any:
                _, rows = await service.sink.query(
                    "SELECT step_count, complete FROM workflow_receipts FINAL "
                    "WHERE run_id = {r:String}",
                    {"r": run_id},
                )
                return rows

            assert await eventually(envelope, timeout=60) == [(5, True)]
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


@pytest.mark.integration
async def test_a_wrong_password_is_refused(
    broker: KafkaBroker, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = TopicsConfig(prefix=unique("sasl-bad") + ".", partitions=1)
    await ensure_topics(sasl_connection(broker), topics)
    service = ReceiptBuilderService(
        BuilderConfig(
            kafka=sasl_connection(broker, "not-the-password"),
            clickhouse=ClickHouseConfig(dsn=clickhouse_dsn),
            builder_key=KeyPair.generate("sasl-builder"),
            topics=TopicNames(
                steps=topics.steps,
                runs=topics.runs,
                envelopes=topics.envelopes_topic,
                dlq=topics.dlq_topic,
            ),
            group_id=unique("g"),
        )
    )
    with pytest.raises(KafkaUnavailable):
        await asyncio.wait_for(service.start(), 60)
    await service.stop()
