"""The demo's outcomes section: read from a real chDB (with and without the outcome table), and
rendered in the text summary and the HTML report."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from chio_receipts.consumers import open_client
from chio_receipts.consumers._clickhouse import migrations, split_statements
from chio_receipts.demo._report import (
    RunAccountRow,
    Summary,
    ToolOutcomeRow,
    outcome_table_rows,
    outcomes_note,
    read_summary,
    write_html_report,
)
from chio_receipts.demo._run import DemoResult, _print_summary
from tests.consumers.test_outcome_views import migrate_with_outcomes

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(days=1)
T2 = T0 + timedelta(days=2)
# The per-attempt accounts of an envelope row, as the outcome records' migration keeps them.
ATTEMPTS_COLUMN = (
    "ALTER TABLE workflow_receipts ADD COLUMN IF NOT EXISTS attempts Array(Tuple("
    "activity_id String, activity_type String, attempt Int32, is_local Bool, "
    "account LowCardinality(String), reason String, outcome LowCardinality(String)))"
)


def _summary() -> Summary:
    return Summary(
        outcomes_available=True,
        tool_outcomes=[
            ToolOutcomeRow("agent-tools", "flaky_tool", 3, 1, 2, 0, 0, 0, 1_500.0, 2_450.0),
            ToolOutcomeRow("payments", "debit_account", 1, 1, 0, 0, 0, 1, 800.0, 800.0),
            ToolOutcomeRow("payments", "refund_account", 0, 0, 0, 0, 0, 2, None, None),
        ],
        run_accounts=[
            RunAccountRow("flaky-1", "run-000001", "FlakyToolWorkflow", 3, 3, 0, 0, 0),
            RunAccountRow("transfer-1", "run-000002", "TransferWorkflow", 4, 2, 1, 0, 1),
        ],
    )


@pytest.mark.unit
def test_the_html_report_has_outcomes_and_durations_per_tool(tmp_path: Path) -> None:
    path = write_html_report(_summary(), tmp_path / "report.html")
    text = path.read_text()
    assert "<h2 id='outcomes'>Outcomes and durations per tool</h2>" in text
    assert "<h2 id='attempts'>Attempts accounted per run</h2>" in text
    assert "7 outcome records: 4 calls ran, 2 failed or timed out, 3 refused at the gate." in text
    row = "<tr><td>agent-tools</td><td>flaky_tool</td><td>3</td><td>1</td><td>2</td>"
    assert row + "<td>0</td><td>0</td><td>0</td><td>1500</td><td>2450</td></tr>" in text
    # A tool only ever refused at the gate ran no call: no duration.
    assert "<td>refund_account</td><td>0</td><td>0</td><td>0</td><td>0</td><td>0</td>" in text
    assert "<td>2</td><td>-</td><td>-</td></tr>" in text
    assert "<td>TransferWorkflow</td><td>4</td><td>2</td><td>1</td><td>0</td><td>1</td>" in text
    assert "Call duration per tool (p50, p95)" in text  # the chart of the tools that ran
    assert text.count("<svg") == 1  # the durations (no decisions: no other chart)


@pytest.mark.unit
def test_the_report_says_when_there_are_no_outcomes(tmp_path: Path) -> None:
    for summary, note in [
        (Summary(), "No outcome records: this database has no step_outcomes table."),
        (Summary(outcomes_available=True), "No outcome records for these runs yet."),
    ]:
        text = write_html_report(summary, tmp_path / "r.html").read_text()
        assert f"<p>{note}</p>" in text
        assert "Call duration per tool" not in text
        assert outcomes_note(summary) == note
        assert outcome_table_rows(summary) == []


@pytest.mark.unit
def test_the_text_summary_prints_both_tables() -> None:
    out = io.StringIO()
    _print_summary(Console(file=out, width=160), DemoResult(task_queue="q", summary=_summary()))
    text = out.getvalue()
    assert "Outcomes and durations per tool" in text
    assert "Attempts accounted per run" in text
    flaky = next(line for line in text.splitlines() if "flaky_tool" in line)
    assert [c.strip() for c in flaky.split("│") if c.strip()] == [
        "agent-tools",
        "flaky_tool",
        "3",
        "1",
        "2",
        "0",
        "0",
        "0",
        "1500",
        "2450",
    ]


# -- read from a real chDB ---------------------------------------------------------------


@pytest.fixture
def client(clickhouse_dsn: str) -> Iterator[Any]:
    c = open_client(clickhouse_dsn, create=True)
    try:
        yield c
    finally:
        c.close()


def _query(client: Any) -> Any:
    async def query(
        sql: str, params: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        result = client.query(sql, parameters=params)
        return list(result.column_names), [tuple(r) for r in result.result_rows]

    return query


def _runs(client: Any, accounts: Mapping[str, list[tuple[str, int, str]]] | None) -> None:
    names = ["namespace", "workflow_id", "run_id", "workflow_type", "started_at", "outcome"]
    names += ["revision", "complete", "missing_steps", "step_count"]
    rows: list[list[Any]] = [
        ["default", "flaky-1", "run-1", "FlakyToolWorkflow", T0, "success", 1, True, 0, 3],
        ["default", "transfer-1", "run-2", "TransferWorkflow", T1, "failure", 1, False, 1, 2],
        # Written before the envelope kept its accounts: two steps, no accounts.
        ["default", "old-1", "run-3", "OldWorkflow", T2, "success", 1, True, 0, 2],
    ]
    if accounts is not None:
        names.append("attempts")
        for row in rows:
            row.append(
                [
                    (activity, "t", attempt, False, state, "", "UNKNOWN")
                    for activity, attempt, state in accounts.get(row[2], [])
                ]
            )
    client.insert("workflow_receipts", rows, column_names=names)


def _outcome(run: str, tool: str, status: str, duration_us: int) -> list[Any]:
    return [uuid.uuid4(), "default", run, "agent-tools", tool, status, duration_us, T0, T0]


OUTCOME_NAMES = ["outcome_id", "namespace", "run_id", "tool_server", "tool", "status"]
OUTCOME_NAMES += ["duration_us", "started_at", "ended_at"]


@pytest.mark.integration
async def test_a_database_without_outcomes_reads_as_none(client: Any) -> None:
    for migration in migrations():
        if migration.version < 5:
            for statement in split_statements(migration.sql):
                client.command(statement)
    _runs(client, None)
    s = await read_summary(_query(client), ["run-1", "run-2", "run-3"])
    assert s.outcomes_available is False
    assert s.tool_outcomes == []
    assert s.run_accounts == [
        RunAccountRow("flaky-1", "run-1", "FlakyToolWorkflow", None, None, 0, None, 0),
        RunAccountRow("transfer-1", "run-2", "TransferWorkflow", None, None, 0, None, 1),
        RunAccountRow("old-1", "run-3", "OldWorkflow", None, None, 0, None, 0),
    ]


@pytest.mark.integration
async def test_outcomes_per_tool_and_accounts_per_run(client: Any) -> None:
    migrate_with_outcomes(client)
    client.command(ATTEMPTS_COLUMN)
    _runs(
        client,
        {
            "run-1": [("1", 1, "RECEIPTED"), ("1", 2, "RECEIPTED"), ("1", 3, "RECEIPTED")],
            "run-2": [
                ("1", 1, "RECEIPTED"),
                ("2", 1, "GATE_FAILED"),
                ("3", 1, "WORKER_LOST"),
                ("4", 1, "MISSING"),
            ],
        },
    )
    client.insert(
        "step_outcomes",
        [
            _outcome("run-1", "flaky_tool", "FAILED", 1000),
            _outcome("run-1", "flaky_tool", "FAILED", 2000),
            _outcome("run-1", "flaky_tool", "COMPLETED", 3000),
            _outcome("run-2", "debit", "COMPLETED", 500),
            _outcome("run-2", "refund", "GATE_FAILED", 0),
            _outcome("run-3", "refund", "GATE_FAILED", 0),
        ],
        column_names=OUTCOME_NAMES,
    )
    s = await read_summary(_query(client), ["run-1", "run-2", "run-3"])
    assert s.outcomes_available is True
    assert s.tool_outcomes == [
        ToolOutcomeRow("agent-tools", "debit", 1, 1, 0, 0, 0, 0, 500.0, 500.0),
        ToolOutcomeRow(
            "agent-tools", "flaky_tool", 3, 1, 2, 0, 0, 0, 2000.0, pytest.approx(2900.0)
        ),
        ToolOutcomeRow("agent-tools", "refund", 0, 0, 0, 0, 0, 2, None, None),
    ]
    assert s.outcome_count == 6
    assert s.run_accounts == [
        RunAccountRow("flaky-1", "run-1", "FlakyToolWorkflow", 3, 3, 0, 0, 0),
        RunAccountRow("transfer-1", "run-2", "TransferWorkflow", 4, 1, 1, 1, 1),
        # No accounts kept: the gate failure its outcome record says, the rest unknown.
        RunAccountRow("old-1", "run-3", "OldWorkflow", None, None, 1, None, 0),
    ]
