"""The fault suite's summary table: one line per row run in this session."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tests.support.faults.invariants import Snapshot
from tests.support.faults.oracle import Oracle

__all__ = ["RESULTS", "RowResult", "record_row", "table"]


@dataclass(frozen=True, slots=True)
class RowResult:
    """One matrix row's outcome."""

    row: str
    fault: str
    result: str
    produced: int
    in_clickhouse: int
    duplicates: int
    dlq: int
    recovery_s: float | None
    note: str = ""


RESULTS: list[RowResult] = []


def record_row(
    row: str,
    fault: str,
    *,
    oracle: Oracle | None = None,
    snap: Snapshot | None = None,
    results: Mapping[str, list[str]] | None = None,
    recovery_s: float | None = None,
    note: str = "",
    result: str | None = None,
) -> RowResult:
    """Add a line to the table (call it before asserting, so failures are listed too)."""
    if result is None:
        failed = sorted(k for k, v in (results or {}).items() if v)
        result = "held" if not failed else "VIOLATED " + ",".join(failed)
    dupes = 0
    if snap is not None and snap.counts:
        dupes = max(count - uniq for count, uniq in snap.counts.values())
    line = RowResult(
        row=row,
        fault=fault,
        result=result,
        produced=len(oracle.accepted) if oracle is not None else 0,
        in_clickhouse=len(snap.receipt_ids) if snap is not None else 0,
        duplicates=dupes,
        dlq=len(snap.dead_letters) if snap is not None else 0,
        recovery_s=recovery_s,
        note=note,
    )
    RESULTS.append(line)
    return line


def _order(r: RowResult) -> tuple[int, str]:
    digits = "".join(c for c in r.row[1:] if c.isdigit())
    return (int(digits) if digits else 999, r.row)


def table() -> list[str]:
    """The table as text lines."""
    head = ("row", "fault", "result", "produced", "in CH", "dupes", "DLQ", "recovery", "note")
    rows = [
        (
            r.row,
            r.fault,
            r.result,
            str(r.produced),
            str(r.in_clickhouse),
            str(r.duplicates),
            str(r.dlq),
            "-" if r.recovery_s is None else f"{r.recovery_s:.1f}s",
            r.note,
        )
        for r in sorted(RESULTS, key=_order)
    ]
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r) for r in rows
    ]
