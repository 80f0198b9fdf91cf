"""Outcomes, attempt accounts and trace context in the OCSF export (pure): every event the mapping
makes from them validates against the official OCSF JSON Schema, and says what happened."""

from __future__ import annotations

import dataclasses
from typing import Any

import nacl.signing
import pytest

from chio_receipts import schemas
from chio_receipts.consumers._envelope import Envelope
from chio_receipts.consumers._wire import (
    STEP_OUTCOME_SCHEMA,
    STEP_SCHEMA,
    decode_plain,
    encode_plain,
    read_plain,
)
from chio_receipts.consumers.siem import (
    EventFilter,
    attempt_events,
    envelope_to_ocsf,
    is_deny,
    is_gap,
    outcome_to_ocsf,
    step_to_ocsf,
)
from chio_receipts.consumers.siem._exporter import outcome_refusal, to_ocsf
from chio_receipts.schemas import AccountState, AttemptAccount, KeyPair, StepStatus
from tests.support.consumer_factory import receipt
from tests.support.ocsf import ocsf_errors

pytestmark = pytest.mark.unit

WORKER = KeyPair.generate("worker-ocsf-outcomes")
BUILDER = KeyPair.generate("builder-ocsf-outcomes")
SIDECAR = nacl.signing.SigningKey(bytes(range(32)))
SIDECAR_HEX = SIDECAR.verify_key.encode().hex()
TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
T0 = 1_763_000_000_000_000


def _outcome(status: StepStatus, **overrides: Any) -> schemas.StepOutcome:
    fields: dict[str, Any] = {
        "outcome_id": "0190c0de-0000-7000-8000-000000000001",
        "namespace": "default",
        "workflow_id": "order-42",
        "run_id": "run-1",
        "workflow_type": "OrderWorkflow",
        "task_queue": "orders",
        "activity_id": "1",
        "activity_type": "charge_card",
        "attempt": 1,
        "is_local": False,
        "tool_server": "payments",
        "tool": "charge_card",
        "capability_id": "cap-1",
        "decision_receipt_id": "0190c0de-0000-7000-8000-0000000000aa",
        "decision_chio_id": "ab" * 32,
        "status": status,
        "error_type": {
            StepStatus.FAILED: "CardDeclined",
            StepStatus.TIMED_OUT: "start_to_close",
            StepStatus.GATE_FAILED: "sidecar_unreachable",
        }.get(status, ""),
        "started_at": T0,
        "ended_at": T0 + 250_000,
        "duration_us": 250_000,
        "result_digest": "cd" * 32 if status is StepStatus.COMPLETED else "",
        "result_key_id": "hmac-1",
        "worker_identity": "4242@worker-7.example.com",
        "trace_id": TRACE,
        "span_id": SPAN,
    }
    if status is StepStatus.GATE_FAILED:
        fields.update(capability_id="", decision_receipt_id="", decision_chio_id="", duration_us=0)
    fields.update(overrides)
    return schemas.StepOutcome(**fields)


def _signed(outcome: schemas.StepOutcome) -> schemas.StepOutcome:
    return schemas.sign_chio_outcome(outcome, SIDECAR, policy_hash="11" * 32)


def _record(outcome: schemas.StepOutcome) -> dict[str, Any]:
    """The plain record the exporter decodes from the steps topic."""
    return decode_plain(schemas.encode(STEP_OUTCOME_SCHEMA, outcome.to_avro())).record


def _step_record(**overrides: Any) -> dict[str, Any]:
    _, body = schemas.sign_receipt(
        receipt("order-42", "run-1", 0, worker_identity="4242@worker-7.example.com", **overrides),
        WORKER,
    )
    record = read_plain(STEP_SCHEMA, body)
    record["receipt_id"] = str(record["receipt_id"])
    return record


def _envelope(
    steps: list[schemas.StepReceipt],
    outcomes: list[schemas.StepOutcome],
    accounts: list[AttemptAccount],
) -> bytes:
    """A real signed envelope, framed as on the envelopes topic."""
    bodies = [schemas.sign_receipt(s, WORKER)[1] for s in steps]
    envelope = Envelope(
        namespace="default",
        workflow_id="order-42",
        run_id="run-1",
        workflow_type="OrderWorkflow",
        parent_workflow_ids=(),
        started_at=T0,
        completed_at=T0 + 1_000_000,
        outcome="failure",
        revision=2,
        complete=all(a.explained for a in accounts),
        missing_steps=sum(not a.explained for a in accounts),
        expected_steps=len(accounts),
        allow_count=sum(s.verdict is schemas.Verdict.ALLOW for s in steps),
        deny_count=sum(s.verdict is schemas.Verdict.DENY for s in steps),
        receipt_ids=tuple(s.receipt_id for s in steps),
        steps=tuple(bodies),
        chain_root=b"\x01" * 32,
        outcomes=tuple(encode_plain(STEP_OUTCOME_SCHEMA, o.to_avro()) for o in outcomes),
        attempts=tuple(accounts),
    ).signed_by(BUILDER)
    return envelope.framed()


