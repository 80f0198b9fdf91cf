"""The invariant checks themselves: each one reports exactly what differs."""

from __future__ import annotations

import pytest

from tests.support.faults.invariants import (
    DeadLetterRecord,
    EnvelopeRow,
    Liveness,
    Snapshot,
    StepRow,
    assert_invariants,
    check,
)
from tests.support.faults.oracle import Oracle, OracleEntry

pytestmark = pytest.mark.unit


def _oracle(ids: list[str], run: tuple[str, str] = ("wf", "r")) -> Oracle:
    o = Oracle()
    for i, rid in enumerate(ids):
        o.proposed[rid] = OracleEntry(rid, "default", run[0], run[1], str(i), 1, "ALLOW")
        o.accepted.add(rid)
    return o


def _snap(ids: list[str], *, listed: list[str] | None = None, complete: bool = True) -> Snapshot:
    s = Snapshot(
        steps=[StepRow(r, "wf", "r", str(i), 1, "ALLOW") for i, r in enumerate(ids)],
        counts={"without FINAL": (len(ids), len(set(ids))), "FINAL": (len(set(ids)),) * 2},
    )
    s.envelopes.append(
        EnvelopeRow(
            workflow_id="wf",
            run_id="r",
            revision=1,
            complete=complete,
            missing_steps=0,
            expected_steps=len(set(ids)),
            receipt_ids=tuple(sorted(set(ids) if listed is None else listed)),
            outcome="SUCCESS",
        )
    )
    return s


def test_all_hold_on_a_clean_run() -> None:
    results = check(_oracle(["a", "b"]), _snap(["a", "b"]), closed_runs=[("wf", "r")])
    assert_invariants(results)


def test_each_difference_is_named() -> None:
    oracle = _oracle(["a", "b", "c"])
    snap = _snap(["a", "a", "x"], listed=["a"])
    snap.envelope_revision_dupes.append(("wf", "r", 1, 2))
    snap.verify_problems["wf"] = ["run r: receipt x (activity 2 attempt 1): signature invalid"]
    snap.dead_letters.append(
        DeadLetterRecord(("steps", 0, 7), "BadSignature", "bad_signature", b"")
    )
    live = Liveness(drained=False, bound_seconds=5, running_workflows=1)
    results = check(
        oracle,
        snap,
        closed_runs=[("wf", "r"), ("wf2", "r2")],
        injected={("steps", 0, 9): "malformed"},
        liveness=live,
    )
    text = "\n".join(d for v in results.values() for d in v)
    assert "I1: 2 accepted receipt(s) missing" in text
    assert "b, c" in text
    assert "I2: 1 stored receipt(s) no worker produced: x" in text
    assert "signature invalid" in text
    assert "I3: step_receipts without FINAL: count 3 but 2 distinct ids" in text
    assert "I3: receipt ids stored more than once: a" in text
    assert "envelope wf/r revision 1 stored 2 times" in text
    assert "I4: run wf2/r2: 0 current envelopes" in text
    assert "missing from it: b, c, x" in text
    assert "unexpected dead letter from ('steps', 0, 7)" in text
    assert "1 injected record(s) not dead-lettered: [('steps', 0, 9)]" in text
    assert "did not drain within 5s" in text
    assert "1 workflow(s) still running" in text
    with pytest.raises(AssertionError, match="invariants violated"):
        assert_invariants(results)


def test_incomplete_envelope_must_say_so() -> None:
    snap = _snap(["a"])
    snap.envelopes[0] = EnvelopeRow(
        workflow_id="wf",
        run_id="r",
        revision=2,
        complete=True,
        missing_steps=0,
        expected_steps=3,
        receipt_ids=("a",),
        outcome="SUCCESS",
    )
    results = check(_oracle(["a"]), snap, closed_runs=[("wf", "r")])
    assert results["I4"] == ["I4: run wf/r: marked complete with 1 of 3 expected steps"]


def test_a_proposed_but_never_accepted_receipt_may_or_may_not_exist() -> None:
    oracle = _oracle(["a"])
    oracle.proposed["p"] = OracleEntry("p", "default", "wf", "r", "9", 1, "ALLOW")
    for stored in (["a"], ["a", "p"]):
        results = check(oracle, _snap(stored), closed_runs=[("wf", "r")])
        assert not results["I1"]
        assert not results["I2"]
