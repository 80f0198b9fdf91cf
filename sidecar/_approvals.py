"""Human approval: a guard's "approval required", held durably until a person decides.

When a guard answers ``APPROVAL_REQUIRED`` the sidecar does not deny: it records an approval
request bound to the call it answers (capability, tool server, tool, the call's parameter hash,
and the Temporal namespace and workflow id; the run id, activity id and the pending receipt's ids
are kept with it) and signs a receipt whose step verdict is ``PENDING_APPROVAL``. The Chio
receipt of that step is what the kernel signs for a held call: a ``deny`` (guard = the guard
that asked) whose ``metadata.approval`` says ``{"approval_id", "state": "approval_required"}``.

A person answers on ``POST /approvals/{id}/respond`` (the approver is the authenticated
credential's name, never a field of the body). The answer is a kernel-format receipt signed by
the sidecar (decision ``allow`` for approved, ``deny`` with guard ``approval`` for denied; the
bound call's capability, tool and parameter hash, the parameters themselves redacted;
``metadata.approval`` names the approval, the approver, the reason and the request's receipts),
appended to the receipt log, and sent to the waiting workflow as a Temporal signal
(:data:`APPROVAL_SIGNAL`) when the sidecar has a :class:`TemporalSignaller`.

The next evaluation of the same call settles the guard's answer:

- approved (and not used yet): the approval is consumed (one guarded UPDATE: used once) and the
  guards after it run; the receipt's evidence has an ``approval`` allow naming the approval and
  the approver, and its ``metadata.approval`` carries the signed decision receipt, so the
  decision travels with the run's steps into the envelope;
- denied: a deny by guard ``approval``, the approver and the reason in its evidence;
- still pending: the same approval id again;
- none, or only used ones: a new request. Other arguments are another call: another approval.

The rows live in the store's ``approvals`` table; this module holds the logic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chio_receipts.schemas import (
    APPROVAL_REQUIRED,
    APPROVAL_SIGNAL,
    ChioWireError,
    now_us,
    parameter_hash,
    uuid7,
)
from chio_receipts.sidecar import _chio
from chio_receipts.sidecar._chio import ChioRequestError
from chio_receipts.sidecar._guards import CallContext, Guard, GuardResult, GuardVerdict
from chio_receipts.sidecar._store import SidecarStore

__all__ = [
    "APPROVAL_GUARD",
    "APPROVAL_SIGNAL",
    "APPROVAL_TTL_SECONDS",
    "Approval",
    "ApprovalBook",
    "Hold",
    "RequireApproval",
    "TemporalSignaller",
]

_log = logging.getLogger(__name__)

APPROVAL_GUARD = "approval"
"""Guard name of the evidence an approval leaves, and of a denial by a person."""

APPROVAL_TTL_SECONDS = 3600
"""How long a request waits (the kernel's ``MAX_APPROVAL_TTL_SECS``); then a new one is made."""

State = Literal["pending", "approved", "denied", "consumed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Approval:
    """One approval request and, once answered, its decision."""

    approval_id: str
    state: State
    capability_id: str
    tool_server: str
    tool: str
    parameter_hash: str
    namespace: str = ""
    workflow_id: str = ""
    run_id: str = ""
    activity_id: str = ""
    activity_type: str = ""
    attempt: int = 0
    guard: str = ""
    reason: str = ""
    constraint: str = ""
    created_at: int = 0
    """Unix seconds."""
    expires_at: int = 0
    request_receipt_id: str = ""
    """The pending step receipt's id (``StepReceipt.receipt_id``)."""
    request_chio_id: str = ""
    """The pending decision's Chio receipt id."""
    approver: str = ""
    decision_reason: str = ""
    resolved_at: int = 0
    decision_receipt: Mapping[str, Any] | None = field(default=None, repr=False)
    consumed_at: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, state: str | None = None) -> Approval:
        data = json.loads(text)
        if state is not None:
            data["state"] = state
        return cls(**data)

    @property
    def outcome(self) -> str | None:
        """``approved`` / ``denied`` once answered (a consumed approval was approved)."""
        if self.state in ("approved", "consumed"):
            return "approved"
        if self.state == "denied":
            return "denied"
        return None

    def request_view(self) -> dict[str, Any]:
        """The kernel's ``ApprovalRequest`` shape, with this sidecar's Temporal binding."""
        return {
            "approval_id": self.approval_id,
            "policy_id": self.guard,
            "subject_id": "",
            "capability_id": self.capability_id,
            "tool_server": self.tool_server,
            "tool_name": self.tool,
            "action": "invoke",
            "parameter_hash": self.parameter_hash,
            "expires_at": self.expires_at,
            "created_at": self.created_at,
            "summary": f"{self.tool_server}/{self.tool}: {self.reason}",
            "triggered_by": [self.guard] if self.guard else [],
            "state": self.state,
            "workflow": {
                "namespace": self.namespace,
                "workflow_id": self.workflow_id,
                "run_id": self.run_id,
                "activity_id": self.activity_id,
                "activity_type": self.activity_type,
                "attempt": self.attempt,
            },
            "request_receipt_id": self.request_receipt_id,
            "request_chio_id": self.request_chio_id,
        }

    def resolution_view(self) -> dict[str, Any] | None:
        """The kernel's ``ResolvedApproval`` shape (``approver_hex`` is the signing key; the
        approver's name is ``approver``), with the signed decision receipt."""
        if self.outcome is None or self.decision_receipt is None:
            return None
        return {
            "approval_id": self.approval_id,
            "outcome": self.outcome,
            "resolved_at": self.resolved_at,
            "approver_hex": str(self.decision_receipt.get("kernel_key", "")),
            "token_id": str(self.decision_receipt.get("id", "")),
            "approver": self.approver,
            "reason": self.decision_reason,
            "receipt": dict(self.decision_receipt),
        }

    def signal_payload(self) -> dict[str, Any]:
        """What :data:`APPROVAL_SIGNAL` carries to the workflow (no call parameters)."""
        return {
            "approval_id": self.approval_id,
            "outcome": self.outcome,
            "approver": self.approver,
            "reason": self.decision_reason,
            "receipt": dict(self.decision_receipt or {}),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Hold:
    """What the approval step of one evaluation decided (carried by the sidecar's decision)."""

    approval_id: str
    state: Literal["approval_required", "approved", "denied"]
    new: Approval | None = None
    """A new request, stored once the pending receipt is signed (:meth:`ApprovalBook.open`)."""
    approval: Approval | None = None
    """The answered approval this evaluation used."""

    def metadata(self) -> dict[str, Any]:
        """The receipt's ``metadata.approval``."""
        out: dict[str, Any] = {"approval_id": self.approval_id, "state": self.state}
        if self.approval is not None:
            out["approver"] = self.approval.approver
            if self.approval.decision_receipt is not None:
                out["decision_receipt"] = dict(self.approval.decision_receipt)
        return out


def binding_of(
    *,
    capability_id: str,
    tool_server: str,
    tool: str,
    parameter_hash: str,
    namespace: str,
    workflow_id: str,
) -> str:
    """SHA-256 hex of the call an approval answers."""
    key = [capability_id, tool_server, tool, parameter_hash, namespace, workflow_id]
    return hashlib.sha256(json.dumps(key, separators=(",", ":")).encode()).hexdigest()


class ApprovalBook:
    """The approvals of one sidecar, on its store. ``sign`` signs a kernel receipt body with
    the sidecar's current key; ``log`` (optional) appends a signed receipt to the receipt log."""

    def __init__(
        self,
        store: SidecarStore,
        sign: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        log: Callable[[dict[str, Any]], None] | None = None,
        ttl_seconds: int = APPROVAL_TTL_SECONDS,
    ) -> None:
        self._store = store
        self._sign = sign
        self._log = log
        self._ttl = ttl_seconds
        self.signaller: TemporalSignaller | None = None
        """Sends answers to their workflows (set it to signal; None: answers are only stored)."""

    async def notify(self, approval: Approval) -> bool:
        """Signal the answered ``approval`` to its workflow; False without a signaller or when
        the signal could not be sent (the answer stands either way)."""
        if self.signaller is None:
            return False
        return await self.signaller.notify(approval)

    # -- evaluation ----------------------------------------------------------------------------

    def run(
        self, guards: Iterable[Guard], call: CallContext
    ) -> tuple[GuardResult | None, tuple[GuardResult, ...], Hold | None]:
        """Run ``guards`` like ``run_guards``, settling the first "approval required" with the
        call's approvals: ``(stopping result or None, evidence, hold)``."""
        ran: list[GuardResult] = []
        hold: Hold | None = None
        for guard in guards:
            result = guard.check(call)
            ran.append(result)
            if result.verdict is GuardVerdict.APPROVAL_REQUIRED and hold is None:
                settled, hold = self._settle(call, result)
                if settled is None:
                    return result, tuple(ran), hold
                ran.append(settled)
                if not settled.allowed:
                    return settled, tuple(ran), hold
                continue
            if not result.allowed:
                return result, tuple(ran), hold
        if hold is not None and hold.state == "approved" and hold.approval is not None:
            used = dataclasses.replace(hold.approval, state="consumed", consumed_at=_now_s())
            if not self._store.move_approval(
                used.approval_id, "approved", "consumed", used.to_json()
            ):
                refused = GuardResult(
                    guard=APPROVAL_GUARD,
                    verdict=GuardVerdict.DENY,
                    reason=f"approval {used.approval_id} was already used",
                    details={"approval_id": used.approval_id},
                )
                return refused, (*ran, refused), None
        return None, tuple(ran), hold

    def _settle(self, call: CallContext, asked: GuardResult) -> tuple[GuardResult | None, Hold]:
        """The approval answer to ``asked``: an allow or deny result, or None (pending)."""
        temporal = call.temporal
        try:
            call_hash = parameter_hash(call.parameters)
        except ChioWireError:
            call_hash = ""
        binding = binding_of(
            capability_id=call.capability_id,
            tool_server=call.tool_server,
            tool=call.tool,
            parameter_hash=call_hash,
            namespace=str(temporal.get("namespace", "")),
            workflow_id=str(temporal.get("workflow_id", "")),
        )
        now = _now_s()
        pending: Approval | None = None
        for approval_id, state, record in reversed(self._store.approvals_for(binding)):
            approval = Approval.from_json(record, state)
            if state == "approved":
                details = _decision_details(approval)
                allow = GuardResult(
                    guard=APPROVAL_GUARD,
                    verdict=GuardVerdict.ALLOW,
                    reason=f"approved by {approval.approver}",
                    details=details,
                )
                return allow, Hold(approval_id=approval_id, state="approved", approval=approval)
            if state == "denied":
                reason = f"approval {approval_id} rejected by {approval.approver}"
                if approval.decision_reason:
                    reason += f": {approval.decision_reason}"
                deny = GuardResult(
                    guard=APPROVAL_GUARD,
                    verdict=GuardVerdict.DENY,
                    reason=reason,
                    details=_decision_details(approval),
                )
                return deny, Hold(approval_id=approval_id, state="denied", approval=approval)
            if state == "pending" and approval.expires_at > now and pending is None:
                pending = approval
        if pending is not None:
            return None, Hold(approval_id=pending.approval_id, state=APPROVAL_REQUIRED)
        approval_id = f"ap-{uuid7()}"
        new = Approval(
            approval_id=approval_id,
            state="pending",
            capability_id=call.capability_id,
            tool_server=call.tool_server,
            tool=call.tool,
            parameter_hash=call_hash,
            namespace=str(temporal.get("namespace", "")),
            workflow_id=str(temporal.get("workflow_id", "")),
            run_id=str(temporal.get("run_id", "")),
            activity_id=str(temporal.get("activity_id", "")),
            activity_type=str(temporal.get("activity_type", "")),
            attempt=int(temporal.get("attempt", 0) or 0),
            guard=asked.guard,
            reason=asked.reason,
            constraint=asked.constraint,
            created_at=now,
            expires_at=now + self._ttl,
        )
        return None, Hold(approval_id=approval_id, state=APPROVAL_REQUIRED, new=new)

    def open(self, hold: Hold, *, request_receipt_id: str, request_chio_id: str) -> None:
        """Store a new request once its pending receipt is signed (before it is returned)."""
        if hold.new is None:
            return
        approval = dataclasses.replace(
            hold.new, request_receipt_id=request_receipt_id, request_chio_id=request_chio_id
        )
        binding = binding_of(
            capability_id=approval.capability_id,
            tool_server=approval.tool_server,
            tool=approval.tool,
            parameter_hash=approval.parameter_hash,
            namespace=approval.namespace,
            workflow_id=approval.workflow_id,
        )
        self._store.put_approval(
            approval.approval_id, binding, approval.created_at * 1_000_000, approval.to_json()
        )

    # -- the routes ------------------------------------------------------------------------------

    def get(self, approval_id: str) -> Approval:
        """The approval with this id (404 ``not_found`` otherwise)."""
        found = self._store.approval(approval_id)
        if found is None:
            raise ChioRequestError(404, "not_found", f"no approval {approval_id}")
        state, record = found
        return Approval.from_json(record, state)

    def pending(
        self,
        *,
        tool_server: str | None = None,
        tool_name: str | None = None,
        workflow_id: str | None = None,
        receipt_id: str | None = None,
        not_expired_at: int | None = None,
        limit: int | None = None,
    ) -> list[Approval]:
        """Pending requests matching every filter given, oldest first."""
        out: list[Approval] = []
        for state, record in self._store.approvals("pending", limit=100_000):
            a = Approval.from_json(record, state)
            if tool_server is not None and a.tool_server != tool_server:
                continue
            if tool_name is not None and a.tool != tool_name:
                continue
            if workflow_id is not None and a.workflow_id != workflow_id:
                continue
            if receipt_id is not None and receipt_id not in (
                a.request_receipt_id,
                a.request_chio_id,
                a.approval_id,
            ):
                continue
            if not_expired_at is not None and a.expires_at <= not_expired_at:
                continue
            out.append(a)
            if limit is not None and len(out) >= limit:
                break
        return out

    def respond(
        self, approval_id: str, *, approved: bool, approver: str, reason: str, policy_hash: str
    ) -> Approval:
        """Answer a pending request: sign the decision receipt, log it, store the answer.

        404 for an unknown id; 409 ``conflict`` when it is already answered or expired."""
        approval = self.get(approval_id)
        if approval.state != "pending":
            raise ChioRequestError(
                409, "conflict", f"already resolved: {approval_id} ({approval.outcome})"
            )
        now = _now_s()
        if approval.expires_at <= now:
            raise ChioRequestError(409, "conflict", f"approval {approval_id} has expired")
        state: State = "approved" if approved else "denied"
        receipt = self._decision_receipt(
            approval,
            approved=approved,
            approver=approver,
            reason=reason,
            at=now,
            policy_hash=policy_hash,
        )
        answered = dataclasses.replace(
            approval,
            state=state,
            approver=approver,
            decision_reason=reason,
            resolved_at=now,
            decision_receipt=receipt,
        )
        if not self._store.move_approval(approval_id, "pending", state, answered.to_json()):
            raise ChioRequestError(409, "conflict", f"already resolved: {approval_id}")
        if self._log is not None:
            self._log(receipt)  # only an answer that was stored is logged
        return answered

    def _decision_receipt(
        self,
        approval: Approval,
        *,
        approved: bool,
        approver: str,
        reason: str,
        at: int,
        policy_hash: str,
    ) -> dict[str, Any]:
        """The signed decision: a kernel-format receipt on the bound call, parameters redacted
        (only their hash, which the request bound), ``metadata.approval`` naming who decided."""
        why = f"approval {approval.approval_id} rejected by {approver}"
        if reason:
            why += f": {reason}"
        details = {
            "outcome": "approved" if approved else "denied",
            "approval_id": approval.approval_id,
            "approver": approver,
        }
        if reason:
            details["reason"] = reason
        body = _chio.receipt_body(
            timestamp=at,
            token=None,
            capability_id=approval.capability_id,
            tool_server=approval.tool_server,
            tool_name=approval.tool,
            parameters={},
            request_id=f"approval:{approval.approval_id}",
            allowed=approved,
            reason=why,
            guard=APPROVAL_GUARD,
            grant_index=None,
            redact=True,
            evidence=[
                {
                    "guard_name": APPROVAL_GUARD,
                    "verdict": approved,
                    "details": json.dumps(details, sort_keys=True, separators=(",", ":")),
                }
            ],
            policy_hash=policy_hash,
        )
        body["action"]["parameter_hash"] = approval.parameter_hash
        body["metadata"]["approval"] = {
            "approval_id": approval.approval_id,
            "state": "approved" if approved else "denied",
            "approver": approver,
            "reason": reason,
            "request_receipt_id": approval.request_receipt_id,
            "request_chio_id": approval.request_chio_id,
            "workflow": {
                "namespace": approval.namespace,
                "workflow_id": approval.workflow_id,
                "run_id": approval.run_id,
                "activity_id": approval.activity_id,
                "activity_type": approval.activity_type,
            },
        }
        return self._sign(body)


def _decision_details(approval: Approval) -> dict[str, Any]:
    details: dict[str, Any] = {
        "approval_id": approval.approval_id,
        "approver": approval.approver,
        "outcome": approval.outcome,
    }
    if approval.decision_reason:
        details["approval_reason"] = approval.decision_reason
    if approval.decision_receipt is not None:
        details["decision_receipt_id"] = str(approval.decision_receipt.get("id", ""))
    return details


def _now_s() -> int:
    return now_us() // 1_000_000


@dataclass(frozen=True, slots=True)
class RequireApproval:
    """A guard that asks for a person's approval for some tools (``tools``; every tool when
    empty). A stand-in for a policy or constraint that answers "approval required"."""

    tools: frozenset[str] = frozenset()
    name: str = "require_approval"

    def check(self, call: CallContext) -> GuardResult:
        if self.tools and call.tool not in self.tools:
            return GuardResult(guard=self.name, verdict=GuardVerdict.ALLOW)
        return GuardResult(
            guard=self.name,
            verdict=GuardVerdict.APPROVAL_REQUIRED,
            reason=f"tool {call.tool!r} needs a person's approval",
            constraint="require_approval",
        )


class TemporalSignaller:
    """Sends an answered approval to its workflow as the :data:`APPROVAL_SIGNAL` signal.

    ``connect`` returns a ``temporalio.client.Client`` (made on first use). A failure is logged
    and reported as False: the answer is stored and signed either way, and ``chio-receipts
    approve|reject`` can send the signal again."""

    def __init__(self, connect: Callable[[], Any], *, timeout: float = 5.0) -> None:
        self._connect = connect
        self._client: Any = None
        self._timeout = timeout

    async def notify(self, approval: Approval) -> bool:
        if not approval.workflow_id:
            return False
        try:
            async with asyncio.timeout(self._timeout):  # the answer is not held up by Temporal
                if self._client is None:
                    self._client = await self._connect()
                handle = self._client.get_workflow_handle(
                    approval.workflow_id, run_id=approval.run_id or None
                )
                await handle.signal(APPROVAL_SIGNAL, approval.signal_payload())
        except Exception as exc:  # noqa: BLE001 - the answer stands; the signal can be re-sent
            _log.warning(
                "approval %s: signalling workflow %s failed (%s)",
                approval.approval_id,
                approval.workflow_id,
                type(exc).__name__,
            )
            return False
        return True
