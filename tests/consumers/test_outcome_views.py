"""The outcome analytics views (0006) on a real chDB: known rows in, known numbers out."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chio_receipts.consumers import open_client
from chio_receipts.consumers._clickhouse import migrations, split_statements

pytestmark = pytest.mark.integration

# The step_outcomes table as the outcome records' migration (0005) defines it: the StepOutcome
# fields in Avro order, then the Kafka position. Applied only where 0005 is not (yet) among the
# migrations; once it is, the real 0005 creates the table and this is never run.
STEP_OUTCOMES_DDL = """
CREATE TABLE IF NOT EXISTS step_outcomes
(
    outcome_id          UUID,
    namespace           LowCardinality(String),
    workflow_id         String,
    run_id              String,
    workflow_type       LowCardinality(String),
    task_queue          LowCardinality(String),
    activity_id         String,
    activity_type       LowCardinality(String),
    attempt             Int32,
    is_local            Bool,
    tool_server         LowCardinality(String),
    tool                LowCardinality(String),
    capability_id       String,
    decision_receipt_id String,
    decision_chio_id    String,
    status              String,
    error_type          String,
    started_at          DateTime64(6, 'UTC'),
    ended_at            DateTime64(6, 'UTC'),
    duration_us         Int64,
    result_digest       String,
    result_key_id       String,
    worker_identity     String,
    trace_id            String,
    span_id             String,
    chio_receipt        String,
    chio_signed         String,
    wire                String,
    kafka_partition     Int32,
    kafka_offset        Int64
)
ENGINE = ReplacingMergeTree
ORDER BY (namespace, workflow_id, run_id, outcome_id)
"""


def migrate_with_outcomes(client: Any) -> None:
    """Apply every migration in order; before the views of 0006, make sure ``step_outcomes``
    exists (the fixture table above when no migration 0005 creates it)."""
    have_0005 = any(m.version == 5 for m in migrations())
    for migration in migrations():
        if migration.version == 6 and not have_0005:
            client.command(STEP_OUTCOMES_DDL)
        for statement in split_statements(migration.sql):
            client.command(statement)


@pytest.fixture
def client(clickhouse_dsn: str) -> Iterator[Any]:
    c = open_client(clickhouse_dsn, create=True)
    try:
        migrate_with_outcomes(c)
        yield c
    finally:
        c.close()


T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _outcome(
    tool: str,
    status: str,
    duration_us: int,
    *,
    run: str = "r1",
    attempt: int = 1,
    error_type: str = "",
    outcome_id: str | None = None,
    tool_server: str = "srv",
) -> dict[str, Any]:
    return {
        "outcome_id": uuid.UUID(outcome_id) if outcome_id else uuid.uuid4(),
        "namespace": "default",
        "workflow_id": "wf",
        "run_id": run,
        "activity_id": f"{tool}-{uuid.uuid4().hex[:6]}",
        "activity_type": tool,
        "attempt": attempt,
        "tool_server": tool_server,
        "tool": tool,
        "status": status,
        "error_type": error_type,
        "started_at": T0,
        "ended_at": T0 + timedelta(microseconds=duration_us),
        "duration_us": duration_us,
    }


def _insert_outcomes(client: Any, rows: list[dict[str, Any]]) -> None:
    names = list(rows[0])
    client.insert("step_outcomes", [[r[n] for n in names] for r in rows], column_names=names)


def _insert_decisions(client: Any, rows: list[tuple[str, str, str]]) -> None:
    """(tool_server, tool, verdict) decisions, one receipt each."""
    names = ["receipt_id", "namespace", "workflow_id", "run_id", "tool_server", "tool", "verdict"]
    values = [[uuid.uuid4(), "default", "wf", "r1", s, t, v] for s, t, v in rows]
    client.insert("step_receipts", values, column_names=names, settings={"insert_deduplicate": 0})
    client.insert("step_receipts", [values[0]], column_names=names)  # a replayed row


def _by_tool(client: Any, sql: str) -> dict[tuple[str, str], dict[str, Any]]:
    result = client.query(sql)
    names = result.column_names
    return {(r[0], r[1]): dict(zip(names[2:], r[2:], strict=True)) for r in result.result_rows}


def test_failure_rate_per_tool(client: Any) -> None:
    same = str(uuid.uuid4())
    rows = [
        *(_outcome("search", "COMPLETED", 1000) for _ in range(6)),
        _outcome("search", "FAILED", 1000, error_type="ValueError"),
        _outcome("search", "TIMED_OUT", 30_000_000, error_type="start_to_close"),
        _outcome("search", "CANCELLED", 10),
        _outcome("search", "GATE_FAILED", 0, error_type="sidecar_unreachable"),
        _outcome("pay", "COMPLETED", 5000, outcome_id=same),
        _outcome("pay", "FAILED", 7000, error_type="PaymentDeclined"),
    ]
    _insert_outcomes(client, rows)
    # The same outcome record delivered twice counts once.
    _insert_outcomes(client, [_outcome("pay", "COMPLETED", 5000, outcome_id=same)])
    got = _by_tool(client, "SELECT * FROM tool_failure_rate ORDER BY tool")
    assert got == {
        ("srv", "pay"): {
            "attempts": 2,
            "completed": 1,
            "failed": 1,
            "cancelled": 0,
            "timed_out": 0,
            "failure_rate": 0.5,
        },
        ("srv", "search"): {
            "attempts": 9,  # the gate failure never ran the tool
            "completed": 6,
            "failed": 1,
            "cancelled": 1,
            "timed_out": 1,
            "failure_rate": round(2 / 9, 4),
        },
    }


def test_duration_quantiles_per_tool_over_completed_and_failed_calls(client: Any) -> None:
    rows = [_outcome("fetch", "COMPLETED", (i + 1) * 1000) for i in range(99)]
    rows.append(_outcome("fetch", "FAILED", 100_000, error_type="IOError"))
    # Not counted: a timeout, a cancellation and a gate failure of the same tool.
    rows += [
        _outcome("fetch", "TIMED_OUT", 10_000_000, error_type="heartbeat"),
        _outcome("fetch", "CANCELLED", 9_000_000),
        _outcome("fetch", "GATE_FAILED", 0, error_type="sink_refused"),
        _outcome("once", "COMPLETED", 4242),
    ]
    _insert_outcomes(client, rows)
    got = _by_tool(client, "SELECT * FROM tool_duration ORDER BY tool")
    fetch = got[("srv", "fetch")]
    assert (fetch["calls"], fetch["completed"], fetch["failed"]) == (100, 99, 1)
    # 1..100 ms: quantiles interpolate between neighbours (exact below 8192 values).
    assert fetch["p50_us"] == pytest.approx(50_500)
    assert fetch["p95_us"] == pytest.approx(95_050)
    assert fetch["max_us"] == 100_000
    once = got[("srv", "once")]
    assert (once["calls"], once["p50_us"], once["p95_us"]) == (1, 4242, 4242)


def test_denials_next_to_failures_per_tool(client: Any) -> None:
    _insert_decisions(
        client,
        [
            ("payments", "debit", "ALLOW"),
            ("payments", "debit", "ALLOW"),
            ("payments", "debit", "ALLOW"),
            ("payments", "credit", "DENY"),
            ("payments", "credit", "ALLOW"),
            ("mail", "send", "DENY"),
        ],
    )
    _insert_outcomes(
        client,
        [
            _outcome("debit", "COMPLETED", 10, tool_server="payments"),
            _outcome("debit", "FAILED", 10, tool_server="payments", error_type="Insufficient"),
            _outcome("debit", "TIMED_OUT", 10, tool_server="payments", error_type="heartbeat"),
            _outcome("credit", "COMPLETED", 10, tool_server="payments"),
            _outcome("refund", "GATE_FAILED", 0, tool_server="payments", error_type="x"),
            _outcome("refund", "GATE_FAILED", 0, tool_server="payments", error_type="y"),
        ],
    )
    got = _by_tool(client, "SELECT * FROM tool_denials_vs_failures ORDER BY tool_server, tool")
    row = {"allowed": 0, "denied": 0, "failed": 0, "timed_out": 0, "gate_failed": 0}
    assert got == {
        ("mail", "send"): {**row, "denied": 1, "deny_rate": 1.0},
        ("payments", "credit"): {**row, "allowed": 1, "denied": 1, "deny_rate": 0.5},
        ("payments", "debit"): {
            **row,
            "allowed": 3,  # the replayed decision row counts once
            "deny_rate": 0.0,
            "failed": 1,
            "timed_out": 1,
        },
        # Refused at the gate twice: no decision exists for either attempt.
        ("payments", "refund"): {**row, "gate_failed": 2, "deny_rate": 0.0},
    }


def test_the_views_are_empty_without_outcomes_and_the_file_applies_twice(client: Any) -> None:
    for view in ("tool_failure_rate", "tool_duration", "tool_denials_vs_failures"):
        assert client.query(f"SELECT count() FROM {view}").result_rows == [(0,)]
    (views,) = [m for m in migrations() if m.version == 6]
    for statement in split_statements(views.sql):
        client.command(statement)
    assert client.query("SELECT count() FROM tool_duration").result_rows == [(0,)]


def test_the_example_queries_over_the_outcome_views_run(client: Any) -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "consumers" / "sql" / "queries.sql").read_text()
    outcome_queries = [
        s
        for s in split_statements(text)
        if any(v in s for v in ("tool_failure_rate", "tool_duration", "tool_denials_vs"))
    ]
    assert len(outcome_queries) >= 3
    _insert_outcomes(client, [_outcome("search", "FAILED", 1000, error_type="ValueError")])
    for statement in outcome_queries:
        assert isinstance(client.query(statement.rstrip(";")).result_rows, list)
