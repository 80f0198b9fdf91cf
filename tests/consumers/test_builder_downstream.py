"""Nothing dropped downstream of the builder, on the real broker and ClickHouse (chDB by
default): refused envelope rows and mis-keyed messages are dead-lettered with their reason."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import chio_receipts.streamer as streamer
from chio_receipts.consumers import parse_dead_letter_headers
from chio_receipts.consumers._failpoints import reset_failpoints
from chio_receipts.consumers.siem import ExporterConfig, SiemExporter, parse_output
from chio_receipts.schemas import (
    DEAD_LETTER_EVENT_TYPE,
    ENVELOPE_EVENT_TYPE,
    WORKER_ENVELOPE_EVENT_TYPE,
    KafkaConnection,
    decode,
    envelope_event_id,
)
from tests.consumers.test_builder_kafka import WORKER, _config
from tests.support.builder_service import Running
from tests.support.consumer_factory import completion, completion_value, signed_run
from tests.support.helpers import eventually
from tests.support.kafka_topics import make_topics, produce, read_all

pytestmark = pytest.mark.integration


async def test_an_envelope_row_clickhouse_refuses_is_dead_lettered_and_not_marked_written(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    key = b"default/wf-refused-env/r"
    run = signed_run(WORKER, "wf-refused-env", "r", 3)
    await produce(kafka_bootstrap, topics.steps, [(key, w, None) for _, w in run[:2]])
    done = completion_value(completion("wf-refused-env", "r", expected=2))
    await produce(kafka_bootstrap, topics.runs, [(key, done, None)])
    reset_failpoints("clickhouse.refuse.workflow_receipts=raise")  # the first envelope insert
    try:
        async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:
            (dead,) = await read_all(kafka_bootstrap, topics.dlq, 1)
            running.check()
            assert await running.scalar("SELECT count() FROM step_receipts") == 2
            assert await running.scalar("SELECT count() FROM workflow_receipts") == 0
            state = running.service.builder.get(key.decode())
            assert state is not None
            assert state.revision == 0  # not marked written
            # The run's next event makes the revision due again; this time it is stored.
            await produce(kafka_bootstrap, topics.steps, [(key, run[2][1], None)])

            async def stored() -> bool:
                running.check()
                return await running.scalar("SELECT count() FROM workflow_receipts") == 1

            await eventually(stored, timeout=30)
            assert await running.scalar("SELECT max(step_count) FROM workflow_receipts") == 3
    finally:
        reset_failpoints("")
    headers = dict(dead.headers)
    assert headers["ce_type"] == DEAD_LETTER_EVENT_TYPE.encode()
    # Stable: the run and revision, so a replay that refuses it again gives the same id.
    assert headers["ce_id"] == b"workflow_receipts/wf-refused-env/r/1"
    assert headers["chio.dlq.original.ce_type"] == ENVELOPE_EVENT_TYPE.encode()
    dlq = parse_dead_letter_headers(dead.headers)
    assert (dlq["topic"], dlq["reason"]) == (topics.envelopes, "clickhouse_data")
    assert "refuse" in dlq["detail"]
    assert dead.key == key
    envelope = decode(dead.value)
    assert (envelope.record["step_count"], envelope.record["metadata"]["revision"]) == (2, "1")


async def test_a_message_keyed_by_another_run_is_dead_lettered_as_a_key_mismatch(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    key = b"default/wf-keyed/r"
    run = signed_run(WORKER, "wf-keyed", "r", 2)
    stray = signed_run(WORKER, "wf-stray", "r", 1)
    steps = [
        (key, run[0][1], None),
        (key, stray[0][1], None),  # wf-stray's step under wf-keyed's key
        (None, run[1][1], None),  # no key at all: the wrong partition is as likely
        (key, run[1][1], None),
    ]
    await produce(kafka_bootstrap, topics.steps, steps)
    runs = [
        (
            b"default/wf-keyed/other",
            completion_value(completion("wf-keyed", "r", expected=1)),
            None,
        ),
        (key, completion_value(completion("wf-keyed", "r", expected=2)), None),
    ]
    await produce(kafka_bootstrap, topics.runs, runs)
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(written, timeout=30)
        dead = await read_all(kafka_bootstrap, topics.dlq, 3)
        assert await running.scalar("SELECT count() FROM step_receipts") == 2
        row = await running.service.sink.query(
            "SELECT step_count, complete, expected_steps FROM workflow_receipts"
        )
        assert [tuple(r) for r in row[1]] == [(2, True, 2)]
    dlq = [parse_dead_letter_headers(m.headers) for m in dead]
    assert [d["reason"] for d in dlq] == ["key_mismatch"] * 3
    origins = sorted((d["topic"], d["offset"]) for d in dlq)
    assert origins == sorted([(topics.steps, "1"), (topics.steps, "2"), (topics.runs, "0")])
    assert all(d["detail"].startswith("KeyMismatch") for d in dlq)


def _worker_flush(workflow_id: str) -> dict[str, Any]:
    """A worker's own ``flush_workflow_receipt`` envelope (metadata as the interceptor's)."""
    return {
        "version": "chio-temporal/v1",
        "workflow_id": workflow_id,
        "run_id": "r1",
        "parent_workflow_ids": [],
        "started_at": 1,
        "completed_at": 2,
        "outcome": "success",
        "step_count": 0,
        "allow_count": 0,
        "deny_count": 0,
        "steps": [],
        "metadata": {"namespace": "default", "revision": "1", "source": "worker"},
    }


async def test_the_siem_exporter_exports_builder_envelopes_and_skips_worker_flushes(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf = unique("wf-flushed")
    key = f"default/{wf}/r1".encode()
    await produce(
        kafka_bootstrap, topics.steps, [(key, w, None) for _, w in signed_run(WORKER, wf, "r1", 2)]
    )
    done = completion_value(completion(wf, "r1", expected=2))
    await produce(kafka_bootstrap, topics.runs, [(key, done, None)])
    # The worker's flush of the same run, as the streamer publishes it (its own type and id) ...
    flushed = streamer.envelope_record(_worker_flush(wf), topic=topics.envelopes, source="urn:w")
    # ... and one from a streamer older than the type (the builder's type, source "worker").
    legacy = streamer.envelope_record(_worker_flush(wf), topic=topics.envelopes, source="urn:w")
    legacy_headers = [
        (k, ENVELOPE_EVENT_TYPE.encode() if k == "ce_type" else v) for k, v in legacy.headers
    ]
    await produce(
        kafka_bootstrap,
        topics.envelopes,
        [
            (flushed.key, flushed.value, list(flushed.headers)),
            (legacy.key, legacy.value, legacy_headers),
        ],
    )
    assert dict(flushed.headers)["ce_type"] == WORKER_ENVELOPE_EVENT_TYPE.encode()
    assert dict(flushed.headers)["ce_id"] != envelope_event_id(wf, "r1", 1).encode()
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def built() -> bool:
            running.check()
            return await running.scalar("SELECT count() FROM workflow_receipts") == 1

        await eventually(built, timeout=30)
    out = tmp_path / "ocsf.jsonl"
    config = ExporterConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        output=parse_output(f"jsonl:{out}"),
        group_id=unique("g"),
        topics=topics,
        export_envelopes=True,
    )
    stop = asyncio.Event()
    async with SiemExporter(config) as exporter:
        task = asyncio.create_task(exporter.run(stop))
        try:

            async def drained() -> bool:
                if task.done():
                    task.result()
                lines = out.read_text().count("\n") if out.exists() else 0
                return lines >= 3 and await exporter.lag() == 0

            await eventually(drained, timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    envelopes = [e for e in events if e["metadata"]["log_name"] == "chio.receipts.envelopes"]
    assert len(envelopes) == 1  # the builder's; neither worker flush
    assert len(events) == 3  # and the two steps
    # Skipped, not refused: nothing dead-lettered.
    assert await read_all(kafka_bootstrap, topics.dlq, 1, timeout=3) == []
