"""ReceiptStreamer and ensure_topics against the session's real Kafka broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.sidecar import LocalSidecar
from tests.support.avro_strategies import sample_envelope, sample_run, sample_step
from tests.support.helpers import eventually
from tests.support.registry import FakeRegistry
from tests.support.streamer_kafka import config, consume, receipt_id_of

pytestmark = pytest.mark.integration

KEY = schemas.KeyPair.generate("test-key")


def _signed(run: str, i: int) -> tuple[schemas.StepReceipt, bytes]:
    r = sample_step(
        receipt_id=str(uuid.uuid4()), workflow_id=f"wf-{run}", run_id=run, activity_id=str(i)
    )
    return schemas.sign_receipt(r, KEY)


def _envelope(run: str) -> dict[str, Any]:
    step, _ = _signed(run, 0)
    return sample_envelope(step, workflow_id=f"wf-{run}", run_id=run)


async def test_ensure_topics_is_idempotent_and_refuses_broken_co_partitioning(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    cfg = streamer.TopicsConfig(prefix=unique("t") + ".", partitions=3)
    first = await streamer.ensure_topics(
        schemas.KafkaConnection(bootstrap_servers=kafka_bootstrap), cfg
    )
    assert {s.partitions for n, s in first.items() if n in (cfg.steps, cfg.runs)} == {3}
    assert all(s.created for s in first.values())
    assert first[cfg.dlq_topic].partitions == 1
    again = await streamer.ensure_topics(
        schemas.KafkaConnection(bootstrap_servers=kafka_bootstrap), cfg
    )
    assert not any(s.created for s in again.values())

    bad = streamer.TopicsConfig(prefix=unique("bad") + ".", partitions=3)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(bad.runs, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    with pytest.raises(streamer.TopicMismatch):
        await streamer.ensure_topics(
            schemas.KafkaConnection(bootstrap_servers=kafka_bootstrap), bad
        )


@pytest.mark.parametrize("wire_format", ["single_object", "confluent"])
async def test_every_event_type_round_trips_through_kafka(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path, wire_format: str
) -> None:
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("rt") + ".", durability="queued")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    fake = FakeRegistry()
    registry = schemas.SchemaRegistryClient(
        "http://registry.test", transport=httpx.MockTransport(fake.handler)
    )
    codec = schemas.Codec(registry, wire_format=wire_format)  # type: ignore[arg-type]
    step, body = _signed("run-rt", 1)
    event = sample_run(run_id="run-rt", workflow_id="wf-run-rt")
    envelope = _envelope("run-rt")
    async with streamer.ReceiptStreamer(cfg, codec=codec) as s:
        await s.publish_step(step, body)
        await s.publish_completion(event)
        await s.publish_envelope(envelope)
        assert await s.flush(30)
    t = cfg.topics
    got = await consume(kafka_bootstrap, [t.steps, t.runs, t.envelopes_topic], 3)
    by_topic = {r.topic: r for r in got}
    assert set(by_topic) == {t.steps, t.runs, t.envelopes_topic}
    reader = schemas.Codec(
        schemas.SchemaRegistryClient(
            "http://registry.test", transport=httpx.MockTransport(fake.handler)
        )
    )
    for r in got:
        assert r.value[0] == (0 if wire_format == "confluent" else 0xC3)
        headers = dict(r.headers)
        assert headers["ce_specversion"] == b"1.0"
        assert headers["content-type"] == b"application/avro"
        n = cfg.topics.settings()[r.topic].partitions
        assert r.partition == streamer.partition_for(r.key, n)
    s_rec = by_topic[t.steps]
    decoded = await reader.decode_async(s_rec.value)
    assert decoded.body == body  # the signed body travels unchanged
    assert schemas.verify_body(decoded.body, KEY.public_key)
    assert schemas.StepReceipt.from_avro(decoded.record) == step
    assert dict(s_rec.headers)["ce_id"] == step.receipt_id.encode()
    assert s_rec.key == step.run_key.encode()
    run = schemas.RunCompletion.from_avro(
        (await reader.decode_async(by_topic[t.runs].value)).record
    )
    assert run == event
    env = (await reader.decode_async(by_topic[t.envelopes_topic].value)).record
    assert env["run_id"] == "run-rt"
    assert len(env["steps"]) == 1
    await registry.aclose()


@pytest.mark.parametrize("durability", ["queued", "before_execute"])
async def test_order_per_run_key_is_kept(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path, durability: str
) -> None:
    cfg = config(
        kafka_bootstrap, str(tmp_path / "spool"), unique("ord") + ".", durability=durability
    )
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    sent: dict[bytes, list[str]] = defaultdict(list)
    async with streamer.ReceiptStreamer(cfg) as s:
        for i in range(300):
            step, body = _signed(f"run-{i % 5}", i)
            sent[step.run_key.encode()].append(step.receipt_id)
            await s.publish_step(step, body)
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the sender interleave with publishing
        assert await s.flush(30)
        produced = s.metrics.registry.get_sample_value(
            "chio_streamer_produced_total", {"topic": cfg.topics.steps}
        )
        assert produced == 300
    got = await consume(kafka_bootstrap, [cfg.topics.steps], 300)
    received: dict[bytes, list[str]] = defaultdict(list)
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        received[r.key].append(receipt_id_of(r.value))
    assert received == sent


async def test_stop_cuts_a_long_retry_wait_short(
    unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Kafka unreachable, the sender backs off for up to a minute: stop() does not wait for it."""
    cfg = config(
        "127.0.0.1:1",
        str(tmp_path / "spool"),
        unique("wait") + ".",
        durability="queued",
        retry_backoff_s=30.0,
        max_retry_backoff_s=60.0,
        stop_timeout_s=20.0,
    )
    s = streamer.ReceiptStreamer(cfg)
    await s.start()
    await s.publish_step(*_signed("run-wait", 0))

    def failures() -> float:
        return sum(
            sample.value
            for metric in s.metrics.failed.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )

    await eventually(lambda: failures() >= 1, timeout=60)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await s.stop()
    assert loop.time() - t0 < 3.0
    with streamer.Spool(tmp_path / "spool") as spool:
        assert spool.depth == 1


