"""The demo's summary (read from ClickHouse) and its one-file HTML report (matplotlib SVG)."""

from __future__ import annotations

import html
import io
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["QueryFn", "RunRow", "StepRow", "Summary", "read_summary", "write_html_report"]

QueryFn = Callable[[str, Mapping[str, Any]], Awaitable[tuple[list[str], list[tuple[Any, ...]]]]]


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
    return s


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
        "<h2>Policy latency per activity type</h2>",
        _table(
            ["activity type", "evaluations", "p50 µs", "p95 µs"],
            [(a, n, f"{p50:.0f}", f"{p95:.0f}") for a, n, p50, p95 in s.latency],
        ),
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
