"""Confluent framing chosen by configuration, against a real schema registry (Apicurio).

The streamer writes steps and runs, the builder its envelopes, all Confluent-framed with the
schemas registered in the session's registry; the builder reads the steps and runs through the
registry; ClickHouse's own ``AvroConfluent`` reader (chDB through clickhouse-connect) decodes
the messages as they are on the topic, fetching the writer schemas from the same registry.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.consumers import BuilderConfig, ClickHouseConfig, verify_run
from chio_receipts.consumers.siem import ExporterConfig, SiemExporter, parse_output
from chio_receipts.schemas import KafkaConnection
from chio_receipts.stack import connect_clickhouse
from tests.support.avro_strategies import sample_run, sample_step
from tests.support.builder_service import Running
from tests.support.consumer_factory import completion_value
from tests.support.helpers import eventually
from tests.support.kafka_topics import make_topics, produce, read_all
from tests.support.streamer_kafka import config, consume

pytestmark = pytest.mark.integration

WORKER = schemas.KeyPair.generate("worker-cf")
BUILDER = schemas.KeyPair.generate("builder-cf")


def _run(workflow_id: str, run_id: str, n: int) -> list[tuple[schemas.StepReceipt, bytes]]:
    out = []
    prev = b""
    for i in range(n):
        step = sample_step(
            receipt_id=str(uuid.uuid4()),
            workflow_id=workflow_id,
            run_id=run_id,
            activity_id=str(i + 1),
            attempt=1,
            namespace="default",
            prev_hash=prev,
            key_id=WORKER.key_id,
            chio_receipt="",
            chio_signed=b"",
        )
        signed, body = schemas.sign_receipt(step, WORKER)
        prev = schemas.receipt_hash(body)
        out.append((signed, body))
    return out


async def _subjects(registry_url: str) -> list[str]:
    async with httpx.AsyncClient() as client:
        resp = await client.get(f"{registry_url}/subjects")
        resp.raise_for_status()
        subjects: list[str] = resp.json()
        return subjects


async def test_confluent_framing_by_configuration_end_to_end(
    kafka_bootstrap: str,
    clickhouse_dsn: str,
    schema_registry_url: str,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    cfg = config(
        kafka_bootstrap,
        str(tmp_path / "spool"),
        unique("cf") + ".",
        durability="queued",
        wire_format="confluent",
        registry_url=schema_registry_url,
    )
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    run = _run("wf-cf", "run-cf", 3)
    done = sample_run(
        namespace="default",
        workflow_id="wf-cf",
        run_id="run-cf",
        expected_steps=3,
        expected_attempts=(),
    )
    async with streamer.ReceiptStreamer(cfg) as s:
        for step, body in run:
            await s.publish_step(step, body)
        await s.publish_completion(done)
        assert await s.flush(30)
    t = cfg.topics
    # TopicNameStrategy by default: <topic>-value.
    subjects = set(await _subjects(schema_registry_url))
    assert {f"{t.steps}-value", f"{t.runs}-value"} <= subjects, subjects

    builder = BuilderConfig(
        kafka=cfg.kafka,
        clickhouse=ClickHouseConfig(dsn=clickhouse_dsn),
        builder_key=BUILDER,
        public_keys={WORKER.key_id: WORKER.public_key},
        topics=t.names,
        group_id=f"g-{t.steps}",
        poll_timeout_ms=100,
        grace_seconds=0.0,
        registry_url=schema_registry_url,
        envelope_wire_format="confluent",
    )
    async with Running(builder) as running:

        async def written() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(written, timeout=60)
        assert await running.scalar("SELECT count() FROM step_receipts") == 3
        keys = {WORKER.key_id: WORKER.public_key, BUILDER.key_id: BUILDER.public_key}
        report = verify_run(running.service.sink.client, "wf-cf", keys=keys)
        assert report.ok, report.summary()
    assert f"{t.envelopes_topic}-value" in set(await _subjects(schema_registry_url))
    [env] = await consume(kafka_bootstrap, [t.envelopes_topic], 1)
    assert env.value[:1] == b"\x00"
    reader = schemas.Codec(schemas.SchemaRegistryClient(schema_registry_url))
    try:
        decoded = await reader.decode_async(env.value)
    finally:
        await reader.registry.aclose()  # type: ignore[union-attr]
    assert decoded.schema_name == schemas.ENVELOPE_SCHEMA
    assert decoded.record["run_id"] == "run-cf"
    assert len(decoded.record["steps"]) == 3

    # The SIEM exporter reads the Confluent-framed steps and envelopes through the registry.
    out = tmp_path / "ocsf.jsonl"
    exporter_config = ExporterConfig(
        kafka=cfg.kafka,
        output=parse_output(f"jsonl:{out}"),
        group_id=unique("siem"),
        topics=t.names,
        export_envelopes=True,
        registry_url=schema_registry_url,
    )
    stop = asyncio.Event()
    async with SiemExporter(exporter_config) as exporter:
        task = asyncio.create_task(exporter.run(stop))
        try:

            async def drained() -> bool:
                if task.done():
                    task.result()
                lines = out.read_text().count("\n") if out.exists() else 0
                return lines >= 4 and await exporter.lag() == 0

            await eventually(drained, timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    logs = sorted(e["metadata"]["log_name"] for e in events)
    assert logs == ["chio.receipts.envelopes", *["chio.receipts.steps"] * 3], logs
    assert not await read_all(kafka_bootstrap, t.dlq_topic, 0, timeout=2)


async def test_clickhouse_reads_the_topics_with_its_own_avro_confluent_decoder(
    kafka_bootstrap: str,
    clickhouse_dsn: str,
    schema_registry_url: str,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    cfg = config(
        kafka_bootstrap,
        str(tmp_path / "spool"),
        unique("ch") + ".",
        durability="queued",
        wire_format="confluent",
        registry_url=schema_registry_url,
    )
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    run = _run("wf-ch", "run-ch", 4)
    done = sample_run(namespace="default", workflow_id="wf-ch", run_id="run-ch", expected_steps=4)
    async with streamer.ReceiptStreamer(cfg) as s:
        for step, body in run:
            await s.publish_step(step, body)
        await s.publish_completion(done)
        assert await s.flush(30)
    records = await consume(kafka_bootstrap, [cfg.topics.steps, cfg.topics.runs], 5)
    steps = sorted(
        (r for r in records if r.topic == cfg.topics.steps), key=lambda r: (r.partition, r.offset)
    )
    runs = [r for r in records if r.topic == cfg.topics.runs]
    assert len(steps) == 4
    assert len(runs) == 1
    assert all(r.value[:1] == b"\x00" for r in records)
    # The messages exactly as on the topic, one after the other: what the Kafka engine reads.
    steps_file = tmp_path / "steps.avroconfluent"
    steps_file.write_bytes(b"".join(r.value for r in steps))
    runs_file = tmp_path / "runs.avroconfluent"
    runs_file.write_bytes(runs[0].value)
    client: Any = connect_clickhouse(clickhouse_dsn)
    settings = f"SETTINGS format_avro_schema_registry_url = '{schema_registry_url}'"
    try:
        # The column list of the Kafka-engine table the README shows.
        got = client.query(
            "SELECT receipt_id, workflow_id, run_id, activity_id, attempt, verdict, key_id, "
            "hex(signature), toUnixTimestamp64Micro(evaluated_at), tool FROM file("
            f"'{steps_file}', 'AvroConfluent', 'receipt_id String, namespace String, "
            "workflow_id String, run_id String, activity_id String, activity_type String, "
            "attempt Int32, tool_server String, tool String, verdict String, reason String, "
            f"evaluated_at DateTime64(6), key_id String, signature String') {settings}"
        ).result_rows
        completion = client.query(
            f"SELECT workflow_id, run_id, expected_steps FROM file('{runs_file}', "
            "'AvroConfluent', 'workflow_id String, run_id String, expected_steps Nullable(Int32)') "
            f"{settings}"
        ).result_rows
    finally:
        client.close()
    expected = sorted(
        (
            step.receipt_id,
            step.workflow_id,
            step.run_id,
            step.activity_id,
            step.attempt,
            step.verdict.name,
            step.key_id,
            step.signature.hex().upper(),
            step.evaluated_at,
            step.tool,
        )
        for step, _ in run
    )
    assert sorted(got) == expected
    assert completion == [("wf-ch", "run-ch", 4)]


async def test_a_v2_writer_registered_in_the_registry_is_read_by_resolution(
    kafka_bootstrap: str,
    clickhouse_dsn: str,
    schema_registry_url: str,
    unique: Callable[[str], str],
) -> None:
    """The F17a path in process: a StepReceipt schema with an added field (with a default),
    registered by a newer producer, is read by the current builder through the registry."""
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    v2 = copy.deepcopy(schemas.raw_schema(schemas.STEP_SCHEMA))
    v2["fields"].insert(len(v2["fields"]) - 1, {"name": "region", "type": "string", "default": ""})
    async with schemas.SchemaRegistryClient(schema_registry_url) as registry:
        schema_id = await registry.register(f"{topics.steps}-value", v2)
    [(step, _)] = _run("wf-v2", "run-v2", 1)
    parsed = fastavro.parse_schema(v2, named_schemas={})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, {**step.to_avro(), "region": "eu", "signature": b""})
    unsigned = buf.getvalue()
    body = unsigned[:-1] + b"\x80\x01" + WORKER.sign(unsigned)
    key = step.run_key.encode()
    await produce(
        kafka_bootstrap, topics.steps, [(key, schemas.confluent_frame(schema_id, body), None)]
    )
    done = sample_run(namespace="default", workflow_id="wf-v2", run_id="run-v2", expected_steps=1)
    await produce(kafka_bootstrap, topics.runs, [(key, completion_value(done), None)])
    builder = BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        clickhouse=ClickHouseConfig(dsn=clickhouse_dsn),
        builder_key=BUILDER,
        public_keys={WORKER.key_id: WORKER.public_key},
        topics=topics,
        group_id=f"g-{topics.steps}",
        poll_timeout_ms=100,
        registry_url=schema_registry_url,
    )
    async with Running(builder) as running:

        async def written() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(written, timeout=30)
        got = await running.scalar("SELECT toString(any(receipt_id)) FROM step_receipts")
        assert got == step.receipt_id
        keys = {WORKER.key_id: WORKER.public_key, BUILDER.key_id: BUILDER.public_key}
        client = running.service.sink.client
        # Without the registry the stored v2 message cannot be read; with it, it verifies.
        blind = verify_run(client, "wf-v2", keys=keys)
        assert any("does not decode" in p for p in blind.problems), blind.problems
        codec = schemas.Codec(schemas.SchemaRegistryClient(schema_registry_url))
        report = verify_run(client, "wf-v2", keys=keys, codec=codec)
        assert report.ok, report.summary()
        await codec.registry.aclose()  # type: ignore[union-attr]
    assert not await read_all(kafka_bootstrap, topics.dlq, 0, timeout=2)
