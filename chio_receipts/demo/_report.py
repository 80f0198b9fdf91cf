"""The demo's summary (read from ClickHouse) and its one-file HTML report (matplotlib SVG).

:func:`read_summary` reads through any :data:`QueryFn`: the running builder's sink in the demo,
or :func:`read_summary_from` a DSN, which reads an embedded database through the read endpoint of
the process owning it while that process runs (``open_reader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import io
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from chio_receipts.consumers import open_reader
from chio_receipts.schemas import Secret

__all__ = [
    "APPROVAL_HEAD",
    "ApprovalRow",
    "QueryFn",
    "RunAccountRow",
    "RunRow",
    "StepRow",
    "Summary",
    "ToolOutcomeRow",
    "approval_table_rows",
    "client_query",
    "read_summary",
    "read_summary_from",
    "write_html_report",
]

QueryFn = Callable[[str, Mapping[str, Any]], Awaitable[tuple[list[str], list[tuple[Any, ...]]]]]


def client_query(client: Any) -> QueryFn:
    """A :data:`QueryFn` over a clickhouse-connect client (each query on a worker thread)."""

    async def query(sql: str, params: Mapping[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
        def run() -> tuple[list[str], list[tuple[Any, ...]]]:
            result = client.query(sql, parameters=params)
            return list(result.column_names), [tuple(r) for r in result.result_rows]

        return await asyncio.to_thread(run)

    return query


async def read_summary_from(
    dsn: str, run_ids: Sequence[str], *, token: Secret | None = None
) -> Summary:
    """:func:`read_summary` of the database at ``dsn``: directly, or through the read endpoint
    of the process owning the embedded database while it runs."""
    client = await asyncio.to_thread(open_reader, dsn, token=token)
    try:
        return await read_summary(client_query(client), run_ids)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(client.close)


@dataclass(frozen=True, slots=True)
class RunRow:
    """One run's current envelope."""

    workflow_id: str
    run_id: str
    workflow_type: str
    outcome: str
    parent_workflow_ids: tuple[str, ...]
    step_count: int
    allow_count: int
    deny_count: int
    complete: bool
    revision: int
    started_at: datetime
    completed_at: datetime | None
    continued_from_run_id: str
    continued_as_new_run_id: str


@dataclass(frozen=True, slots=True)
class StepRow:
    """One step receipt, as the timeline draws it."""

    workflow_id: str
    run_id: str
    activity_type: str
    tool_server: str
    verdict: str
    attempt: int
    worker_identity: str
    evaluated_at: datetime


@dataclass(frozen=True, slots=True)
class ToolOutcomeRow:
    """How one tool's calls ended and how long they ran (the outcome views of 0006)."""

    tool_server: str
    tool: str
    calls: int
    """Outcome records whose body ran (every status but GATE_FAILED)."""
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    gate_failed: int
    """Attempts the gate refused before any decision (the tool never ran)."""
    p50_us: float | None
    """Median run time over COMPLETED and FAILED calls (None when there were none)."""
    p95_us: float | None


@dataclass(frozen=True, slots=True)
class RunAccountRow:
    """How a run's attempts are accounted for in its current envelope. ``None``: the envelope
    rows of this database do not keep the accounts (only what the outcome records say)."""

    workflow_id: str
    run_id: str
    workflow_type: str
    attempts: int | None
    receipted: int | None
    gate_failed: int
    worker_lost: int | None
    missing: int


@dataclass(frozen=True, slots=True)
class ApprovalRow:
    """One approval a run's steps carry: who answered, and what (read from the signed
    decision the step that ran after the answer carries)."""

    workflow_id: str
    activity_type: str
    approval_id: str
    outcome: str
    approver: str
    reason: str


APPROVAL_HEAD = ("workflow", "activity", "approval", "decision", "approver", "reason")


def approval_table_rows(s: Summary) -> list[tuple[str, ...]]:
    """The approvals table: one row per answered approval."""
    return [
        (a.workflow_id, a.activity_type, a.approval_id, a.outcome, a.approver, a.reason)
        for a in s.approvals
    ]


