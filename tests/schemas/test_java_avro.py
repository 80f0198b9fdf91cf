"""Java Avro 1.12 reads what the project writes to the real broker (steps, runs, envelopes).

Steps, completions and one envelope go through the streamer (``ReceiptStreamer``), the other
envelopes are built and published by the receipt builder; every record is then read back from
the broker and decoded by Java Avro's ``BinaryMessageDecoder`` (``tests/java``), which finds a
writer schema only by its Parsing Canonical Form fingerprint.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.consumers import BuilderConfig, ClickHouseConfig, ReceiptBuilderService
from chio_receipts.consumers._envelope import Envelope
from tests.support.avro_strategies import sample_envelope
from tests.support.consumer_factory import completion, receipt
from tests.support.helpers import eventually
from tests.support.java_avro import java_decode
from tests.support.streamer_kafka import config, consume

pytestmark = pytest.mark.integration

STEP, RUN, ENVELOPE = schemas.STEP_SCHEMA, schemas.RUN_COMPLETION_SCHEMA, schemas.ENVELOPE_SCHEMA
WORKER = schemas.KeyPair.generate("worker-java")
BUILDER = schemas.KeyPair.generate("builder-java")
STEPS_PER_RUN = {"run-a": 2, "run-b": 3, "run-c": 1}


def _signed_run(workflow_id: str, run_id: str, n: int) -> list[tuple[schemas.StepReceipt, bytes]]:
    out: list[tuple[schemas.StepReceipt, bytes]] = []
    prev = b""
    for i in range(n):
        verdict = schemas.Verdict.DENY if i == 1 else schemas.Verdict.ALLOW
        signed, body = schemas.sign_receipt(
            receipt(workflow_id, run_id, i, verdict=verdict, prev_hash=prev), WORKER
        )
        prev = schemas.receipt_hash(body)
        out.append((signed, body))
    return out


def _streamer_envelope(step: schemas.StepReceipt) -> dict[str, Any]:
    return sample_envelope(
        step,
        parent_workflow_ids=["parent-wf"],
        metadata={"namespace": step.namespace, "revision": "1"},
    )


async def test_java_binary_message_decoder_reads_every_topic(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("java") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    topics = cfg.topics.names
    workflow = unique("wf")
    runs = {rid: _signed_run(workflow, rid, n) for rid, n in STEPS_PER_RUN.items()}
    events = {rid: completion(workflow, rid, expected=n) for rid, n in STEPS_PER_RUN.items()}
    extra, _ = schemas.sign_receipt(receipt(f"{workflow}-streamed", "run-s", 0), WORKER)

    async with streamer.ReceiptStreamer(cfg) as s:
        for steps in runs.values():
            for step, body in steps:
                await s.publish_step(step, body)
        for event in events.values():
            await s.publish_completion(event)
        await s.publish_envelope(_streamer_envelope(extra))
        assert await s.flush(30)

    builder = ReceiptBuilderService(
        BuilderConfig(
            kafka=schemas.KafkaConnection(bootstrap_servers=kafka_bootstrap),
            clickhouse=ClickHouseConfig(dsn=clickhouse_dsn),
            builder_key=BUILDER,
            public_keys={WORKER.key_id: WORKER.public_key},
            topics=topics,
            group_id=unique("g"),
            poll_timeout_ms=100,
        )
    )
    stop = asyncio.Event()
    await builder.start()
    task = asyncio.create_task(builder.run(stop))
    try:

        async def built() -> bool:
            if task.done():
                task.result()
            _, rows = await builder.sink.query("SELECT count() FROM workflow_receipts")
            return int(rows[0][0]) >= len(runs)

        await eventually(built, timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await builder.stop()

    n_steps = sum(STEPS_PER_RUN.values())
    records = await consume(
        kafka_bootstrap, [topics.steps, topics.runs, topics.envelopes], n_steps + len(runs) + 4
    )
    by_topic: dict[str, list[Any]] = {topics.steps: [], topics.runs: [], topics.envelopes: []}
    for r in records:
        by_topic[r.topic].append(r)
    assert [len(by_topic[t]) for t in (topics.steps, topics.runs, topics.envelopes)] == [
        n_steps,
        len(runs),
        len(runs) + 1,
    ]
    reader = {topics.steps: STEP, topics.runs: RUN, topics.envelopes: ENVELOPE}
    messages = [(reader[r.topic], r.value) for r in records]
    java = java_decode(messages, tmp_path / "java")

    # Java's fingerprints and canonical forms are the project's.
    for name in (STEP, RUN, ENVELOPE):
        parsed = schemas.parsed_schema(name)
        assert java.fingerprints[name] == schemas.schema_fingerprint(parsed).hex(), name
        assert java.canonical[name] == schemas.parsing_canonical_form(parsed), name

    failed = [(r.topic, out) for r, out in zip(records, java.results, strict=True) if not out["ok"]]
    assert failed == [], failed
    decoded: dict[str, list[dict[str, Any]]] = {t: [] for t in by_topic}
    for r, out in zip(records, java.results, strict=True):
        decoded[r.topic].append(out["record"])

    # Steps: every receipt, field for field as written (bytes as hex).
    written = {step.receipt_id: (step, body) for steps in runs.values() for step, body in steps}
    assert {d["receipt_id"] for d in decoded[topics.steps]} == set(written)
    for d in decoded[topics.steps]:
        step, _ = written[d["receipt_id"]]
        expected = step.to_avro()
        assert d["workflow_id"] == workflow
        assert d["verdict"] == step.verdict.name
        assert d["signature"] == step.signature.hex()
        assert d["prev_hash"] == step.prev_hash.hex()
        assert d["chio_signed"] == step.chio_signed.hex()
        as_bytes = ("signature", "prev_hash", "chio_signed", "verdict")
        assert {k: v for k, v in d.items() if k not in as_bytes} == {
            k: v for k, v in expected.items() if k not in as_bytes
        }

    # Runs: one completion per run, ids and expected step counts as written.
    got_runs = {d["run_id"]: d for d in decoded[topics.runs]}
    assert set(got_runs) == set(events)
    for rid, event in events.items():
        assert got_runs[rid]["event_id"] == event.event_id
        assert got_runs[rid]["workflow_id"] == workflow
        assert got_runs[rid]["expected_steps"] == STEPS_PER_RUN[rid]
        assert got_runs[rid]["outcome"] == "SUCCESS"

    # Envelopes: the builder's (signed, steps inlined in receipt-id order) and the streamer's.
    envelopes = {(d["workflow_id"], d["run_id"]): d for d in decoded[topics.envelopes]}
    streamed = envelopes.pop((extra.workflow_id, extra.run_id))
    assert streamed["steps"][0]["receipt_id"] == extra.receipt_id
    assert streamed["parent_workflow_ids"] == ["parent-wf"]
    assert set(envelopes) == {(workflow, rid) for rid in runs}
    for (_, rid), env in envelopes.items():
        ids = sorted(step.receipt_id for step, _ in runs[rid])
        assert env["step_count"] == STEPS_PER_RUN[rid] == len(env["steps"])
        assert [s["receipt_id"] for s in env["steps"]] == ids
        assert env["allow_count"] + env["deny_count"] == STEPS_PER_RUN[rid]
        assert env["metadata"]["key_id"] == BUILDER.key_id
        assert env["metadata"]["complete"] == "true"
        assert env["outcome"] == "success"


async def test_java_reads_outcome_records_attempt_lists_and_accounted_envelopes(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """The schema v3 additions, written by the project, read by Java Avro: a signed outcome
    record and a completion listing expected attempts (through the streamer and the broker), and
    an envelope carrying outcome records and attempt accounts (the builder's spliced encoding)."""
    import nacl.signing

    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("java3") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    topics = cfg.topics.names
    workflow = unique("wf")
    step, _ = schemas.sign_receipt(receipt(workflow, "run-o", 0), WORKER)
    outcome = schemas.sign_chio_outcome(
        schemas.StepOutcome(
            outcome_id=schemas.uuid7(),
            namespace=step.namespace,
            workflow_id=workflow,
            run_id="run-o",
            workflow_type=step.workflow_type,
            task_queue=step.task_queue,
            activity_id=step.activity_id,
            activity_type=step.activity_type,
            attempt=1,
            is_local=False,
            tool_server=step.tool_server,
            tool=step.tool,
            capability_id=step.capability_id,
            decision_receipt_id=step.receipt_id,
            status=schemas.StepStatus.FAILED,
            error_type="CardDeclined",
            started_at=step.started_at,
            ended_at=step.started_at + 1500,
            duration_us=1500,
            worker_identity=step.worker_identity,
            trace_id="0af7651916cd43dd8448eb211c80319c",
            span_id="b7ad6b7169203331",
        ),
        nacl.signing.SigningKey.generate(),
        policy_hash="00" * 32,
    )
    attempts = (
        schemas.ExpectedAttempt(
            activity_id=step.activity_id,
            activity_type=step.activity_type,
            attempt=1,
            is_local=False,
            temporal_end="failed:CardDeclined",
        ),
        schemas.ExpectedAttempt(
            activity_id="2", activity_type="refund", attempt=1, is_local=True, temporal_end=""
        ),
    )
    event = dataclasses.replace(
        completion(workflow, "run-o", expected=2), expected_attempts=attempts
    )
    async with streamer.ReceiptStreamer(cfg) as s:
        await s.publish_outcome(outcome)
        await s.publish_completion(event)
        assert await s.flush(30)
    records = await consume(kafka_bootstrap, [topics.steps, topics.runs], 2)
    reader = {topics.steps: schemas.STEP_OUTCOME_SCHEMA, topics.runs: RUN}
    accounts = (
        schemas.AttemptAccount(
            activity_id=step.activity_id,
            activity_type=step.activity_type,
            attempt=1,
            is_local=False,
            account=schemas.AccountState.RECEIPTED,
            outcome=schemas.StepStatus.FAILED,
        ),
        schemas.AttemptAccount(
            activity_id="2",
            activity_type="refund",
            attempt=1,
            is_local=True,
            account=schemas.AccountState.MISSING,
            reason="no_receipt",
        ),
    )
    envelope = Envelope(
        namespace=step.namespace,
        workflow_id=workflow,
        run_id="run-o",
        workflow_type=step.workflow_type,
        parent_workflow_ids=(),
        started_at=1,
        completed_at=2,
        outcome="failure",
        revision=1,
        complete=False,
        missing_steps=1,
        expected_steps=2,
        allow_count=0,
        deny_count=0,
        receipt_ids=(),
        steps=(),
        chain_root=b"\0" * 32,
        outcomes=(schemas.encode_body(schemas.STEP_OUTCOME_SCHEMA, outcome.to_avro()),),
        attempts=accounts,
    ).signed_by(BUILDER)
    messages = [(reader[r.topic], r.value) for r in records] + [(ENVELOPE, envelope.framed())]
    java = java_decode(messages, tmp_path / "java")
    parsed = schemas.parsed_schema(schemas.STEP_OUTCOME_SCHEMA)
    assert (
        java.fingerprints[schemas.STEP_OUTCOME_SCHEMA] == schemas.schema_fingerprint(parsed).hex()
    )
    assert [out["ok"] for out in java.results] == [True, True, True], java.results
    by_schema = {name: out["record"] for (name, _), out in zip(messages, java.results, strict=True)}
    got = by_schema[schemas.STEP_OUTCOME_SCHEMA]
    assert (got["status"], got["error_type"], got["duration_us"]) == (
        "FAILED",
        "CardDeclined",
        1500,
    )
    assert got["decision_receipt_id"] == step.receipt_id
    assert got["chio_signed"] == outcome.chio_signed.hex()
    assert got["trace_id"] == outcome.trace_id
    run = by_schema[RUN]
    assert [
        (a["activity_id"], a["attempt"], a["is_local"], a["temporal_end"])
        for a in run["expected_attempts"]
    ] == [(a.activity_id, a.attempt, a.is_local, a.temporal_end) for a in attempts]
    env = by_schema[ENVELOPE]
    assert [o["outcome_id"] for o in env["outcomes"]] == [outcome.outcome_id]
    assert [(a["account"], a["reason"], a["outcome"], a["is_local"]) for a in env["attempts"]] == [
        ("RECEIPTED", "", "FAILED", False),
        ("MISSING", "no_receipt", "UNKNOWN", True),
    ]
    assert env["metadata"]["signature"] == envelope.signature.hex()
