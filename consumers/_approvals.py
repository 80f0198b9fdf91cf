"""The approvals a run's steps carry, checked (pure; ``verify`` runs it on every run).

A held attempt's step (verdict ``PENDING_APPROVAL``) carries the request: its Chio receipt's
``metadata.approval`` names the approval (``state: approval_required``). The attempt that ran
after the answer carries the decision: its Chio receipt (allow for approved, deny by guard
``approval`` for denied) has ``metadata.approval`` with the approver and ``decision_receipt``,
the sidecar's signed answer, which names the approver, the reason, the bound call and the
request's receipt. The step's own signature covers all of it; this module checks the embedded
decision on its own: signed by a trusted key, for the same approval, approver and call
(capability, tool server, tool, parameter hash), with the outcome the step shows, and answering
a request that is in the run.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chio_receipts.schemas import APPROVAL_REQUIRED, approval_state, verify_kernel_receipt

__all__ = ["ApprovalFinding", "ApprovalStep", "check_approvals"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalStep:
    """The parts of one step the check reads."""

    receipt_id: str
    activity_id: str
    attempt: int
    verdict: str
    chio_receipt: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalFinding:
    """One approval of a run: who answered what (``outcome`` empty while unanswered)."""

    approval_id: str
    activity_id: str
    request_receipt_id: str
    outcome: str = ""
    approver: str = ""
    reason: str = ""
    decision_receipt_id: str = ""
    decided_receipt_id: str = ""
    """The step that used the answer."""


def _json(text: str) -> dict[str, Any]:
    try:
        found = json.loads(text) if text else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def check_approvals(
    steps: Iterable[ApprovalStep], trusted: Collection[str]
) -> tuple[list[ApprovalFinding], list[str]]:
    """The run's approvals and the problems found (empty when every decision holds)."""
    problems: list[str] = []
    requests: dict[str, ApprovalFinding] = {}
    answers: list[tuple[ApprovalStep, dict[str, Any], Mapping[str, Any]]] = []
    for step in steps:
        receipt = _json(step.chio_receipt)
        meta = approval_state(receipt)
        if meta is None:
            continue
        approval_id = str(meta.get("approval_id", ""))
        if meta.get("state") == APPROVAL_REQUIRED:
            if step.verdict != "PENDING_APPROVAL":
                problems.append(
                    f"receipt {step.receipt_id}: approval {approval_id} requested but the step "
                    f"is {step.verdict}"
                )
            requests.setdefault(
                approval_id,
                ApprovalFinding(
                    approval_id=approval_id,
                    activity_id=step.activity_id,
                    request_receipt_id=step.receipt_id,
                ),
            )
        else:
            answers.append((step, receipt, meta))
    found = dict(requests)
    for step, receipt, meta in answers:
        approval_id = str(meta.get("approval_id", ""))
        label = f"receipt {step.receipt_id}: approval {approval_id}"
        decision = meta.get("decision_receipt")
        if not isinstance(decision, Mapping):
            problems.append(f"{label}: the step carries no signed decision")
            continue
        checked = verify_kernel_receipt(dict(decision), trusted_keys=set(trusted))
        if not checked.valid:
            problems.append(f"{label}: the signed decision does not verify ({checked.reason})")
            continue
        said = approval_state(decision) or {}
        outcome = str(said.get("state", ""))
        approver = str(said.get("approver", ""))
        if said.get("approval_id") != approval_id:
            problems.append(f"{label}: the signed decision answers another approval")
        if approver != meta.get("approver"):
            problems.append(f"{label}: the step names another approver than the decision")
        allowed = (decision.get("decision") or {}).get("verdict") == "allow"
        if outcome != ("approved" if allowed else "denied") or outcome != meta.get("state"):
            problems.append(f"{label}: the decision's outcome is not the step's")
        if (outcome == "approved") != (step.verdict == "ALLOW"):
            problems.append(f"{label}: a {outcome} decision but the step is {step.verdict}")
        for name in ("capability_id", "tool_server", "tool_name"):
            if decision.get(name) != receipt.get(name):
                problems.append(f"{label}: the decision is bound to another call ({name})")
        bound = (decision.get("action") or {}).get("parameter_hash")
        if bound != (receipt.get("action") or {}).get("parameter_hash"):
            problems.append(f"{label}: the decision is bound to other arguments")
        request_id = str(said.get("request_receipt_id", ""))
        request = requests.get(approval_id)
        if request is None or request.request_receipt_id != request_id:
            problems.append(f"{label}: its request (receipt {request_id}) is not in the run")
        found[approval_id] = ApprovalFinding(
            approval_id=approval_id,
            activity_id=step.activity_id,
            request_receipt_id=request_id,
            outcome=outcome,
            approver=approver,
            reason=str(said.get("reason", "")),
            decision_receipt_id=str(decision.get("id", "")),
            decided_receipt_id=step.receipt_id,
        )
    return sorted(found.values(), key=lambda f: f.approval_id), problems