@dataclass(slots=True)
class Summary:
    """Everything the demo prints and draws, read from ClickHouse only."""

    step_rows: int = 0
    distinct_receipts: int = 0
    runs_by_outcome: list[tuple[str, int]] = field(default_factory=list)
    by_tool: list[tuple[str, str, int, int]] = field(default_factory=list)
    most_denied: list[tuple[str, int]] = field(default_factory=list)
    latency: list[tuple[str, int, float, float]] = field(default_factory=list)
    incomplete: int = 0
    runs: list[RunRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    deny_rate_over_time: list[tuple[datetime, int, int]] = field(default_factory=list)
    outcomes_available: bool = False
    """The database has the outcome records' table and views."""
    tool_outcomes: list[ToolOutcomeRow] = field(default_factory=list)
    run_accounts: list[RunAccountRow] = field(default_factory=list)
    approvals: list[ApprovalRow] = field(default_factory=list)
    pending_approval: int = 0
    """Steps held for a person's approval (PENDING_APPROVAL)."""
    denies: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    """Denied steps by tool server, tool, guard and reason (a budget's deny names ``budget``)."""

    @property
    def outcome_count(self) -> int:
        """Outcome records (gate failures included)."""
        return sum(t.calls + t.gate_failed for t in self.tool_outcomes)

    @property
    def denied(self) -> int:
        """Denied steps in all runs."""
        return sum(d for _s, _t, _a, d in self.by_tool)

    def runs_of(self, workflow_type: str) -> list[RunRow]:
        """Runs of one workflow type."""
        return [r for r in self.runs if r.workflow_type == workflow_type]


async def read_summary(query: QueryFn, run_ids: Sequence[str]) -> Summary:
    """Read the demo's numbers for ``run_ids`` from ClickHouse."""
    params = {"ids": list(run_ids)}
    s = Summary()
    _, rows = await query(
        "SELECT count(), uniqExact(receipt_id) FROM step_receipts "
        "WHERE has({ids:Array(String)}, run_id)",
        params,
    )
    s.step_rows, s.distinct_receipts = int(rows[0][0]), int(rows[0][1])
    _, rows = await query(
        "SELECT outcome, count() FROM workflow_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) "
        "GROUP BY outcome ORDER BY outcome",
        params,
    )
    s.runs_by_outcome = [(str(o), int(n)) for o, n in rows]
    _, rows = await query(
        "SELECT tool_server, tool, countIf(verdict = 'ALLOW'), countIf(verdict = 'DENY') "
        "FROM step_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) GROUP BY tool_server, tool "
        "ORDER BY tool_server, tool",
        params,
    )
    s.by_tool = [(str(a), str(b), int(c), int(d)) for a, b, c, d in rows]
    _, rows = await query(
        "SELECT tool_server, tool, guard, reason, count() FROM step_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) AND verdict = 'DENY' "
        "GROUP BY tool_server, tool, guard, reason ORDER BY tool_server, tool, guard, reason",
        params,
    )
    s.denies = [(str(a), str(b), str(g), str(r), int(n)) for a, b, g, r, n in rows]
    s.most_denied = sorted(
        ((f"{ts}/{t}", d) for ts, t, _a, d in s.by_tool if d), key=lambda x: (-x[1], x[0])
    )[:5]
    _, rows = await query(
        "SELECT activity_type, count(), quantile(0.5)(latency_us), quantile(0.95)(latency_us) "
        "FROM step_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) GROUP BY activity_type ORDER BY activity_type",
        params,
    )
    s.latency = [(str(a), int(n), float(p50), float(p95)) for a, n, p50, p95 in rows]
    _, rows = await query(
        "SELECT count() FROM workflow_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) AND NOT complete",
        params,
    )
    s.incomplete = int(rows[0][0])
    _, rows = await query(
        "SELECT workflow_id, run_id, workflow_type, outcome, parent_workflow_ids, step_count, "
        "allow_count, deny_count, complete, revision, started_at, completed_at, "
        "extra['continued_from_run_id'], extra['continued_as_new_run_id'] "
        "FROM workflow_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) ORDER BY started_at",
        params,
    )
    s.runs = [
        RunRow(
            str(r[0]),
            str(r[1]),
            str(r[2]),
            str(r[3]),
            tuple(str(p) for p in r[4]),
            int(r[5]),
            int(r[6]),
            int(r[7]),
            bool(r[8]),
            int(r[9]),
            r[10],
            r[11],
            str(r[12]),
            str(r[13]),
        )
        for r in rows
    ]
    _, rows = await query(
        "SELECT workflow_id, run_id, activity_type, tool_server, toString(verdict), attempt, "
        "worker_identity, evaluated_at FROM step_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) "
        "ORDER BY evaluated_at",
        params,
    )
    s.steps = [
        StepRow(str(a), str(b), str(c), str(d), str(e), int(f), str(g), h)
        for a, b, c, d, e, f, g, h in rows
    ]
    _, rows = await query(
        "SELECT toStartOfSecond(evaluated_at) AS t, count(), countIf(verdict = 'DENY') "
        "FROM step_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id) GROUP BY t ORDER BY t",
        params,
    )
    s.deny_rate_over_time = [(t, int(n), int(d)) for t, n, d in rows]
    await _read_approvals(query, params, s)
    await _read_outcomes(query, params, s)
    return s


async def _read_approvals(query: QueryFn, params: Mapping[str, Any], s: Summary) -> None:
    """Held steps, and every answered approval with its approver, from the signed decision
    (``metadata.approval.decision_receipt``) of the step that used it."""
    _, rows = await query(
        "SELECT countIf(toString(verdict) = 'PENDING_APPROVAL') FROM step_receipts FINAL "
        "WHERE has({ids:Array(String)}, run_id)",
        params,
    )
    s.pending_approval = int(rows[0][0])
    _, rows = await query(
        "SELECT workflow_id, activity_type, "
        "JSONExtractString(chio_receipt, 'metadata', 'approval', 'approval_id') AS id, "
        "JSONExtractRaw(chio_receipt, 'metadata', 'approval', 'decision_receipt') AS d, "
        "JSONExtractString(d, 'metadata', 'approval', 'state'), "
        "JSONExtractString(d, 'metadata', 'approval', 'approver'), "
        "JSONExtractString(d, 'metadata', 'approval', 'reason') "
        "FROM step_receipts FINAL WHERE has({ids:Array(String)}, run_id) AND d != '' "
        "ORDER BY evaluated_at",
        params,
    )
    rows = [(r[0], r[1], r[2], r[4], r[5], r[6]) for r in rows]
    s.approvals = [ApprovalRow(*(str(v) for v in r)) for r in rows]


_OUTCOME_VIEWS = ("tool_failure_rate", "tool_duration", "tool_denials_vs_failures")


async def _read_outcomes(query: QueryFn, params: Mapping[str, Any], s: Summary) -> None:
    """Outcomes per tool (the views of migration 0006) and each run's attempt accounts. A
    database without the outcome table reads as no outcomes; envelope rows without the
    ``attempts`` accounts leave what only they know as ``None``."""
    _, rows = await query(
        "SELECT (SELECT count() FROM system.tables WHERE database = currentDatabase() "
        "AND name IN {names:Array(String)}), "
        "(SELECT count() FROM system.columns WHERE database = currentDatabase() "
        "AND table = 'workflow_receipts' AND name = 'attempts' AND position(type, 'account') > 0)",
        {"names": ["step_outcomes", *_OUTCOME_VIEWS]},
    )
    s.outcomes_available = int(rows[0][0]) == 1 + len(_OUTCOME_VIEWS)
    has_accounts = int(rows[0][1]) == 1
    gate_failed_by_run: dict[str, int] = {}
    if s.outcomes_available:
        # The views cover the whole database: the demo's own, fresh for each demo run.
        _, rows = await query(
            "SELECT f.tool_server, f.tool, f.attempts, f.completed, f.failed, f.cancelled, "
            "f.timed_out, d.calls, d.p50_us, d.p95_us "
            "FROM tool_failure_rate AS f LEFT JOIN tool_duration AS d "
            "ON f.tool_server = d.tool_server AND f.tool = d.tool",
            {},
        )
        by_tool = {(str(r[0]), str(r[1])): r for r in rows}
        _, rows = await query(
            "SELECT tool_server, tool, gate_failed FROM tool_denials_vs_failures "
            "WHERE gate_failed > 0",
            {},
        )
        gates = {(str(a), str(b)): int(n) for a, b, n in rows}
        for key in sorted(set(by_tool) | set(gates)):
            r = by_tool.get(key)
            counts = [int(v) for v in r[2:7]] if r is not None else [0] * 5
            timed = r is not None and int(r[7] or 0) > 0  # COMPLETED or FAILED calls
            s.tool_outcomes.append(
                ToolOutcomeRow(
                    tool_server=key[0],
                    tool=key[1],
                    calls=counts[0],
                    completed=counts[1],
                    failed=counts[2],
                    cancelled=counts[3],
                    timed_out=counts[4],
                    gate_failed=gates.get(key, 0),
                    p50_us=float(r[8]) if r is not None and timed else None,
                    p95_us=float(r[9]) if r is not None and timed else None,
                )
            )
        _, rows = await query(
            "SELECT run_id, countIf(status = 'GATE_FAILED') FROM step_outcomes FINAL "
            "WHERE has({ids:Array(String)}, run_id) GROUP BY run_id",
            params,
        )
        gate_failed_by_run = {str(r): int(n) for r, n in rows}
    if has_accounts:
        # An envelope row written before the accounts were kept reads them as an empty array.
        _, rows = await query(
            "SELECT workflow_id, run_id, workflow_type, missing_steps, "
            "length(attempts) = 0 AND step_count > 0, length(attempts), "
            "arrayCount(a -> tupleElement(a, 'account') = 'RECEIPTED', attempts), "
            "arrayCount(a -> tupleElement(a, 'account') = 'GATE_FAILED', attempts), "
            "arrayCount(a -> tupleElement(a, 'account') = 'WORKER_LOST', attempts), "
            "arrayCount(a -> tupleElement(a, 'account') = 'MISSING', attempts) "
            "FROM workflow_receipts FINAL WHERE has({ids:Array(String)}, run_id) "
            "ORDER BY started_at",
            params,
        )
    else:
        _, rows = await query(
            "SELECT workflow_id, run_id, workflow_type, missing_steps, true, 0, 0, 0, 0, 0 "
            "FROM workflow_receipts FINAL WHERE has({ids:Array(String)}, run_id) "
            "ORDER BY started_at",
            params,
        )
    for w, r, t, missing_steps, unkept, n, ok, gate, lost, missing in rows:
        if unkept:  # only what the outcome records and the missing-step count say
            row = RunAccountRow(
                str(w),
                str(r),
                str(t),
                None,
                None,
                gate_failed_by_run.get(str(r), 0),
                None,
                int(missing_steps),
            )
        else:
            row = RunAccountRow(
                str(w), str(r), str(t), int(n), int(ok), int(gate), int(lost), int(missing)
            )
        s.run_accounts.append(row)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def outcome_table_rows(s: Summary) -> list[tuple[str, ...]]:
    """The rows of the outcomes-per-tool table (text summary and HTML report)."""
    return [
        (
            t.tool_server,
            t.tool,
            str(t.calls),
            str(t.completed),
            str(t.failed),
            str(t.timed_out),
            str(t.cancelled),
            str(t.gate_failed),
            _us(t.p50_us),
            _us(t.p95_us),
        )
        for t in s.tool_outcomes
    ]


OUTCOME_HEAD = (
    "tool server",
    "tool",
    "calls",
    "completed",
    "failed",
    "timed out",
    "cancelled",
    "gate failed",
    "p50 µs",
    "p95 µs",
)
ACCOUNT_HEAD = (
    "workflow",
    "run",
    "type",
    "attempts",
    "receipted",
    "gate failed",
    "worker lost",
    "missing",
)


def account_table_rows(s: Summary) -> list[tuple[str, ...]]:
    """The rows of the attempts-per-run table (text summary and HTML report)."""
    return [
        (
            a.workflow_id,
            "…" + a.run_id[-6:],
            a.workflow_type,
            _count(a.attempts),
            _count(a.receipted),
            str(a.gate_failed),
            _count(a.worker_lost),
            str(a.missing),
        )
        for a in s.run_accounts
    ]


def outcomes_note(s: Summary) -> str:
    """One line saying where the outcomes stand (shown above the tables)."""
    if not s.outcomes_available:
        return "No outcome records: this database has no step_outcomes table."
    if not s.tool_outcomes:
        return "No outcome records for these runs yet."
    calls = sum(t.calls for t in s.tool_outcomes)
    failed = sum(t.failed + t.timed_out for t in s.tool_outcomes)
    gate = sum(t.gate_failed for t in s.tool_outcomes)
    return (
        f"{s.outcome_count} outcome records: {calls} calls ran, {failed} failed or timed out, "
        f"{gate} refused at the gate."
    )


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _charts(s: Summary) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts: list[tuple[str, str]] = []
    if s.deny_rate_over_time:
        fig, ax = plt.subplots(figsize=(8, 2.6))
        from matplotlib.dates import date2num

        times = [float(date2num(t)) for t, _n, _d in s.deny_rate_over_time]  # type: ignore[no-untyped-call]
        ax.bar(
            times,
            [n - d for _t, n, d in s.deny_rate_over_time],
            width=1 / 86400,
            label="allowed",
            color="#4c9a6a",
        )
        ax.bar(
            times,
            [d for _t, _n, d in s.deny_rate_over_time],
            width=1 / 86400,
            bottom=[n - d for _t, n, d in s.deny_rate_over_time],
            label="denied",
            color="#c0504d",
        )
        ax.set_ylabel("receipts / s")
        ax.legend(loc="upper right")
        ax.xaxis_date()
        fig.autofmt_xdate()
        charts.append(("Decisions over time (allowed vs denied per second)", _svg(fig)))
        plt.close(fig)
    if s.by_tool:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(s.by_tool) + 1))
        labels = [f"{ts}/{t}" for ts, t, _a, _d in s.by_tool]
        ax.barh(labels, [a for *_x, a, _d in s.by_tool], color="#4c9a6a", label="allowed")
        ax.barh(
            labels,
            [d for *_x, d in s.by_tool],
            left=[a for *_x, a, _d in s.by_tool],
            color="#c0504d",
            label="denied",
        )
        ax.set_xlabel("receipts")
        ax.legend(loc="lower right")
        charts.append(("Per tool server / tool", _svg(fig)))
        plt.close(fig)
    timed = [t for t in s.tool_outcomes if t.p50_us is not None and t.p95_us is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(timed) + 1))
        labels = [f"{t.tool_server}/{t.tool}" for t in timed]
        ax.barh(labels, [(t.p95_us or 0) / 1000 for t in timed], color="#e0a050", label="p95")
        ax.barh(labels, [(t.p50_us or 0) / 1000 for t in timed], color="#5470c6", label="p50")
        ax.set_xlabel("call duration, ms (completed and failed calls)")
        ax.legend(loc="lower right")
        charts.append(("Call duration per tool (p50, p95)", _svg(fig)))
        plt.close(fig)
    if s.runs and s.steps:
        order = {(r.workflow_id, r.run_id): i for i, r in enumerate(s.runs)}
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(s.runs) + 1.2))
        t0 = min(st.evaluated_at for st in s.steps)
        for st in s.steps:
            y = order.get((st.workflow_id, st.run_id))
            if y is None:
                continue
            x = (st.evaluated_at - t0).total_seconds()
            ax.plot(
                x,
                y,
                marker="o" if st.verdict == "ALLOW" else "X",
                linestyle="",
                color="#4c9a6a" if st.verdict == "ALLOW" else "#c0504d",
                markersize=6,
            )
        last_x: dict[str, float] = {}
        for st in s.steps:
            x = (st.evaluated_at - t0).total_seconds()
            last_x[st.run_id] = max(x, last_x.get(st.run_id, 0.0))
        for run in s.runs:
            y = order[(run.workflow_id, run.run_id)]
            x0 = last_x.get(run.run_id, 0.0)
            target = next((order[k] for k in order if k[1] == run.continued_as_new_run_id), None)
            if run.continued_as_new_run_id and target is not None:
                # continue-as-new: from this run's last step down to the next run
                ax.annotate(
                    "",
                    xy=(x0, target),
                    xytext=(x0, y),
                    arrowprops={"arrowstyle": "->", "color": "#5470c6"},
                )
            source = next((k for k in order if k[0] in run.parent_workflow_ids[:1]), None)
            if source is not None:
                # parent -> child, dashed
                ax.annotate(
                    "",
                    xy=(x0, y),
                    xytext=(x0, order[source]),
                    arrowprops={"arrowstyle": "->", "color": "#999999", "linestyle": "dashed"},
                )
        ax.set_yticks(range(len(s.runs)))
        ax.set_yticklabels([f"{r.workflow_type} …{r.run_id[-6:]}" for r in s.runs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(
            "seconds since the first receipt (o allowed, x denied; arrows: "
            "continue-as-new in blue, parent → child dashed)"
        )
        charts.append(("Timeline of each run's steps", _svg(fig)))
        plt.close(fig)
    return charts


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def write_html_report(s: Summary, path: Path) -> Path:
    """Write the one-file HTML report (inline SVG charts, no external assets)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>chio-receipts demo</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.2em .6em;text-align:left}svg{max-width:100%;height:auto}</style></head><body>",
        "<h1>chio-receipts demo report</h1>",
        f"<p>{len(s.runs)} runs, {s.step_rows} step receipts ({s.distinct_receipts} distinct), "
        f"{s.denied} denied, {s.incomplete} incomplete envelopes.</p>",
        "<h2>Runs by outcome</h2>",
        _table(["outcome", "runs"], s.runs_by_outcome),
        "<h2>Allow / deny per tool server and tool</h2>",
        _table(["tool server", "tool", "allowed", "denied"], s.by_tool),
        "<h2 id='denies'>Denies: the guard that decided, and why</h2>",
        _table(["tool server", "tool", "guard", "reason", "steps"], s.denies),
        "<h2>Policy latency per activity type</h2>",
        _table(
            ["activity type", "evaluations", "p50 µs", "p95 µs"],
            [(a, n, f"{p50:.0f}", f"{p95:.0f}") for a, n, p50, p95 in s.latency],
        ),
        "<h2 id='outcomes'>Outcomes and durations per tool</h2>",
        f"<p>{html.escape(outcomes_note(s))}</p>",
        _table(OUTCOME_HEAD, outcome_table_rows(s)) if s.tool_outcomes else "",
        "<h2 id='attempts'>Attempts accounted per run</h2>",
        _table(ACCOUNT_HEAD, account_table_rows(s)),
        "<h2 id='approvals'>Approvals</h2>",
        f"<p>{s.pending_approval} attempt(s) held for a person's approval; every decision "
        "below is signed by the sidecar and names the approver's credential.</p>",
        _table(APPROVAL_HEAD, approval_table_rows(s)),
    ]
    for title, svg in _charts(s):
        parts.append(f"<h2>{html.escape(title)}</h2>{svg}")
    parts.append("<h2>Runs</h2>")
    parts.append(
        _table(
            ["workflow", "run", "type", "outcome", "steps", "denied", "parent", "continued as"],
            [
                (
                    r.workflow_id,
                    "…" + r.run_id[-6:],
                    r.workflow_type,
                    r.outcome,
                    r.step_count,
                    r.deny_count,
                    ", ".join(r.parent_workflow_ids),
                    r.continued_as_new_run_id[-6:],
                )
                for r in s.runs
            ],
        )
    )
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), "utf-8")
    return path
