"""Gap accounting (pure): Temporal's expected attempts, the run's receipts and its outcome records
give one account per attempt; the builder's envelope carries them and decides completeness."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chio_receipts.consumers._builder import (
    DENIED,
    NO_RECEIPT,
    OUTCOME_WITHOUT_RECEIPT,
    OutcomeEntry,
    ReceiptBuilder,
    StepEntry,
    account_attempts,
)
from chio_receipts.consumers._rows import expected_from_accounts
from chio_receipts.schemas import (
    AccountState,
    AttemptAccount,
    ExpectedAttempt,
    StepStatus,
)
from tests.support.consumer_factory import completion

pytestmark = pytest.mark.unit


def _want(activity: str, attempt: int, end: str = "", *, local: bool = False) -> ExpectedAttempt:
    return ExpectedAttempt(
        activity_id=activity,
        activity_type="charge",
        attempt=attempt,
        is_local=local,
        temporal_end=end,
    )


def _record(
    activity: str,
    attempt: int,
    status: StepStatus,
    *,
    oid: str = "",
    error: str = "",
    signed: bool = True,
) -> OutcomeEntry:
    oid = oid or f"o-{activity}-{attempt}-{status.value}"
    return OutcomeEntry(oid, activity, attempt, status, error, signed, oid.encode())


def _states(accounts: tuple[AttemptAccount, ...]) -> list[tuple[str, int, str, str, str]]:
    return [
        (a.activity_id, a.attempt, a.account.value, a.reason, a.outcome.value) for a in accounts
    ]


def test_every_state_of_an_attempt() -> None:
    expected = [
        _want("1", 1, "completed"),  # receipt + COMPLETED record
        _want("2", 1, "failed:ValueError"),  # receipt, worker died before its record
        _want("3", 1, "failed:GateError"),  # gate failed: sidecar unreachable
        _want("4", 1, "timed_out:start_to_close"),  # nothing: worker lost before evaluation
        _want("5", 1, "failed:KeyError"),  # nothing, not a timeout: a real gap
        _want("6", 1, "completed"),  # a record after a decision, but no decision receipt
    ]
    receipted = {("1", 1), ("2", 1)}
    records = [
        _record("1", 1, StepStatus.COMPLETED),
        _record("3", 1, StepStatus.GATE_FAILED, error="sidecar_unreachable", signed=False),
        _record("6", 1, StepStatus.COMPLETED),
        _record("9", 1, StepStatus.COMPLETED),  # an attempt Temporal did not list
    ]
    accounts = account_attempts(expected, receipted, records)
    assert _states(accounts) == [
        ("1", 1, "RECEIPTED", "", "COMPLETED"),
        ("2", 1, "RECEIPTED", "", "UNKNOWN"),
        ("3", 1, "GATE_FAILED", "sidecar_unreachable", "GATE_FAILED"),
        ("4", 1, "WORKER_LOST", "timed_out:start_to_close", "UNKNOWN"),
        ("5", 1, "MISSING", NO_RECEIPT, "UNKNOWN"),
        ("6", 1, "MISSING", OUTCOME_WITHOUT_RECEIPT, "UNKNOWN"),
    ]
    assert [a.explained for a in accounts] == [True, True, True, True, False, False]


def test_a_denied_attempt_without_outcome_says_why_its_outcome_is_unknown() -> None:
    expected = [_want("1", 1, "failed:PermissionError"), _want("2", 1, "timed_out:x")]
    accounts = account_attempts(expected, {("1", 1), ("2", 1)}, [], denied={("1", 1)})
    assert _states(accounts) == [
        ("1", 1, "RECEIPTED", DENIED, "UNKNOWN"),
        ("2", 1, "RECEIPTED", "", "UNKNOWN"),
    ]


def test_a_receipt_wins_over_a_timeout_and_a_gate_failure_over_a_timeout() -> None:
    expected = [_want("1", 1, "timed_out:heartbeat"), _want("1", 2, "timed_out:start_to_close")]
    records = [
        _record("1", 1, StepStatus.TIMED_OUT, error="heartbeat"),
        _record("1", 2, StepStatus.GATE_FAILED, error="sink_refused"),
    ]
    accounts = account_attempts(expected, {("1", 1)}, records)
    assert _states(accounts) == [
        ("1", 1, "RECEIPTED", "", "TIMED_OUT"),
        ("1", 2, "GATE_FAILED", "sink_refused", "GATE_FAILED"),
    ]


def test_an_unsigned_record_does_not_give_a_receipted_attempt_its_outcome() -> None:
    unsigned = _record("1", 1, StepStatus.COMPLETED, oid="a", signed=False)
    (only_unsigned,) = account_attempts([_want("1", 1)], {("1", 1)}, [unsigned])
    assert (only_unsigned.outcome, only_unsigned.reason) == (
        StepStatus.UNKNOWN,
        "unsigned_outcome:completed",
    )
    # A signed record of the same attempt is preferred, whatever the ids' order.
    signed = _record("1", 1, StepStatus.FAILED, oid="b", error="ValueError")
    (both,) = account_attempts([_want("1", 1)], {("1", 1)}, [unsigned, signed])
    assert (both.account, both.outcome, both.reason) == (
        AccountState.RECEIPTED,
        StepStatus.FAILED,
        "",
    )


def test_local_activity_retries_are_counted_exactly() -> None:
    # A local activity retried in-process: attempts 1..3 each need their own receipt.
    expected = [_want("7", n, "failed:RuntimeError", local=True) for n in (1, 2, 3)]
    expected.append(_want("7", 4, "completed", local=True))
    receipted = {("7", 1), ("7", 2), ("7", 4)}
    records = [
        _record("7", 1, StepStatus.FAILED, error="RuntimeError"),
        _record("7", 2, StepStatus.FAILED, error="RuntimeError"),
        _record("7", 4, StepStatus.COMPLETED),
    ]
    accounts = account_attempts(expected, receipted, records)
    assert all(a.is_local for a in accounts)
    assert _states(accounts) == [
        ("7", 1, "RECEIPTED", "", "FAILED"),
        ("7", 2, "RECEIPTED", "", "FAILED"),
        ("7", 3, "MISSING", NO_RECEIPT, "UNKNOWN"),
        ("7", 4, "RECEIPTED", "", "COMPLETED"),
    ]
    # A listed attempt is accounted once, and the accounts are in (activity_id, attempt) order.
    twice = account_attempts([*reversed(expected), expected[0]], receipted, records)
    assert twice == accounts


def test_accounts_survive_an_envelope_row() -> None:
    """What hydration rebuilds from a stored envelope's accounts gives the same accounts."""
    expected = [_want("1", 1, "timed_out:heartbeat"), _want("2", 1, "failed:X")]
    accounts = account_attempts(expected, {("2", 1)}, [])
    again = account_attempts(expected_from_accounts(accounts), {("2", 1)}, [])
    assert again == accounts
    # ... and a late receipt for the lost attempt turns it into a receipted one.
    later = account_attempts(expected_from_accounts(accounts), {("1", 1), ("2", 1)}, [])
    assert [a.account for a in later] == [AccountState.RECEIPTED] * 2


