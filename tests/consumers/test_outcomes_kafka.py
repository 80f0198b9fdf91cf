"""Outcome records and gap accounting on the real broker and ClickHouse (chDB by default): the
builder stores and envelopes outcome records, accounts for every attempt Temporal started,
`verify` checks all of it from rows and names real gaps, and refused records are dead-lettered."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import typer
from typer.testing import CliRunner

from chio_receipts.cli_consumers import register
from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ClickHouseSink,
    open_client,
    parse_dead_letter_headers,
    verify_run,
)
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA
from chio_receipts.schemas import (
    STEP_OUTCOME_SCHEMA,
    ExpectedAttempt,
    KafkaConnection,
    KeyPair,
    RunCompletion,
    StepOutcome,
    StepReceipt,
    StepStatus,
    TopicNames,
    Verdict,
    decode,
    encode,
    frame,
    sign_chio_outcome,
)
from tests.support.builder_service import Running
from tests.support.chio_runs import chio_step
from tests.support.consumer_factory import STEP, completion, completion_value, receipt, uuid7
from tests.support.helpers import eventually
from tests.support.kafka_topics import make_topics, produce, read_all

pytestmark = pytest.mark.integration
SIDECAR_SEED = b"\x05" * 32
SIDECAR = KeyPair.from_seed("sidecar-outcomes", SIDECAR_SEED)
SIDECAR_SK = nacl.signing.SigningKey(SIDECAR_SEED)
ROGUE_SK = nacl.signing.SigningKey(b"\x06" * 32)
BUILDER_SEED = b"\x07" * 32
BUILDER = KeyPair.from_seed("builder-outcomes", BUILDER_SEED)
KEYS = {SIDECAR.key_id: SIDECAR.public_key, BUILDER.key_id: BUILDER.public_key}
POLICY = "ab" * 32
_Msg = tuple[bytes | None, bytes, None]


def _config(bootstrap: str, dsn: str, topics: TopicNames) -> BuilderConfig:
    return BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=bootstrap),
        clickhouse=ClickHouseConfig(dsn=dsn),
        builder_key=BUILDER,
        public_keys={SIDECAR.key_id: SIDECAR.public_key},
        topics=topics,
        group_id=f"g-{topics.steps}",
        poll_timeout_ms=100,
        grace_seconds=1.0,
    )


def _key(wf: str, rid: str) -> bytes:
    return f"default/{wf}/{rid}".encode()


def _decision(
    wf: str, rid: str, activity: str, attempt: int, verdict: Verdict = Verdict.ALLOW
) -> tuple[StepReceipt, bytes]:
    """A sidecar-signed decision receipt of one attempt carrying its Chio receipt, and its
    framed wire value."""
    step = receipt(
        wf, rid, 0, activity_id=activity, attempt=attempt, activity_type="charge", verdict=verdict
    )
    signed, body = chio_step(step, SIDECAR, SIDECAR)
    return signed, frame(STEP, body)


def _outcome(
    wf: str,
    rid: str,
    activity: str,
    attempt: int,
    status: StepStatus,
    *,
    decision: StepReceipt | None = None,
    error_type: str = "",
    signer: nacl.signing.SigningKey | None = SIDECAR_SK,
    **overrides: Any,
) -> StepOutcome:
    """An outcome record of one attempt (signed by ``signer`` unless None)."""
    now = 1_760_000_000_000_000
    record = StepOutcome(
        outcome_id=overrides.pop("outcome_id", uuid7()),
        namespace="default",
        workflow_id=wf,
        run_id=rid,
        workflow_type="OrderWorkflow",
        task_queue="orders",
        activity_id=activity,
        activity_type="charge",
        attempt=attempt,
        is_local=False,
        tool_server="agent-tools",
        tool="tool_0",
        capability_id="cap-1" if decision is not None else "",
        decision_receipt_id=decision.receipt_id if decision is not None else "",
        decision_chio_id=json.loads(decision.chio_receipt)["id"] if decision is not None else "",
        status=status,
        error_type=error_type,
        started_at=now,
        ended_at=now + 1_500,
        duration_us=1_500 if decision is not None else 0,
        result_digest="cd" * 32 if status is StepStatus.COMPLETED else "",
        result_key_id="hmac-1" if status is StepStatus.COMPLETED else "",
        worker_identity="worker-1@host",
        **overrides,
    )
    if signer is None:
        return record
    return sign_chio_outcome(record, signer, policy_hash=POLICY)


def _value(outcome: StepOutcome) -> bytes:
    return encode(STEP_OUTCOME_SCHEMA, outcome.to_avro())


def _completion(wf: str, rid: str, expected: list[tuple[str, int, str]]) -> bytes:
    event: RunCompletion = dataclasses.replace(
        completion(wf, rid, expected=None),
        expected_attempts=tuple(
            ExpectedAttempt(
                activity_id=a, activity_type="charge", attempt=n, is_local=False, temporal_end=end
            )
            for a, n, end in expected
        ),
    )
    return completion_value(event)


async def test_outcomes_and_every_expected_attempt_are_accounted_and_verified(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf, rid = unique("wf-acc"), "r1"
    key = _key(wf, rid)
    d1, w1 = _decision(wf, rid, "1", 1)
    d2, w2 = _decision(wf, rid, "2", 2)
    d3, w3 = _decision(wf, rid, "3", 1)
    _, w4 = _decision(wf, rid, "4", 1, Verdict.DENY)
    completed = _outcome(wf, rid, "1", 1, StepStatus.COMPLETED, decision=d1)
    failed = _outcome(wf, rid, "2", 2, StepStatus.FAILED, decision=d2, error_type="ValueError")
    # The sidecar was unreachable for activity 2's first attempt: the gate failed, unsigned.
    gate = _outcome(
        wf, rid, "2", 1, StepStatus.GATE_FAILED, error_type="sidecar_unreachable", signer=None
    )
    steps: list[_Msg] = [(key, w, None) for w in (w1, w2, w3, w4)]
    records: list[_Msg] = [(key, _value(o), None) for o in (completed, gate, failed)]
    records.append((key, _value(completed), None))  # a producer retry: the same record again
    await produce(kafka_bootstrap, topics.steps, steps + records)
    expected = [
        ("1", 1, "completed"),
        ("2", 1, "failed:GateError"),
        ("2", 2, "failed:ValueError"),
        ("2", 3, "timed_out:start_to_close"),  # the worker died before evaluation
        ("3", 1, "timed_out:heartbeat"),  # receipted; the worker died before its outcome
        ("4", 1, "failed:PermissionError"),  # denied: its body never ran
    ]
    await produce(kafka_bootstrap, topics.runs, [(key, _completion(wf, rid, expected), None)])
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> list[tuple[Any, ...]]:
            return await running.rows(
                "SELECT revision, complete, step_count, missing_steps, outcome_ids, attempts, "
                f"extra FROM workflow_receipts WHERE workflow_id = '{wf}'"
            )

        [env] = await eventually(written, timeout=60)
        outcome_rows = await running.rows(
            "SELECT toString(outcome_id), activity_id, attempt, status, error_type, duration_us, "
            "is_signed, decision_receipt_id, toUnixTimestamp64Micro(ended_at), kafka_offset "
            f"FROM step_outcomes WHERE workflow_id = '{wf}' ORDER BY activity_id, attempt"
        )
        report = await running.service.sink.call(lambda c: verify_run(c, wf, keys=KEYS))
    revision, complete, step_count, missing, outcome_ids, attempts, extra = env
    assert (revision, complete, step_count, missing) == (1, True, 4, 0)
    assert list(outcome_ids) == [completed.outcome_id, gate.outcome_id, failed.outcome_id]
    assert [
        (a["activity_id"], a["attempt"], a["account"], a["reason"], a["outcome"]) for a in attempts
    ] == [
        ("1", 1, "RECEIPTED", "", "COMPLETED"),
        ("2", 1, "GATE_FAILED", "sidecar_unreachable", "GATE_FAILED"),
        ("2", 2, "RECEIPTED", "", "FAILED"),
        ("2", 3, "WORKER_LOST", "timed_out:start_to_close", "UNKNOWN"),
        ("3", 1, "RECEIPTED", "", "UNKNOWN"),
        ("4", 1, "RECEIPTED", "denied", "UNKNOWN"),
    ]
    assert (extra["outcomes"], extra["unsigned_outcomes"], extra["expected_attempts"]) == (
        "3",
        "1",
        "6",
    )
    assert (extra["missing_attempts"], extra["gate_failed_attempts"]) == ("0", "1")
    assert extra["worker_lost_attempts"] == "1"
    # One row per record (the retry deduplicated), every field kept.
    assert [r[1:9] for r in outcome_rows] == [
        ("1", 1, "COMPLETED", "", 1_500, True, d1.receipt_id, completed.ended_at),
        ("2", 1, "GATE_FAILED", "sidecar_unreachable", 0, False, "", gate.ended_at),
        ("2", 2, "FAILED", "ValueError", 1_500, True, d2.receipt_id, failed.ended_at),
    ]
    assert d3.receipt_id not in {r[7] for r in outcome_rows}
    assert report.ok, report.summary()
    assert (report.steps, report.outcomes, report.attempts) == (4, 3, 6)
    assert report.notes == [
        f"run {rid}: outcome record {gate.outcome_id} (activity 2 attempt 1, GATE_FAILED): "
        "unsigned (no Chio receipt)"
    ]
    # The published envelope carries the records and the accounts it was signed with.
    [published] = await read_all(kafka_bootstrap, topics.envelopes, 1)
    body = decode(published.value)
    assert body.schema_name == ENVELOPE_SCHEMA
    assert [str(o["outcome_id"]) for o in body.record["outcomes"]] == list(outcome_ids)
    assert [a["account"] for a in body.record["attempts"]] == [
        "RECEIPTED",
        "GATE_FAILED",
        "RECEIPTED",
        "WORKER_LOST",
        "RECEIPTED",
        "RECEIPTED",
    ]
    assert await read_all(kafka_bootstrap, topics.dlq, 1, timeout=3) == []  # nothing refused


async def test_a_real_gap_stays_flagged_and_verify_names_it(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf, rid = unique("wf-gap"), "r1"
    key = _key(wf, rid)
    d1, w1 = _decision(wf, rid, "1", 1)
    first = _outcome(wf, rid, "1", 1, StepStatus.FAILED, decision=d1, error_type="IOError")
    await produce(kafka_bootstrap, topics.steps, [(key, w1, None), (key, _value(first), None)])
    # Attempt 2 failed in Temporal's history, yet no receipt and no gate failure exist for it.
    expected = [("1", 1, "failed:IOError"), ("1", 2, "failed:IOError")]
    await produce(kafka_bootstrap, topics.runs, [(key, _completion(wf, rid, expected), None)])
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> list[tuple[Any, ...]]:
            return await running.rows(
                "SELECT complete, missing_steps, extra['missing_attempts'] "
                f"FROM workflow_receipts WHERE workflow_id = '{wf}'"
            )

        assert await eventually(written, timeout=60) == [(False, 1, "1")]
        report = await running.service.sink.call(lambda c: verify_run(c, wf, keys=KEYS))
    assert not report.ok
    assert report.missing == [(wf, rid, "1", 2)]
    assert report.problems == [
        f"MISSING attempt: workflow {wf} run {rid} activity 1 attempt 2: Temporal started it "
        "and no receipt or gate failure accounts for it (no_receipt)"
    ]
    # The command says the same and exits non-zero.
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(
        json.dumps({"keys": [{"key_id": SIDECAR.key_id, "public_key": SIDECAR.public_key.hex()}]})
    )
    builder_file = tmp_path / "builder-key.json"
    builder_file.write_text(json.dumps({"key_id": BUILDER.key_id, "seed": BUILDER_SEED.hex()}))
    app = typer.Typer()
    register(app)
    args = ["--keys", str(keys_file), "--builder-key", str(builder_file), "--dsn", clickhouse_dsn]
    result = CliRunner().invoke(app, ["verify", "--workflow-id", wf, *args])
    assert result.exit_code == 1, result.output
    assert f"MISSING attempt: workflow {wf} run {rid} activity 1 attempt 2" in result.output
    assert "Traceback" not in result.output


async def test_refused_outcome_records_are_dead_lettered_and_never_counted(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf, rid = unique("wf-refused"), "r1"
    key = _key(wf, rid)
    d1, w1 = _decision(wf, rid, "1", 1)
    good = _outcome(wf, rid, "1", 1, StepStatus.COMPLETED, decision=d1)
    other_run = _outcome(wf, "r2", "1", 1, StepStatus.COMPLETED, decision=d1)
    tampered = dataclasses.replace(
        _outcome(wf, rid, "1", 1, StepStatus.FAILED, decision=d1, error_type="X"),
        error_type="Y",
    )
    rogue = _outcome(wf, rid, "1", 1, StepStatus.CANCELLED, decision=d1, signer=ROGUE_SK)
    # Signed and decodable, but its id is not a UUID: the step_outcomes table refuses the row.
    refused = _outcome(wf, rid, "1", 1, StepStatus.TIMED_OUT, decision=d1, outcome_id="not-a-uuid")
    messages: list[_Msg] = [
        (key, w1, None),  # 0
        (key, _value(other_run), None),  # 1: r2's record under r1's key
        (key, _value(tampered), None),  # 2
        (key, _value(rogue), None),  # 3
        (key, _value(refused), None),  # 4
        (key, _value(good), None),  # 5
    ]
    await produce(kafka_bootstrap, topics.steps, messages)
    expected = [("1", 1, "completed")]
    await produce(kafka_bootstrap, topics.runs, [(key, _completion(wf, rid, expected), None)])
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> list[tuple[Any, ...]]:
            return await running.rows(
                "SELECT complete, outcome_ids, extra['outcomes'] "
                f"FROM workflow_receipts WHERE workflow_id = '{wf}'"
            )

        [env] = await eventually(written, timeout=60)
        stored = await running.rows(
            f"SELECT toString(outcome_id) FROM step_outcomes WHERE workflow_id = '{wf}'"
        )
        report = await running.service.sink.call(lambda c: verify_run(c, wf, keys=KEYS))
    dead = await read_all(kafka_bootstrap, topics.dlq, 4)
    assert env == (True, [good.outcome_id], "1")
    assert stored == [(good.outcome_id,)]
    assert report.ok, report.summary()
    by_offset = {}
    for message in dead:
        headers = parse_dead_letter_headers(message.headers)
        by_offset[int(headers["offset"])] = (headers["reason"], headers["detail"], message)
    assert sorted(by_offset) == [1, 2, 3, 4]
    assert by_offset[1][0] == "key_mismatch"
    assert by_offset[2][0] == "bad_chio_receipt"
    assert "not bound to this outcome record" in by_offset[2][1]
    assert by_offset[3][0] == "untrusted_kernel_key"
    reason, _, message = by_offset[4]
    assert reason == "clickhouse_data"
    assert message.value == _value(refused)
    assert message.key == key
    # A stable id: the consumed message's position, the same if a replay refuses it again.
    assert dict(message.headers)["ce_id"] == f"{topics.steps}/0/4".encode()


async def test_late_records_after_a_restart_give_one_new_revision_and_replays_none(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf, rid = unique("wf-late"), "r1"
    key = _key(wf, rid)
    d1, w1 = _decision(wf, rid, "1", 1)
    await produce(kafka_bootstrap, topics.steps, [(key, w1, None)])
    expected = [("1", 1, "failed:IOError"), ("1", 2, "timed_out:start_to_close")]
    await produce(kafka_bootstrap, topics.runs, [(key, _completion(wf, rid, expected), None)])
    sql = (
        "SELECT revision, complete, outcome_ids, "
        "arrayMap(a -> (a.account, a.outcome), attempts) "
        f"FROM workflow_receipts WHERE workflow_id = '{wf}' ORDER BY revision"
    )
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def first() -> list[tuple[Any, ...]]:
            return await running.rows(sql)

        assert await eventually(first, timeout=60) == [
            (1, True, [], [("RECEIPTED", "UNKNOWN"), ("WORKER_LOST", "UNKNOWN")])
        ]
    # While the builder is down: attempt 1's outcome, and attempt 2's receipt and outcome (its
    # worker's spool replayed after a restart).
    d2, w2 = _decision(wf, rid, "1", 2)
    failed = _outcome(wf, rid, "1", 1, StepStatus.FAILED, decision=d1, error_type="IOError")
    done = _outcome(wf, rid, "1", 2, StepStatus.COMPLETED, decision=d2)
    late: list[_Msg] = [(key, _value(failed), None), (key, w2, None), (key, _value(done), None)]
    await produce(kafka_bootstrap, topics.steps, late)
    revised = [
        (1, True, [], [("RECEIPTED", "UNKNOWN"), ("WORKER_LOST", "UNKNOWN")]),
        (
            2,
            True,
            [failed.outcome_id, done.outcome_id],
            [("RECEIPTED", "FAILED"), ("RECEIPTED", "COMPLETED")],
        ),
    ]
    # A new process re-hydrates the run from ClickHouse (its steps, records and accounts).
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def second() -> list[tuple[Any, ...]] | None:
            rows = await running.rows(sql)
            return rows if len(rows) == 2 else None

        assert await eventually(second, timeout=60) == revised
        # The same records again (producer retries): nothing new, no revision 3.
        await produce(kafka_bootstrap, topics.steps, [(key, w1, None), *late])

        async def drained() -> bool:
            await running.rows("SELECT 1")
            return await running.service.lag() == 0

        await eventually(drained, timeout=30)
        assert await running.rows(sql) == revised
        assert await running.rows(
            f"SELECT count() FROM step_outcomes WHERE workflow_id = '{wf}'"
        ) == [(2,)]
        report = await running.service.sink.call(lambda c: verify_run(c, wf, keys=KEYS))
    assert report.ok, report.summary()
    assert report.notes == []


async def test_verify_names_tampered_and_unbound_outcome_rows(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf = unique("wf-tamper")
    messages: list[_Msg] = []
    records: dict[str, StepOutcome] = {}
    for rid in ("status", "deleted", "accounts", "unbound"):
        key = _key(wf, rid)
        decision, wire = _decision(wf, rid, "1", 1)
        if rid == "unbound":
            # Signed and well formed, but the decision it names is another run's.
            decision = _decision(wf, "elsewhere", "1", 1)[0]
        records[rid] = _outcome(
            wf, rid, "1", 1, StepStatus.FAILED, decision=decision, error_type="IOError"
        )
        messages += [(key, wire, None), (key, _value(records[rid]), None)]
    await produce(kafka_bootstrap, topics.steps, messages)
    done = [
        (_key(wf, rid), _completion(wf, rid, [("1", 1, "failed:IOError")]), None)
        for rid in ("status", "deleted", "accounts", "unbound")
    ]
    await produce(kafka_bootstrap, topics.runs, done)
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def written() -> bool:
            rows = await running.rows(
                f"SELECT count() FROM workflow_receipts WHERE workflow_id = '{wf}'"
            )
            return rows == [(4,)]

        await eventually(written, timeout=60)
    client = open_client(clickhouse_dsn)
    try:
        sync = {"mutations_sync": 2}
        client.command(
            "ALTER TABLE step_outcomes UPDATE status = 'COMPLETED' WHERE run_id = 'status'",
            settings=sync,
        )
        client.command("ALTER TABLE step_outcomes DELETE WHERE run_id = 'deleted'", settings=sync)
        client.command(
            "ALTER TABLE workflow_receipts UPDATE attempts = "
            "arrayMap(a -> tuple(a.1, a.2, a.3, a.4, 'WORKER_LOST', 'timed_out:x', a.7), attempts)"
            " WHERE run_id = 'accounts'",
            settings=sync,
        )
        report = verify_run(client, wf, keys=KEYS)
    finally:
        client.close()
    problems = "\n".join(report.problems)
    by_run = {
        rid: [p for p in report.problems if p.startswith(f"run {rid}:")]
        for rid in ("status", "deleted", "accounts", "unbound")
    }
    status, deleted = records["status"].outcome_id, records["deleted"].outcome_id
    assert any(
        f"outcome record {status}" in p and "field status changed" in p for p in by_run["status"]
    ), problems
    # The envelope embeds the signed record (from ``wire``), so only the column is named.
    assert len(by_run["status"]) == 1, problems
    assert (
        f"run deleted: envelope revision 1: outcome record {deleted} has no row (deleted)"
        in by_run["deleted"]
    ), problems
    assert any(
        "is accounted WORKER_LOST (timed_out:x, outcome FAILED) but its rows give RECEIPTED" in p
        for p in by_run["accounts"]
    ), problems
    assert any("builder signature invalid" in p for p in by_run["accounts"]), problems
    assert by_run["unbound"] == [
        f"run unbound: outcome record {records['unbound'].outcome_id} (activity 1 attempt 1, "
        f"FAILED): its decision receipt {records['unbound'].decision_receipt_id} is not among "
        "the run's step rows"
    ]


async def test_migration_0005_and_the_ttl_cover_step_outcomes(clickhouse_dsn: str) -> None:
    async with ClickHouseSink(ClickHouseConfig(dsn=clickhouse_dsn, ttl_days=30)) as sink:
        _, versions = await sink.query("SELECT version FROM schema_migrations ORDER BY version")
        _, ddl = await sink.query("SHOW CREATE TABLE step_outcomes")
        _, columns = await sink.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
            "AND table = 'workflow_receipts' AND name IN ('outcome_ids', 'attempts') ORDER BY name"
        )
    assert 5 in {v for (v,) in versions}
    assert "ReplacingMergeTree" in ddl[0][0]
    assert "toIntervalDay(30)" in ddl[0][0]
    assert [name for name, _ in columns] == ["attempts", "outcome_ids"]
    assert columns[1][1] == "Array(String)"
    assert "account LowCardinality(String)" in columns[0][1]
