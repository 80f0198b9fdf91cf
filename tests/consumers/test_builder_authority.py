"""Temporal is the authority on a run: the builder's handling of declared (``finalize_workflow``)
and watcher completions (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from chio_receipts.consumers import ReceiptBuilder, StepEntry
from chio_receipts.consumers._rows import completion_from_row, envelope_row
from chio_receipts.schemas import CompletionSource, KeyPair, Outcome, RunCompletion, receipt_hash
from tests.support.consumer_factory import completion, signed_run

pytestmark = pytest.mark.unit
KEY = KeyPair.generate("worker-1")
GRACE = 5_000_000
T0 = 1_000_000


def _setup(n: int = 3) -> tuple[ReceiptBuilder, object, list[StepEntry]]:
    b = ReceiptBuilder(grace_us=GRACE, evict_after_us=60_000_000)
    run = b.open_run("default/wf/run", "default", "wf", "run", 0)
    b.hydrate(run, [])
    entries = []
    for r, w in signed_run(KEY, "wf", "run", n):
        body = w[10:]
        entries.append(StepEntry(r.receipt_id, r.verdict.value, body, receipt_hash(body)))
    return b, run, entries


def _declared(outcome: Outcome = Outcome.SUCCESS) -> RunCompletion:
    """A worker's ``finalize_workflow`` completion: no expected count, its own times."""
    done = completion("wf", "run", expected=None, outcome=outcome)
    return dataclasses.replace(
        done, source=CompletionSource.FINALIZE, started_at=7, closed_at=T0 + 5
    )


def _watcher(outcome: Outcome, expected: int) -> RunCompletion:
    done = completion("wf", "run", expected=expected, outcome=outcome)
    return dataclasses.replace(done, started_at=3, closed_at=T0 + 50)


def test_declared_success_then_terminate_in_the_grace_window_gives_one_terminated_envelope() -> (
    None
):
    b, run, entries = _setup(3)
    for e in entries:
        b.add_step(run, e, T0)
    assert b.add_completion(run, _declared(), offset=10, now_us=T0)
    assert list(b.due(T0 + 1)) == []  # waits for Temporal's completion
    assert b.pending_offset(0) == 10
    assert b.add_completion(run, _watcher(Outcome.TERMINATED, 3), offset=11, now_us=T0 + 2)
    [(_, env)] = list(b.due(T0 + 3))
    assert env.revision == 1
    assert (env.outcome, env.complete, env.expected_steps) == ("terminated", True, 3)
    assert (env.started_at, env.completed_at) == (3, T0 + 50)
    assert env.metadata()["declared_outcome"] == "success"
    assert env.metadata()["outcome_source"] == "watcher"
    assert env.step_count == 3
    b.mark_written(run, env, T0 + 3)
    assert b.pending_offset(0) is None


def test_a_provisional_envelope_is_superseded_by_temporals_completion() -> None:
    b, run, entries = _setup(2)
    for e in entries:
        b.add_step(run, e, T0)
    b.add_completion(run, _declared(), offset=10, now_us=T0)
    [(_, first)] = list(b.due(T0 + GRACE))
    assert (first.revision, first.outcome, first.complete) == (1, "unknown", False)
    assert (first.completed_at, first.expected_steps, first.missing_steps) == (None, None, 0)
    assert first.metadata()["outcome_source"] == "finalize"
    assert first.metadata()["declared_outcome"] == "success"
    b.mark_written(run, first, T0 + GRACE)
    assert b.pending_offset(0) is None
    # A duplicate declaration changes nothing.
    assert not b.add_completion(run, _declared(Outcome.FAILURE), offset=12, now_us=T0 + GRACE)
    assert list(b.due(T0 + GRACE + 1)) == []
    # Temporal's completion arrives: a new revision says what happened.
    assert b.add_completion(run, _watcher(Outcome.TERMINATED, 2), offset=13, now_us=T0 + GRACE)
    assert b.pending_offset(0) == 13
    [(_, second)] = list(b.due(T0 + GRACE + 1))
    assert (second.revision, second.outcome, second.complete) == (2, "terminated", True)
    assert second.started_at == 3
    assert second.metadata()["declared_outcome"] == "success"
    b.mark_written(run, second, T0 + GRACE + 1)
    # The watcher's completion again (replay, duplicate): nothing new.
    assert not b.add_completion(run, _watcher(Outcome.SUCCESS, 2), offset=14, now_us=T0 + GRACE)
    assert list(b.due(T0 + 2 * GRACE)) == []


def test_a_declaration_never_overrides_temporal() -> None:
    b, run, entries = _setup(1)
    b.add_step(run, entries[0], T0)
    b.add_completion(run, _watcher(Outcome.FAILURE, 1), offset=10, now_us=T0)
    [(_, env)] = list(b.due(T0 + 1))
    b.mark_written(run, env, T0 + 1)
    assert "declared_outcome" not in env.metadata()
    # The worker's declaration arrives after Temporal's: kept as metadata only.
    assert b.add_completion(run, _declared(Outcome.SUCCESS), offset=11, now_us=T0 + 2)
    [(_, env2)] = list(b.due(T0 + 3))
    assert (env2.revision, env2.outcome, env2.complete) == (2, "failure", True)
    assert env2.metadata()["declared_outcome"] == "success"


def test_missing_steps_are_waited_for_after_temporal_supersedes() -> None:
    b, run, entries = _setup(3)
    b.add_step(run, entries[0], T0)
    b.add_completion(run, _declared(), offset=10, now_us=T0)
    [(_, first)] = list(b.due(T0 + GRACE))
    b.mark_written(run, first, T0 + GRACE)
    b.add_completion(run, _watcher(Outcome.SUCCESS, 3), offset=11, now_us=T0 + GRACE)
    assert list(b.due(T0 + GRACE + 1)) == []  # waits for the 2 steps Temporal announced
    b.add_step(run, entries[1], T0 + GRACE + 2)
    b.add_step(run, entries[2], T0 + GRACE + 3)
    [(_, env)] = list(b.due(T0 + GRACE + 4))
    assert (env.revision, env.outcome, env.complete, env.step_count) == (2, "success", True, 3)


def test_a_rehydrated_provisional_run_is_superseded_and_replays_are_not_rewritten() -> None:
    b, run, entries = _setup(2)
    for e in entries:
        b.add_step(run, e, T0)
    b.add_completion(run, _declared(), offset=10, now_us=T0)
    [(_, first)] = list(b.due(T0 + GRACE))
    row = envelope_row(first)
    # A restarted builder re-reads the declaration: storage already holds revision 1.
    b2 = ReceiptBuilder(grace_us=GRACE, evict_after_us=1)
    run2 = b2.open_run(run.key, "default", "wf", "run", 0)  # type: ignore[attr-defined]
    extra = dict(row.extra)
    b2.hydrate(
        run2,
        entries,
        revision=1,
        written_root=row.chain_root,
        written_complete=row.complete,
        completion=completion_from_row(row),
        declared=extra["declared_outcome"],
        written_meta=(row.outcome, tuple(sorted(row.extra))),
    )
    assert not b2.add_completion(run2, _declared(), offset=10, now_us=T0 + GRACE)
    assert list(b2.due(T0 + 3 * GRACE)) == []
    assert b2.add_completion(run2, _watcher(Outcome.CANCELLED, 2), offset=11, now_us=T0)
    [(_, env)] = list(b2.due(T0 + 1))
    assert (env.revision, env.outcome, env.complete) == (2, "cancelled", True)
    assert env.metadata()["declared_outcome"] == "success"