def _step(receipt_id: str, activity: str, attempt: int) -> StepEntry:
    return StepEntry(
        receipt_id, "ALLOW", receipt_id.encode(), receipt_id.encode(), activity, attempt
    )


def test_the_envelope_is_complete_when_every_attempt_is_accounted_for() -> None:
    builder = ReceiptBuilder(grace_us=1_000, evict_after_us=10**9)
    run = builder.open_run("default/wf/r", "default", "wf", "r", 0)
    builder.add_step(run, _step("r1", "1", 1), 0)
    builder.add_outcome(run, _record("1", 1, StepStatus.COMPLETED, oid="o1"), 0)
    builder.add_outcome(
        run, _record("2", 1, StepStatus.GATE_FAILED, oid="o2", error="sidecar_unreachable"), 0
    )
    done = replace(
        completion("wf", "r", expected=3),
        expected_attempts=(
            _want("1", 1, "completed"),
            _want("2", 1, "failed:GateError"),
            _want("2", 2, "timed_out:start_to_close"),
        ),
    )
    builder.add_completion(run, done, 5, 0)
    # expected_steps says 3 and only one step arrived, yet every attempt is explained: due now.
    [(_, envelope)] = list(builder.due(1))
    assert envelope.complete
    assert envelope.missing_steps == 0
    assert [a.account for a in envelope.attempts] == [
        AccountState.RECEIPTED,
        AccountState.GATE_FAILED,
        AccountState.WORKER_LOST,
    ]
    assert envelope.outcome_ids == ("o1", "o2")
    meta = envelope.metadata()
    assert (meta["outcomes"], meta["missing_attempts"], meta["gate_failed_attempts"]) == (
        "2",
        "0",
        "1",
    )
    assert meta["worker_lost_attempts"] == "1"
    builder.mark_written(run, envelope, 1)
    # A duplicate outcome changes nothing; a late receipt for the lost attempt is revision 2.
    assert not builder.add_outcome(run, _record("1", 1, StepStatus.COMPLETED, oid="o1"), 2)
    assert list(builder.due(2)) == []
    builder.add_step(run, _step("r2", "2", 2), 3)
    [(_, revised)] = list(builder.due(3))
    assert revised.revision == 2
    assert [a.account for a in revised.attempts][-1] is AccountState.RECEIPTED


def test_a_real_gap_waits_for_grace_then_stays_incomplete() -> None:
    builder = ReceiptBuilder(grace_us=1_000, evict_after_us=10**9)
    run = builder.open_run("default/wf/r", "default", "wf", "r", 0)
    done = replace(
        completion("wf", "r", expected=None), expected_attempts=(_want("1", 1, "failed:X"),)
    )
    builder.add_completion(run, done, 0, 0)
    assert list(builder.due(500)) == []  # waiting for the receipt
    [(_, envelope)] = list(builder.due(2_000))
    assert not envelope.complete
    assert envelope.missing_steps == 1
    assert envelope.metadata()["missing_attempts"] == "1"
    builder.mark_written(run, envelope, 2_000)
    # A late outcome record alone (no receipt) is a new revision, still missing.
    builder.add_outcome(run, _record("1", 1, StepStatus.FAILED, oid="o9"), 3_000)
    [(_, revised)] = list(builder.due(3_000))
    assert revised.revision == 2
    assert not revised.complete
    assert revised.attempts[0].reason == OUTCOME_WITHOUT_RECEIPT


def test_without_expected_attempts_the_count_rule_decides() -> None:
    builder = ReceiptBuilder(grace_us=1_000, evict_after_us=10**9)
    run = builder.open_run("default/wf/r", "default", "wf", "r", 0)
    builder.add_step(run, _step("r1", "1", 1), 0)
    builder.add_completion(run, completion("wf", "r", expected=1), 0, 0)
    [(_, envelope)] = list(builder.due(1))
    assert envelope.complete
    assert envelope.attempts == ()
    assert "missing_attempts" not in envelope.metadata()
    assert "outcomes" not in envelope.metadata()
