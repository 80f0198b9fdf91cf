"""The common ending of every row: wait, quiesce, snapshot, check I1-I6, record, assert."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from tests.support.faults.invariants import Snapshot, assert_invariants, check
from tests.support.faults.oracle import Oracle
from tests.support.faults.pipeline import Pipeline
from tests.support.faults.report import record_row

__all__ = ["Outcome", "finish"]


@dataclass(slots=True)
class Outcome:
    """What a finished row produced (for extra, row-specific assertions)."""

    oracle: Oracle
    snap: Snapshot
    results: dict[str, list[str]]
    recovery_s: float


async def finish(
    p: Pipeline,
    row: str,
    fault: str,
    *,
    run_timeout: float = 180.0,
    quiesce_timeout: float = 120.0,
    recovery_from: float | None = None,
    injected: Mapping[tuple[str, int, int], str] | None = None,
    note: str = "",
    assert_held: bool = True,
) -> Outcome:
    """Wait for the runs, quiesce, read ClickHouse and the DLQ, check every invariant."""
    await p.wait_runs(run_timeout)
    live = await p.quiesce(quiesce_timeout)
    recovery = (time.monotonic() - recovery_from) if recovery_from is not None else None
    snap = await p.snapshot()
    oracle = p.oracle()
    closed, _ = await p.closed_runs()
    results = check(oracle, snap, closed_runs=closed, injected=injected, liveness=live)
    if not live.drained:
        results["I6"].append(f"I6: still moving at the bound: {p.last_unquiet}")
    incomplete = sum(1 for e in snap.envelopes if not e.complete)
    if incomplete:
        note = f"{note}; {incomplete} envelope(s) incomplete".lstrip("; ")
    explained = Counter(
        account for e in snap.envelopes for *_, account, _ in e.accounts if account != "RECEIPTED"
    )
    if explained:
        said = ", ".join(f"{n} {account}" for account, n in sorted(explained.items()))
        note = f"{note}; attempts {said}".lstrip("; ")
    record_row(
        row,
        fault,
        oracle=oracle,
        snap=snap,
        results=results,
        recovery_s=recovery if recovery is not None else live.drain_seconds,
        note=note,
    )
    if assert_held:
        assert_invariants(results, context=f"{row} {fault}")
    return Outcome(oracle, snap, results, recovery if recovery is not None else live.drain_seconds)