def _account(activity_id: str, attempt: int, state: AccountState, reason: str = "", **kw: Any):
    return AttemptAccount(
        activity_id=activity_id,
        activity_type=f"step_{activity_id}",
        attempt=attempt,
        is_local=False,
        account=state,
        reason=reason,
        **kw,
    )


def _run() -> dict[str, Any]:
    """The plain record the exporter decodes from :func:`_run_framed`."""
    return decode_plain(_run_framed()).record


def _run_framed() -> bytes:
    """A run's envelope: activity 0 allowed and completed; activity 1 allowed, failed, then its
    attempt 2 refused at the gate; activity 2's worker lost after its decision; 3 missing."""
    step0 = receipt("order-42", "run-1", 0, worker_identity="w@host", trace_id=TRACE, span_id=SPAN)
    step1 = receipt("order-42", "run-1", 1, worker_identity="w@host")
    step2 = receipt("order-42", "run-1", 2, worker_identity="w@host")
    done = _signed(
        _outcome(
            StepStatus.COMPLETED,
            activity_id="0",
            decision_receipt_id=step0.receipt_id,
            outcome_id="0190c0de-0000-7000-8000-000000000010",
        )
    )
    failed = _signed(
        _outcome(
            StepStatus.FAILED,
            activity_id="1",
            decision_receipt_id=step1.receipt_id,
            outcome_id="0190c0de-0000-7000-8000-000000000011",
        )
    )
    gate = _outcome(
        StepStatus.GATE_FAILED,
        activity_id="1",
        attempt=2,
        outcome_id="0190c0de-0000-7000-8000-000000000012",
    )
    accounts = [
        _account("0", 1, AccountState.RECEIPTED, outcome=StepStatus.COMPLETED),
        _account("1", 1, AccountState.RECEIPTED, outcome=StepStatus.FAILED),
        _account("1", 2, AccountState.GATE_FAILED, "sidecar_unreachable"),
        _account("2", 1, AccountState.WORKER_LOST, "worker lost after the decision"),
        _account("3", 1, AccountState.MISSING, "no receipt for a started attempt"),
    ]
    return _envelope([step0, step1, step2], [done, failed, gate], accounts)


def _events() -> dict[str, dict[str, Any]]:
    events: dict[str, dict[str, Any]] = {}
    for status in StepStatus:
        outcome = _outcome(status)
        if status is not StepStatus.GATE_FAILED:
            outcome = _signed(outcome)
        events[f"outcome {status.value}"] = outcome_to_ocsf(_record(outcome))
        untraced = dataclasses.replace(outcome, trace_id="", span_id="")
        events[f"outcome {status.value} untraced"] = outcome_to_ocsf(_record(untraced))
    events["gate failure signed"] = outcome_to_ocsf(
        _record(_signed(_outcome(StepStatus.GATE_FAILED)))
    )
    events["step traced"] = step_to_ocsf(_step_record(trace_id=TRACE, span_id=SPAN))
    events["step untraced"] = step_to_ocsf(_step_record())
    run = _run()
    events["run with outcomes"] = envelope_to_ocsf(run)
    for event in attempt_events(run):
        events[f"attempt {event['unmapped']['account']}"] = event
    events["run without outcomes"] = envelope_to_ocsf(decode_plain(_envelope([], [], [])).record)
    return events


EVENTS = _events()


@pytest.mark.parametrize("case", sorted(EVENTS))
def test_every_event_validates_against_the_ocsf_json_schema(case: str) -> None:
    assert ocsf_errors(EVENTS[case]) == []


def test_the_events_cover_every_status_and_every_unreceipted_account() -> None:
    assert {f"outcome {s.value}" for s in StepStatus} <= set(EVENTS)
    assert {"attempt GATE_FAILED", "attempt WORKER_LOST", "attempt MISSING"} <= set(EVENTS)