async def test_unreachable_broker_spools_and_stop_is_bounded(
    unique: Callable[[str], str], tmp_path: Path
) -> None:
    cfg = config(
        "127.0.0.1:1",
        str(tmp_path / "spool"),
        unique("down") + ".",
        durability="queued",
        stop_timeout_s=3.0,
    )
    s = streamer.ReceiptStreamer(cfg)
    await s.start()
    for i in range(20):
        await s.publish_step(*_signed("run-down", i))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await s.stop()
    assert loop.time() - t0 < 5.0
    with streamer.Spool(tmp_path / "spool") as spool:
        assert spool.depth == 20
    full = config(
        "127.0.0.1:1",
        str(tmp_path / "full"),
        "x.",
        durability="before_execute",
        spool_max_bytes=2000,
        stop_timeout_s=2.0,
    )
    async with streamer.ReceiptStreamer(full) as s2:

        async def fill() -> None:
            for i in range(50):
                await s2.publish_step(*_signed("run-full", i))

        with pytest.raises(schemas.ReceiptSinkError):
            await fill()
        assert s2.metrics.registry.get_sample_value("chio_streamer_rejected_total") == 1


async def test_broker_kill_9_mid_stream_loses_no_receipt(
    stack: Any, kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    cfg = config(
        kafka_bootstrap, str(tmp_path / "spool"), unique("kill") + ".", durability="queued"
    )
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    produced: set[str] = set()
    loop = asyncio.get_running_loop()
    async with streamer.ReceiptStreamer(cfg) as s:

        async def publish(n: int, start: int) -> None:
            for i in range(start, start + n):
                step, body = _signed(f"run-{i % 11}", i)
                await s.publish_step(step, body)
                produced.add(step.receipt_id)
                if i % 20 == 0:
                    await asyncio.sleep(0.02)

        await publish(300, 0)
        stack.kafka.kill()
        killed_at = loop.time()
        # Keep producing while the broker is down (about 10 s): the spool takes it.
        while loop.time() - killed_at < 10:
            await publish(20, len(produced))
            await asyncio.sleep(0.2)
        assert s.pending > 0
        await stack.kafka.restart()
        await publish(200, len(produced))
        assert await s.flush(90), f"still pending: {s.pending}"
        spooled = sum(
            m.value
            for metric in s.metrics.registry.collect()
            if metric.name == "chio_streamer_spooled"
            for m in metric.samples
            if m.name.endswith("_total")
        )
        assert spooled > 0
        restarts = s.metrics.registry.get_sample_value("chio_streamer_producer_restarts_total")
        assert restarts is not None
        assert restarts >= 1  # the producer that saw the broker die was replaced, not trusted
    got = await consume(kafka_bootstrap, [cfg.topics.steps], len(produced), timeout=60)
    received = {receipt_id_of(r.value) for r in got}
    assert received == produced


async def test_a_record_kafka_refuses_for_its_size_is_kept_aside_not_blocking(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    cfg = config(
        kafka_bootstrap, str(tmp_path / "spool"), unique("big") + ".", max_request_size=4096
    )
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    big = _envelope("run-big")
    big["steps"] = big["steps"] * 20
    step, body = _signed("run-big", 1)
    async with streamer.ReceiptStreamer(cfg) as s:
        await s.publish_envelope(big)
        await s.publish_step(step, body)
        assert await s.flush(30)
        failed = s.metrics.registry.get_sample_value(
            "chio_streamer_failed_total", {"error": "MessageSizeTooLargeError"}
        )
        assert failed == 1
    got = await consume(kafka_bootstrap, [cfg.topics.steps], 1)
    assert [receipt_id_of(r.value) for r in got] == [step.receipt_id]
    with streamer.Spool(tmp_path / "spool" / "rejected") as rejected:
        kept = rejected.read()
    assert kept is not None
    assert kept.records[0].topic == cfg.topics.envelopes_topic


async def test_steps_with_a_chio_receipt_carry_its_id_and_verdict_in_headers(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("hd") + ".", durability="queued")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    side = LocalSidecar()
    cap = side.mint("agent:a", ["charge"], 60)
    signed = [
        side.evaluate_now(
            schemas.EvaluationRequest(
                capability_id=cap.id,
                tool_server="payments",
                tool=tool,
                workflow_id="wf-hd",
                run_id="run-hd",
                activity_id=str(i),
                parameters={"args": [i]},
            )
        )
        for i, tool in enumerate(["charge", "refund"])
    ]
    legacy, legacy_body = _signed("run-hd", 9)
    async with streamer.ReceiptStreamer(cfg) as s:
        for one in signed:
            await s.publish_step(one.receipt, one.body)
        await s.publish_step(legacy, legacy_body)
        assert await s.flush(30)
    got = await consume(kafka_bootstrap, [cfg.topics.steps], 3)
    by_id = {dict(r.headers)["ce_id"].decode(): dict(r.headers) for r in got}
    for one, verdict in zip(signed, [b"allow", b"deny"], strict=True):
        headers = by_id[one.receipt.receipt_id]
        chio = json.loads(one.receipt.chio_receipt)
        assert headers[schemas.X_CHIO_RECEIPT] == chio["id"].encode()
        assert headers[schemas.X_CHIO_VERDICT] == verdict
    # A step without a Chio receipt (schema v1 writer) gets neither header.
    assert schemas.X_CHIO_RECEIPT not in by_id[legacy.receipt_id]
    assert schemas.X_CHIO_VERDICT not in by_id[legacy.receipt_id]
