"""The approval check ``verify`` runs on a run's steps (pure): decisions signed by the sidecar,
bound to their request, their approver and their call."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from chio_receipts.consumers._approvals import ApprovalStep, check_approvals
from chio_receipts.schemas import EvaluationRequest, KeyPair, StepReceipt, sign_kernel_receipt
from chio_receipts.sidecar import LocalSidecar
from chio_receipts.sidecar._approvals import RequireApproval

pytestmark = pytest.mark.unit


def _request(cap_id: str, amount: str, attempt_id: str) -> EvaluationRequest:
    return EvaluationRequest(
        capability_id=cap_id,
        tool_server="payments",
        tool="pay",
        namespace="default",
        workflow_id="wf",
        run_id="run",
        workflow_type="Pay",
        task_queue="q",
        activity_id=attempt_id,
        activity_type="pay",
        attempt=1,
        is_local=False,
        argument_digest="",
        argument_key_id="",
        scheduled_at=1,
        started_at=1,
        worker_identity="w",
        prev_hash=b"",
        parameters={"args": [amount]},
    )


def _step(r: StepReceipt) -> ApprovalStep:
    return ApprovalStep(
        receipt_id=r.receipt_id,
        activity_id=r.activity_id,
        attempt=r.attempt,
        verdict=r.verdict.value,
        chio_receipt=r.chio_receipt,
    )


def _run(approve: bool) -> tuple[LocalSidecar, list[StepReceipt]]:
    side = LocalSidecar(guards=[RequireApproval(frozenset({"pay"}))])
    cap = side.mint("agent", ["pay"], 60)
    held = side.evaluate_now(_request(cap.id, "10", "1")).receipt
    approval_id = json.loads(held.chio_receipt)["metadata"]["approval"]["approval_id"]
    side.approvals.respond(
        approval_id, approved=approve, approver="alice", reason="ok", policy_hash="p" * 64
    )
    decided = side.evaluate_now(_request(cap.id, "10", "2")).receipt
    return side, [held, decided]


@pytest.mark.parametrize("approve", [True, False])
def test_a_held_call_and_its_answer_check(approve: bool) -> None:
    side, steps = _run(approve)
    found, problems = check_approvals([_step(s) for s in steps], side.trusted_keys())
    assert problems == []
    assert len(found) == 1
    finding = found[0]
    assert (finding.outcome, finding.approver, finding.reason) == (
        "approved" if approve else "denied",
        "alice",
        "ok",
    )
    assert finding.request_receipt_id == steps[0].receipt_id
    assert finding.decided_receipt_id == steps[1].receipt_id


def _with_decision(step: StepReceipt, edit: Any, key: KeyPair | None = None) -> ApprovalStep:
    receipt = json.loads(step.chio_receipt)
    decision = copy.deepcopy(receipt["metadata"]["approval"]["decision_receipt"])
    body = {k: v for k, v in decision.items() if k not in ("id", "signature", "kernel_key")}
    edit(body)
    receipt["metadata"]["approval"]["decision_receipt"] = sign_kernel_receipt(
        body, key or KeyPair.generate("other")
    )
    return ApprovalStep(
        receipt_id=step.receipt_id,
        activity_id=step.activity_id,
        attempt=step.attempt,
        verdict=step.verdict.value,
        chio_receipt=json.dumps(receipt),
    )


def test_a_forged_or_misbound_decision_is_a_problem() -> None:
    side, (held, decided) = _run(True)
    trusted = side.trusted_keys()
    key = side._key  # the sidecar's own key: only the binding is wrong below

    def other_approver(b: dict[str, Any]) -> None:
        b["metadata"]["approval"]["approver"] = "mallory"

    def other_arguments(b: dict[str, Any]) -> None:
        b["action"]["parameter_hash"] = "0" * 64

    def other_request(b: dict[str, Any]) -> None:
        b["metadata"]["approval"]["request_receipt_id"] = "not-in-the-run"

    cases = {
        "untrusted signer": (_with_decision(decided, lambda b: None), "does not verify"),
        "approver": (_with_decision(decided, other_approver, key), "another approver"),
        "arguments": (_with_decision(decided, other_arguments, key), "other arguments"),
        "request": (_with_decision(decided, other_request, key), "is not in the run"),
    }
    for name, (step, expected) in cases.items():
        _, problems = check_approvals([_step(held), step], trusted)
        assert any(expected in p for p in problems), (name, problems)
    # Without its request, even an intact answer is reported.
    _, problems = check_approvals([_step(decided)], trusted)
    assert any("is not in the run" in p for p in problems)