@pytest.mark.parametrize(
    ("status", "status_id", "action", "disposition_id"),
    [
        (StepStatus.COMPLETED, 1, "Allowed", 1),
        (StepStatus.FAILED, 2, "Allowed", 1),
        (StepStatus.CANCELLED, 2, "Allowed", 1),
        (StepStatus.TIMED_OUT, 2, "Allowed", 1),
        (StepStatus.GATE_FAILED, 2, "Denied", 27),
        (StepStatus.UNKNOWN, 0, "Allowed", 1),
    ],
)
def test_an_outcome_says_how_the_call_ended(
    status: StepStatus, status_id: int, action: str, disposition_id: int
) -> None:
    event = EVENTS[f"outcome {status.value}"]
    outcome = _outcome(status)
    assert event["metadata"]["log_name"] == "chio.receipts.outcomes"
    assert event["metadata"]["uid"] == outcome.outcome_id
    assert event["metadata"]["correlation_uid"] == "order-42/run-1"
    assert (event["status_id"], event["status_code"]) == (status_id, status.value)
    assert (event["action"], event["disposition_id"]) == (action, disposition_id)
    assert is_deny(event) is (status is StepStatus.GATE_FAILED)
    assert event["start_time"] == T0 // 1000
    assert event["end_time"] == (T0 + 250_000) // 1000
    assert event["duration"] == outcome.duration_us // 1000
    assert event["unmapped"]["duration_us"] == outcome.duration_us
    assert event["unmapped"]["result_digest"] == outcome.result_digest
    assert event["unmapped"]["error_type"] == outcome.error_type
    if outcome.error_type:
        assert event["api"]["response"] == {"error": outcome.error_type}
        assert event["status_detail"] == f"{status.value.lower()}: {outcome.error_type}"
    else:
        assert "response" not in event["api"]
        assert event["status_detail"] == status.value.lower()
    # Linked to its decision; a gate failure has none and names itself.
    expected = outcome.decision_receipt_id or outcome.outcome_id
    assert event["api"]["request"]["uid"] == expected
    assert event["unmapped"]["signed"] is (status is not StepStatus.GATE_FAILED)


def test_the_trace_context_goes_in_the_trace_profile() -> None:
    outcome = EVENTS["outcome FAILED"]
    assert outcome["metadata"]["profiles"] == ["security_control", "trace"]
    assert outcome["trace"] == {
        "uid": TRACE,
        "span": {
            "uid": SPAN,
            "operation": "charge_card",
            "start_time": T0 // 1000,
            "end_time": (T0 + 250_000) // 1000,
            "duration": 250,
            "status_code": "FAILED",
        },
    }
    step = EVENTS["step traced"]
    assert step["metadata"]["profiles"] == ["security_control", "trace"]
    assert step["trace"] == {"uid": TRACE}  # the decision is made inside the attempt's span
    assert step["unmapped"]["span_id"] == SPAN
    for case in ("step untraced", "outcome COMPLETED untraced"):
        event = EVENTS[case]
        assert "trace" not in event
        assert event["metadata"]["profiles"] == ["security_control"]
    # The trace profile is what makes `trace` valid: without it declared, it is rejected.
    undeclared = dict(outcome, metadata={**outcome["metadata"], "profiles": ["security_control"]})
    assert any("trace" in e for e in ocsf_errors(undeclared))


def test_the_run_event_joins_accounts_decisions_and_outcomes() -> None:
    run = EVENTS["run with outcomes"]
    unmapped = run["unmapped"]
    assert unmapped["outcomes"] == {"COMPLETED": 1, "FAILED": 1, "GATE_FAILED": 1}
    assert unmapped["attempts"] == {
        "GATE_FAILED": 1,
        "MISSING": 1,
        "RECEIPTED": 2,
        "WORKER_LOST": 1,
    }
    assert unmapped["trace_ids"] == [TRACE]
    joined = {(a["activity_id"], a["attempt"]): a for a in unmapped["attempt_outcomes"]}
    assert list(joined) == [("0", 1), ("1", 1), ("1", 2), ("2", 1), ("3", 1)]
    assert joined[("0", 1)]["status"] == "COMPLETED"
    assert joined[("0", 1)]["verdict"] == "ALLOW"
    assert joined[("0", 1)]["result_digest"] == "cd" * 32
    assert joined[("1", 1)]["error_type"] == "CardDeclined"
    assert joined[("1", 1)]["duration_us"] == 250_000
    assert joined[("1", 2)] == {
        "activity_id": "1",
        "attempt": 2,
        "account": "GATE_FAILED",
        "reason": "sidecar_unreachable",
        "status": "GATE_FAILED",
        "error_type": "sidecar_unreachable",
        "duration_us": 0,
        "result_digest": "",
        "outcome_id": "0190c0de-0000-7000-8000-000000000012",
    }
    assert joined[("2", 1)]["account"] == "WORKER_LOST"
    assert "status" not in joined[("2", 1)]  # outcome unknown
    assert joined[("3", 1)] == {
        "activity_id": "3",
        "attempt": 1,
        "account": "MISSING",
        "reason": "no receipt for a started attempt",
    }
    empty = EVENTS["run without outcomes"]["unmapped"]
    assert (empty["outcomes"], empty["attempts"], empty["attempt_outcomes"]) == ({}, {}, [])


