"""F0 (baseline, no fault) and F21 (tampering, on F0's ClickHouse rows)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chio_receipts.consumers import verify_run
from tests.support.faults.pipeline import Pipeline, clickhouse_dsn_for
from tests.support.faults.report import record_row
from tests.support.faults.scenario import Outcome, finish
from tests.support.faults.workload import FaultInput

pytestmark = pytest.mark.e2e

QUICK_RUNS = int(os.environ.get("CHIO_F0_RUNS", "50"))


@pytest.fixture(scope="module")
async def baseline(
    stack: Any, temporal_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Pipeline, Outcome]]:
    """One baseline run shared by F0 (its invariants) and F21 (tampering with its rows)."""
    root = tmp_path_factory.mktemp("f0")
    p = Pipeline(
        root,
        name=f"f0-{uuid.uuid4().hex[:6]}",
        bootstrap=stack.kafka_bootstrap,
        temporal_address=stack.temporal_address,
        client=temporal_client,
        dsn=clickhouse_dsn_for(root),
    )
    try:
        await p.start()
        await p.start_runs(QUICK_RUNS, FaultInput(steps=4, payload="x" * 64), deny_every=5)
        out = await finish(p, "F0", f"none ({QUICK_RUNS} runs x 4 steps)", assert_held=False)
        yield p, out
    finally:
        await p.close()


@pytest.mark.timeout(400)
async def test_f0_baseline(baseline: tuple[Pipeline, Outcome]) -> None:
    from tests.support.faults.invariants import assert_invariants

    _, out = baseline
    assert_invariants(out.results, context="F0")
    # Every attempt, the denied ones included, has exactly one receipt: per activity, attempts
    # 1..n each once (a loaded machine makes Temporal retry timed-out attempts, which is fine).
    attempts: dict[tuple[str, str, str], list[int]] = {}
    for r in out.snap.steps:
        attempts.setdefault((r.workflow_id, r.run_id, r.activity_id), []).append(r.attempt)
    assert len(attempts) == QUICK_RUNS * 4
    odd = {k: v for k, v in attempts.items() if sorted(v) != list(range(1, len(v) + 1))}
    assert not odd, odd
    assert len(out.snap.envelopes) == QUICK_RUNS
    denied = {(r.workflow_id, r.run_id) for r in out.snap.steps if r.verdict == "DENY"}
    assert len(denied) == len(range(0, QUICK_RUNS, 5))


def _problems(client: Any, wf: str, keys: dict[str, bytes]) -> list[str]:
    return list(verify_run(client, wf, keys=keys).problems)


@pytest.mark.timeout(300)
async def test_f21_tampering_is_reported_exactly(baseline: tuple[Pipeline, Outcome]) -> None:
    """Change a field, flip a verdict, delete a row, forge a row, reorder an envelope: verify
    names each tampered receipt with what was done to it, and every other run still verifies."""
    p, out = baseline
    assert not out.snap.verify_problems, out.snap.verify_problems
    runs = sorted({(r.workflow_id, r.run_id) for r in out.snap.steps})
    steps = {
        run: sorted(
            (r for r in out.snap.steps if (r.workflow_id, r.run_id) == run),
            key=lambda r: r.receipt_id,
        )
        for run in runs
    }
    denied_run = next(run for run in runs if any(r.verdict == "DENY" for r in steps[run]))
    others = [run for run in runs if run != denied_run]
    changed, deleted, forged, reordered = others[:4]
    sync = {"mutations_sync": 2}
    client = p.clickhouse()
    try:
        keys = p.public_keys
        # 1. a field changed in place
        victim = steps[changed][1].receipt_id
        client.command(
            "ALTER TABLE step_receipts UPDATE reason = 'nothing to see' "
            f"WHERE receipt_id = '{victim}'",
            settings=sync,
        )
        # 2. a denial turned into an allow
        flipped = next(r.receipt_id for r in steps[denied_run] if r.verdict == "DENY")
        client.command(
            f"ALTER TABLE step_receipts UPDATE verdict = 'ALLOW' WHERE receipt_id = '{flipped}'",
            settings=sync,
        )
        # 3. a row deleted
        gone = steps[deleted][2].receipt_id
        client.command(
            f"ALTER TABLE step_receipts DELETE WHERE receipt_id = '{gone}'", settings=sync
        )
        # 4. a forged row: a copy of a real one under a new id (the subquery keeps the alias
        # of REPLACE out of the filter)
        source = steps[forged][0].receipt_id
        fake = str(uuid.uuid4())
        client.command(
            "INSERT INTO step_receipts SELECT * REPLACE (toUUID({fake:String}) AS receipt_id) "
            "FROM (SELECT * FROM step_receipts WHERE receipt_id = {src:String})",
            parameters={"fake": fake, "src": source},
        )
        # 5. an envelope's steps reordered
        client.command(
            "ALTER TABLE workflow_receipts UPDATE receipt_ids = arrayReverse(receipt_ids) "
            "WHERE workflow_id = {w:String}",
            parameters={"w": reordered[0]},
            settings=sync,
        )
        counted = client.query(
            "SELECT count() FROM step_receipts WHERE receipt_id = {f:String}",
            parameters={"f": fake},
        ).result_rows[0][0]
        assert counted == 1, "the forged row was not inserted"
        expectations = {
            # A row keeps the signed message it came from: verify names the changed column; a
            # row without it fails its signature.
            changed[0]: (
                [f"receipt {victim}", ("field reason changed", "signature invalid")],
                victim,
            ),
            denied_run[0]: (
                [f"receipt {flipped}", ("field verdict changed", "signature invalid")],
                flipped,
            ),
            deleted[0]: ([f"step {gone} has no row (deleted)"], gone),
            forged[0]: (
                [f"receipt {fake}", ("field receipt_id changed", "signature invalid")],
                fake,
            ),
            reordered[0]: (["not in receipt-id order"], None),
        }
        # Consequences that may accompany a tampered step (the chain and the envelope over it).
        derived = (
            "refers to previous step",
            "chain_root does not match",
            "builder signature invalid",
            "allow/deny counts",
            "is not in the envelope",
            "is accounted",  # a flipped verdict changes the attempt's recomputed account
        )
        report: dict[str, list[str]] = {}
        for wf, (required, rid) in expectations.items():
            required = list(required)
            problems = _problems(client, wf, keys)
            report[wf] = problems
            for needle in required:
                options = needle if isinstance(needle, tuple) else (needle,)
                assert any(o in x for o in options for x in problems), (wf, needle, problems)
            for x in problems:
                named = rid is not None and rid in x
                assert (
                    named
                    or any(d in x for d in derived)
                    or any(n in x for n in required if isinstance(n, str))
                ), f"{wf}: unexpected problem {x!r}"
        assert any("allow/deny counts" in x for x in report[denied_run[0]]), report[denied_run[0]]
        assert any("is not in the envelope" in x for x in report[forged[0]]), report[forged[0]]
        untouched = [run for run in runs if run[0] not in expectations]
        bad = {wf: _problems(client, wf, keys) for wf, _ in untouched}
        bad = {wf: x for wf, x in bad.items() if x}
        assert not bad, f"untampered runs reported: {bad}"
    finally:
        client.close()
    record_row(
        "F21",
        "tampering: field, verdict, delete, forge, reorder",
        result="held",
        note=f"5 tampered runs reported, {len(untouched)} untouched runs OK",
    )
