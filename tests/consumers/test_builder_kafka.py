"""The receipt builder on the real broker and ClickHouse (chDB by default)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ConfigError,
    ReceiptBuilderService,
    parse_dead_letter_headers,
    verify_run,
)
from chio_receipts.consumers._failpoints import reset_failpoints
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA
from chio_receipts.schemas import (
    CE_HEADERS,
    CONTENT_TYPE,
    DEAD_LETTER_EVENT_TYPE,
    ENVELOPE_EVENT_TYPE,
    STEP_EVENT_TYPE,
    KafkaConnection,
    KeyPair,
    SchemaRegistryClient,
    TopicNames,
    cloudevent_headers,
    confluent_frame,
    decode,
    frame,
    sign_receipt,
    standalone_schema,
)
from chio_receipts.streamer._cloudevents import envelope_id
from tests.support.builder_service import Running
from tests.support.consumer_factory import STEP, completion, completion_value, receipt, signed_run
from tests.support.helpers import eventually
from tests.support.kafka_topics import create_topics, make_topics, produce, read_all

pytestmark = pytest.mark.integration
WORKER = KeyPair.generate("worker-1")
BUILDER = KeyPair.generate("builder-1")
KEYS = {WORKER.key_id: WORKER.public_key, BUILDER.key_id: BUILDER.public_key}


def _config(bootstrap: str, dsn: str, topics: TopicNames, **kw: Any) -> BuilderConfig:
    return BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=bootstrap),
        clickhouse=ClickHouseConfig(dsn=dsn),
        builder_key=BUILDER,
        public_keys={WORKER.key_id: WORKER.public_key},
        topics=topics,
        group_id=f"g-{topics.steps}",
        poll_timeout_ms=100,
        **kw,
    )


def _run_messages(n_runs: int, steps: int, prefix: str) -> tuple[list[Any], list[Any]]:
    step_msgs: list[Any] = []
    run_msgs: list[Any] = []
    for r in range(n_runs):
        wf, rid = f"{prefix}-{r}", f"run-{r}"
        key = f"default/{wf}/{rid}".encode()
        for _, wire in signed_run(WORKER, wf, rid, steps, deny=(r % steps,) if r % 7 == 0 else ()):
            step_msgs.append((key, wire, None))
        run_msgs.append((key, completion_value(completion(wf, rid, expected=steps)), None))
    return step_msgs, run_msgs


async def test_200_runs_from_two_producers_give_200_envelopes_and_1000_rows(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique)
    steps, runs = _run_messages(200, 5, unique("wf"))
    # Two producer tasks, like two workers, each with half of the runs' steps interleaved.
    await asyncio.gather(
        produce(kafka_bootstrap, topics.steps, steps[0::2]),
        produce(kafka_bootstrap, topics.steps, steps[1::2]),
    )
    await produce(kafka_bootstrap, topics.runs, runs)
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def envelopes() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") >= 200

        await eventually(envelopes, timeout=60)
        assert await running.scalar("SELECT count() FROM step_receipts") == 1000
        assert await running.scalar("SELECT count() FROM workflow_receipts") == 200
        assert await running.scalar("SELECT uniqExact(workflow_id) FROM workflow_receipts") == 200
        assert await running.scalar("SELECT sum(step_count) FROM workflow_receipts") == 1000
        assert await running.scalar("SELECT countIf(NOT complete) FROM workflow_receipts") == 0
        assert await running.scalar("SELECT max(revision) FROM workflow_receipts") == 1
        report = verify_run(
            running.service.sink.client, steps[0][0].decode().split("/")[1], keys=KEYS
        )
        assert report.ok, report.summary()

        async def drained() -> bool:
            return await running.service.lag() == 0

        await eventually(drained, timeout=10)
    published = await read_all(kafka_bootstrap, topics.envelopes, 200)
    assert len(published) == 200
    env = decode(published[0].value)
    assert env.schema_name == ENVELOPE_SCHEMA
    assert env.record["metadata"]["key_id"] == BUILDER.key_id
    assert env.record["step_count"] == 5


async def test_refuses_to_start_when_not_copartitioned(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = TopicNames(
        steps=unique("steps"), runs=unique("runs"), envelopes=unique("e"), dlq=unique("d")
    )
    await create_topics(kafka_bootstrap, [topics.steps], 4)
    await create_topics(kafka_bootstrap, [topics.runs], 2)
    service = ReceiptBuilderService(_config(kafka_bootstrap, clickhouse_dsn, topics))
    with pytest.raises(ConfigError, match="co-partitioned"):
        await service.start()
    await service.stop()


async def test_poison_messages_go_to_the_dlq_and_the_consumer_keeps_going(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    good = signed_run(WORKER, "wf-good", "r", 2)
    _, wire = signed_run(WORKER, "wf-bad", "r", 1)[0]
    tampered = bytearray(wire)
    tampered[wire.index(b"allowed by scope")] ^= 0x01  # a signed field changed
    foreign = KeyPair.generate(WORKER.key_id)  # same key id, wrong key
    _, forged = signed_run(foreign, "wf-bad", "r2", 1)[0]
    poison = [
        (b"k", random.Random(1).randbytes(40), [("origin", b"test")]),
        (b"k", wire[: len(wire) // 2], None),
        (b"k", b"\xc3\x01" + b"\x11" * 8 + wire[10:], None),
        (b"k", bytes(tampered), None),
        (b"k", forged, None),
    ]
    key = b"default/wf-good/r"
    msgs = [(key, good[0][1], None), *poison, (key, good[1][1], None)]
    await produce(kafka_bootstrap, topics.steps, msgs)
    await produce(
        kafka_bootstrap,
        topics.runs,
        [(key, completion_value(completion("wf-good", "r", expected=2)), None)],
    )
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(written, timeout=30)
        assert await running.scalar("SELECT count() FROM step_receipts") == 2
    dead = await read_all(kafka_bootstrap, topics.dlq, len(poison))
    assert len(dead) == len(poison)
    reasons = []
    for msg, (_, value, _) in zip(sorted(dead, key=lambda m: m.offset), poison, strict=True):
        headers = parse_dead_letter_headers(msg.headers)
        assert msg.value == value  # original bytes
        assert headers["topic"] == topics.steps
        assert headers["partition"] == "0"
        assert int(headers["offset"]) >= 1
        assert headers["error_class"]
        reasons.append(headers["reason"])
    assert reasons == [
        "unknown_format",
        "malformed",
        "unknown_schema",
        "bad_signature",
        "bad_signature",
    ]
    assert ("origin", b"test") in sorted(dead, key=lambda m: m.offset)[0].headers


async def test_envelopes_and_dead_letters_carry_cloudevents_headers(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    run = signed_run(WORKER, "wf-ce", "r", 2)
    key = b"default/wf-ce/r"
    # A step as the streamer frames it (its own CloudEvents headers), but not Avro at all.
    streamed = list(
        cloudevent_headers(
            event_id="bad-1", event_type=STEP_EVENT_TYPE, source="urn:test", subject=key.decode()
        )
    )
    steps = [(key, run[0][1], None), (key, b"not avro", streamed), (key, run[1][1], None)]
    await produce(kafka_bootstrap, topics.steps, steps)
    done = completion_value(completion("wf-ce", "r", expected=2))
    await produce(kafka_bootstrap, topics.runs, [(key, done, None)])
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(written, timeout=30)
    (envelope,) = await read_all(kafka_bootstrap, topics.envelopes, 1)
    headers = dict(envelope.headers)
    assert [k for k, _ in envelope.headers] == list(CE_HEADERS)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_type"] == ENVELOPE_EVENT_TYPE.encode()
    assert headers["ce_id"] == b"wf-ce/r/1"  # the streamer's envelope id: workflow/run/revision
    assert headers["ce_id"] == envelope_id(decode(envelope.value).record).encode()
    assert headers["ce_source"] == b"urn:chio-receipts:receipt-builder"
    assert headers["ce_subject"] == key
    assert headers["content-type"] == CONTENT_TYPE
    assert envelope.key == key

    (dead,) = await read_all(kafka_bootstrap, topics.dlq, 1)
    names = [k for k, _ in dead.headers]
    assert all(names.count(h) == 1 for h in CE_HEADERS), names
    headers = dict(dead.headers)
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_type"] == DEAD_LETTER_EVENT_TYPE.encode()
    assert headers["ce_id"] == f"{topics.steps}/0/1".encode()
    assert headers["ce_source"] == b"urn:chio-receipts:receipt-builder"
    assert headers["ce_subject"] == key
    assert headers["content-type"] == CONTENT_TYPE  # the original's; the value is its bytes
    assert dead.value == b"not avro"
    dlq = parse_dead_letter_headers(dead.headers)
    assert (dlq["topic"], dlq["offset"], dlq["reason"]) == (topics.steps, "1", "unknown_format")
    assert dlq["original.ce_id"] == "bad-1"
    assert dlq["original.ce_type"] == STEP_EVENT_TYPE


async def test_late_step_gives_revision_2(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    run = signed_run(WORKER, "wf-late", "r", 3)
    key = b"default/wf-late/r"
    await produce(kafka_bootstrap, topics.steps, [(key, w, None) for _, w in run[:2]])
    await produce(
        kafka_bootstrap,
        topics.runs,
        [(key, completion_value(completion("wf-late", "r", expected=3)), None)],
    )
    cfg = _config(kafka_bootstrap, clickhouse_dsn, topics, grace_seconds=0.5)
    async with Running(cfg) as running:
        sql = (
            "SELECT max(revision), argMax(complete, revision), argMax(missing_steps, revision) "
            "FROM workflow_receipts"
        )

        async def rev(expected: tuple[int, bool, int]) -> bool:
            running.check()
            _, rows = await running.service.sink.query(sql)
            return tuple(rows[0]) == expected

        await eventually(lambda: rev((1, False, 1)), timeout=30)
        await produce(kafka_bootstrap, topics.steps, [(key, run[2][1], None)])
        await eventually(lambda: rev((2, True, 0)), timeout=30)
        assert await running.scalar("SELECT count() FROM workflow_receipts FINAL") == 1
        report = verify_run(running.service.sink.client, "wf-late", keys=KEYS)
        assert report.ok, report.summary()


async def test_rebalance_mid_stream_keeps_exactly_once(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=4)
    steps, runs = _run_messages(100, 4, unique("rb"))
    await produce(kafka_bootstrap, topics.steps, steps[:200])
    await produce(kafka_bootstrap, topics.runs, runs)
    config = _config(kafka_bootstrap, clickhouse_dsn, topics)
    async with Running(config) as first:

        async def some() -> bool:
            first.check()
            return await first.scalar("SELECT count() FROM step_receipts") >= 100

        await eventually(some, timeout=60)
        # A second member joins the group: partitions move while steps keep arriving.
        async with Running(config) as second:
            await eventually(lambda: second.service.assignment(), timeout=60)
            await produce(kafka_bootstrap, topics.steps, steps[200:])

            async def all_written() -> bool:
                first.check()
                second.check()
                return await first.scalar("SELECT count() FROM workflow_receipts FINAL") == 100

            await eventually(all_written, timeout=90)
            consumed = second.service.metrics.registry.get_sample_value(
                "chio_consumer_messages_consumed_total", {"topic": topics.steps}
            )
            assert consumed, "the second member never got partitions"
        for final in ("", "FINAL"):
            assert (
                await first.scalar(
                    f"SELECT count() - uniqExact(receipt_id) FROM step_receipts {final}"
                )
                == 0
            )
            assert await first.scalar(f"SELECT count() FROM step_receipts {final}") == 400
        assert await first.scalar("SELECT max(revision) FROM workflow_receipts") == 1
        assert await first.scalar("SELECT countIf(NOT complete) FROM workflow_receipts FINAL") == 0


async def test_failed_insert_is_retried_with_the_same_token(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    steps, runs = _run_messages(5, 3, unique("fp"))
    await produce(kafka_bootstrap, topics.steps, steps)
    await produce(kafka_bootstrap, topics.runs, runs)
    reset_failpoints("clickhouse.insert@1=raise")  # the first insert fails, then succeeds
    try:
        cfg = _config(kafka_bootstrap, clickhouse_dsn, topics, retry_initial_seconds=0.05)
        async with Running(cfg) as running:

            async def written() -> bool:
                running.check()
                return await running.scalar("SELECT count() FROM workflow_receipts") == 5

            await eventually(written, timeout=60)
            assert (
                await running.scalar("SELECT count(), uniqExact(receipt_id) FROM step_receipts")
                == 15
            )
    finally:
        reset_failpoints("")


async def test_rows_clickhouse_refuses_are_isolated_and_dead_lettered(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    key = b"default/wf-rows/r"
    good = signed_run(WORKER, "wf-rows", "r", 3)
    # Signed and decodable, but its receipt id is not a UUID: the UUID column refuses it.
    bad_receipt, bad_body = sign_receipt(
        receipt("wf-rows", "r", 9, receipt_id="not-a-uuid"), WORKER
    )
    bad_wire = frame(STEP, bad_body)
    await produce(
        kafka_bootstrap,
        topics.steps,
        [
            (key, good[0][1], None),
            (key, bad_wire, None),
            (key, good[1][1], None),
            (key, good[2][1], None),
        ],
    )
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM step_receipts") == 3

        await eventually(written, timeout=30)
    [dead] = await read_all(kafka_bootstrap, topics.dlq, 1)
    headers = parse_dead_letter_headers(dead.headers)
    assert headers["reason"] == "clickhouse_data"
    assert headers["offset"] == "1"
    assert dead.value == bad_wire
    assert bad_receipt.receipt_id == "not-a-uuid"


async def test_confluent_framed_messages_are_read_through_the_registry(
    kafka_bootstrap: str,
    clickhouse_dsn: str,
    schema_registry_url: str,
    unique: Callable[[str], str],
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    async with SchemaRegistryClient(schema_registry_url) as registry:
        schema_id = await registry.register(f"{topics.steps}-value", standalone_schema(STEP))
    run = signed_run(WORKER, "wf-cf", "r", 2)
    key = b"default/wf-cf/r"
    steps = [(key, confluent_frame(schema_id, wire[10:]), None) for _, wire in run]
    await produce(kafka_bootstrap, topics.steps, steps)
    done = completion_value(completion("wf-cf", "r", expected=2))
    await produce(kafka_bootstrap, topics.runs, [(key, done, None)])
    cfg = _config(kafka_bootstrap, clickhouse_dsn, topics, registry_url=schema_registry_url)
    async with Running(cfg) as running:

        async def written() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(written, timeout=30)
        assert await running.scalar("SELECT count() FROM step_receipts") == 2
        report = verify_run(running.service.sink.client, "wf-cf", keys=KEYS)
        assert report.ok, report.summary()


async def test_restart_with_a_pending_completion_rebuilds_the_run(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    run = signed_run(WORKER, "wf-open", "r", 3)
    key = b"default/wf-open/r"
    await produce(kafka_bootstrap, topics.steps, [(key, w, None) for _, w in run[:2]])
    done = completion_value(completion("wf-open", "r", expected=3))
    await produce(kafka_bootstrap, topics.runs, [(key, done, None)])
    config = _config(kafka_bootstrap, clickhouse_dsn, topics, grace_seconds=300)
    async with Running(config) as first:

        def waiting() -> bool:
            first.check()
            state = first.service.builder.get("default/wf-open/r")
            return state is not None and state.completion is not None and len(state.steps) == 2

        await eventually(waiting, timeout=30)
        assert await first.scalar("SELECT count() FROM workflow_receipts") == 0
    # The first process is gone with the run open in memory; the last step arrives later.
    await produce(kafka_bootstrap, topics.steps, [(key, run[2][1], None)])
    async with Running(config) as second:

        async def rebuilt() -> bool:
            second.check()
            return await second.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(rebuilt, timeout=30)
        _, rows = await second.service.sink.query(
            "SELECT revision, complete, step_count FROM workflow_receipts"
        )
        assert rows == [(1, True, 3)]
        assert await second.scalar("SELECT count() FROM step_receipts") == 3