def test_unreceipted_attempts_are_events_of_their_own() -> None:
    run = _run()
    events = {e["unmapped"]["account"]: e for e in attempt_events(run)}
    assert set(events) == {"GATE_FAILED", "WORKER_LOST", "MISSING"}  # not the RECEIPTED ones
    for state, event in events.items():
        key = event["unmapped"]["activity_id"], event["unmapped"]["attempt"]
        assert event["metadata"]["log_name"] == "chio.receipts.attempts"
        assert event["metadata"]["uid"] == f"order-42/run-1/2/{key[0]}/{key[1]}"
        assert event["status_code"] == state
    gate = events["GATE_FAILED"]
    assert (gate["action"], gate["disposition"], gate["status"]) == ("Denied", "Error", "Failure")
    assert gate["status_detail"] == "gate_failed: sidecar_unreachable"
    assert gate["api"]["service"]["name"] == "payments"  # from its outcome record
    lost = events["WORKER_LOST"]
    assert (lost["action"], lost["status_id"]) == ("Allowed", 0)  # its decision allowed it
    assert lost["src_endpoint"]["name"] == "w@host"
    missing = events["MISSING"]
    assert (missing["action_id"], missing["status"], missing["severity"]) == (0, "Failure", "High")
    assert missing["status_detail"] == "missing: no receipt for a started attempt"
    assert missing["src_endpoint"] == {"svc_name": "temporal", "name": "default"}
    assert missing["api"]["request"]["uid"] == "order-42/run-1/3/1"
    # The exporter sends the run event, then these. deny_only keeps the gate failure (a
    # refusal) and the real gap (never filtered out); a tool-server filter keeps the gap too.
    out = to_ocsf(decode_plain(_run_framed()))
    assert [e["metadata"]["log_name"] for e in out] == [
        "chio.receipts.envelopes",
        *["chio.receipts.attempts"] * 3,
    ]
    kept = [e for e in out if EventFilter(deny_only=True).keep(e)]
    assert [e["unmapped"].get("account") for e in kept] == ["GATE_FAILED", "MISSING"]
    kept = [e for e in out if EventFilter(tool_servers=frozenset({"other"})).keep(e)]
    assert [e["unmapped"].get("account") for e in kept] == ["GATE_FAILED", "MISSING"]
    kept = [e for e in out if EventFilter(drop_denies=True, deny_only=True).keep(e)]
    assert [e["unmapped"].get("account") for e in kept] == ["MISSING"]
    assert [is_gap(e) for e in out] == [False, False, False, True]


def test_the_exporter_checks_an_outcome_receipt_as_a_step_receipt() -> None:
    trusted = frozenset({SIDECAR_HEX})
    signed = _signed(_outcome(StepStatus.FAILED))
    assert outcome_refusal(_record(signed), trusted) is None
    # Another status than the one signed: the receipt no longer binds the record.
    forged = dataclasses.replace(signed, status=StepStatus.COMPLETED)
    refusal = outcome_refusal(_record(forged), trusted)
    assert refusal is not None
    assert refusal.reason == "bad_chio_receipt"
    # A signer nobody trusts: the key is named so the exporter refreshes its ring once.
    refusal = outcome_refusal(_record(signed), frozenset({"00" * 32}))
    assert refusal is not None
    assert (refusal.reason, refusal.untrusted_key) == ("untrusted_kernel_key", SIDECAR_HEX)
    # Unsigned: only a gate failure may stand.
    assert outcome_refusal(_record(_outcome(StepStatus.GATE_FAILED)), trusted) is None
    refusal = outcome_refusal(_record(_outcome(StepStatus.COMPLETED)), trusted)
    assert refusal is not None
    assert refusal.reason == "unsigned_step"
