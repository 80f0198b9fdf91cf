"""The SIEM exporter on the real broker: outcome records from the steps topic and an envelope's
unreceipted attempts become OCSF events that validate; outcomes whose receipt does not check are
not exported."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from chio_receipts import schemas
from chio_receipts.consumers._envelope import Envelope
from chio_receipts.consumers._wire import STEP_OUTCOME_SCHEMA, encode_plain
from chio_receipts.consumers.siem import ExporterConfig, SiemExporter, parse_output
from chio_receipts.schemas import AccountState, AttemptAccount, KafkaConnection, StepStatus
from tests.consumers.test_siem_outcomes import BUILDER, SIDECAR_HEX, TRACE, WORKER
from tests.consumers.test_siem_outcomes import _outcome as outcome_of
from tests.consumers.test_siem_outcomes import _signed as signed
from tests.support.consumer_factory import receipt, uuid7
from tests.support.helpers import eventually
from tests.support.kafka_topics import make_topics, produce
from tests.support.ocsf import ocsf_errors

pytestmark = pytest.mark.integration


async def _committed(bootstrap: str, group: str, topic: str) -> list[int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return [await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(2)]
    finally:
        await consumer.stop()


def _account(activity_id: str, attempt: int, state: AccountState, reason: str = "") -> Any:
    return AttemptAccount(
        activity_id=activity_id,
        activity_type=f"step_{activity_id}",
        attempt=attempt,
        is_local=False,
        account=state,
        reason=reason,
    )


async def test_outcomes_and_unreceipted_attempts_are_exported_as_valid_ocsf(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    wf = unique("wf-outcomes")
    key = f"default/{wf}/r1".encode()
    steps = [receipt(wf, "r1", i, worker_identity="w@host", trace_id=TRACE) for i in range(2)]
    bodies = [schemas.sign_receipt(s, WORKER)[1] for s in steps]

    def outcome(i: int, status: StepStatus, **kw: object) -> schemas.StepOutcome:
        return outcome_of(
            status,
            outcome_id=uuid7(),
            workflow_id=wf,
            run_id="r1",
            activity_id=str(i),
            decision_receipt_id=steps[i].receipt_id if i < 2 else "",
            **kw,
        )

    done = signed(outcome(0, StepStatus.COMPLETED))
    failed = signed(outcome(1, StepStatus.FAILED))
    gate = outcome(2, StepStatus.GATE_FAILED)  # unsigned: the sidecar was unreachable
    forged = dataclasses.replace(signed(outcome(1, StepStatus.FAILED)), status=StepStatus.COMPLETED)
    unsigned = outcome(0, StepStatus.COMPLETED)  # claims a completion nobody signed
    records = [done, failed, gate, forged, unsigned]
    await produce(
        kafka_bootstrap,
        topics.steps,
        [(key, schemas.frame("dev.chio.receipts.v1.StepReceipt", b), None) for b in bodies]
        + [(key, schemas.encode(STEP_OUTCOME_SCHEMA, o.to_avro()), None) for o in records],
    )
    envelope = Envelope(
        namespace="default",
        workflow_id=wf,
        run_id="r1",
        workflow_type="OrderWorkflow",
        parent_workflow_ids=(),
        started_at=steps[0].scheduled_at,
        completed_at=steps[1].evaluated_at + 1_000_000,
        outcome="failure",
        revision=1,
        complete=False,
        missing_steps=1,
        expected_steps=4,
        allow_count=2,
        deny_count=0,
        receipt_ids=tuple(s.receipt_id for s in steps),
        steps=tuple(bodies),
        chain_root=b"\x01" * 32,
        outcomes=tuple(
            encode_plain(STEP_OUTCOME_SCHEMA, o.to_avro()) for o in (done, failed, gate)
        ),
        attempts=(
            _account("0", 1, AccountState.RECEIPTED),
            _account("1", 1, AccountState.RECEIPTED),
            _account("2", 1, AccountState.GATE_FAILED, "sidecar_unreachable"),
            _account("3", 1, AccountState.MISSING, "no receipt for a started attempt"),
        ),
    ).signed_by(BUILDER)
    await produce(kafka_bootstrap, topics.envelopes, [(key, envelope.framed(), None)])

    out = tmp_path / "ocsf.jsonl"
    config = ExporterConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        output=parse_output(f"jsonl:{out}"),
        group_id=unique("g"),
        topics=topics,
        export_envelopes=True,
        trusted_kernel_keys=frozenset({SIDECAR_HEX}),
    )
    expected = 2 + 3 + 1 + 2  # decisions, outcomes that check, the run, its two gaps
    stop = asyncio.Event()
    async with SiemExporter(config) as exporter:
        task = asyncio.create_task(exporter.run(stop))
        try:

            def exported() -> bool:
                assert not task.done(), task
                return out.exists() and out.read_text().count("\n") >= expected

            await eventually(exported, timeout=30)

            async def all_read() -> bool:  # the refused outcomes (last) were read too
                return sum(await _committed(kafka_bootstrap, config.group_id, topics.steps)) == 7

            await eventually(all_read, timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == expected
    invalid = {e["metadata"]["uid"]: errors for e in events if (errors := ocsf_errors(e))}
    assert invalid == {}, invalid
    by_log: dict[str, list[dict[str, object]]] = {}
    for event in events:
        by_log.setdefault(event["metadata"]["log_name"], []).append(event)
    assert {k: len(v) for k, v in by_log.items()} == {
        "chio.receipts.steps": 2,
        "chio.receipts.outcomes": 3,
        "chio.receipts.envelopes": 1,
        "chio.receipts.attempts": 2,
    }
    outcomes = {e["metadata"]["uid"]: e for e in by_log["chio.receipts.outcomes"]}
    assert set(outcomes) == {done.outcome_id, failed.outcome_id, gate.outcome_id}
    assert outcomes[failed.outcome_id]["status_detail"] == "failed: CardDeclined"
    assert outcomes[failed.outcome_id]["api"]["request"]["uid"] == steps[1].receipt_id
    assert outcomes[done.outcome_id]["trace"]["uid"] == TRACE
    assert outcomes[gate.outcome_id]["disposition"] == "Error"
    decisions = {e["api"]["request"]["uid"] for e in by_log["chio.receipts.steps"]}
    assert decisions == {s.receipt_id for s in steps}
    assert all(e["trace"] == {"uid": TRACE} for e in by_log["chio.receipts.steps"])
    gaps = sorted(e["unmapped"]["account"] for e in by_log["chio.receipts.attempts"])
    assert gaps == ["GATE_FAILED", "MISSING"]
    (run,) = by_log["chio.receipts.envelopes"]
    assert run["unmapped"]["outcomes"] == {"COMPLETED": 1, "FAILED": 1, "GATE_FAILED": 1}
