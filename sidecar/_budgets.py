"""Budgets on the Chio model: a guard that charges a grant's limits, settlement, refunds.

A kernel-format grant (``ToolGrant``) may carry ``max_invocations``, ``max_cost_per_invocation``
and ``max_total_cost`` (``MonetaryAmount``: ``units`` of a ``currency``'s smallest unit). The
sidecar enforces them as the Chio kernel's mediated route does (chio-kernel 0.1.2
``check_and_increment_budget``, chio-api-protect 0.1.2 ``/v1/evaluate`` and ``/v1/reconcile``):

- **Hold at evaluation.** :class:`BudgetGuard` runs with the other guards, after scope and
  expiry allow. For a grant with a limit it opens a *hold* of one invocation and the worst-case
  cost, ``max_cost_per_invocation`` (0 without one: invocation counting only), in one short
  SQLite transaction (:meth:`SidecarStore.charge_budget`). An exhausted limit is a deny whose
  reason, constraint and evidence name the budget. The hold's id is the kernel's
  ``budget-hold:{request_id}:{capability_id}:{grant_index}``; once the decision is signed the
  hold is keyed by the decision's receipt ids too, and an allow on the mediated route carries
  it in the execution nonce (``reserved_hold_id``), as the kernel's does.
- **Lineage.** A charge on an attenuated capability also counts against the grant of every
  ancestor that covers the same call (the kernel's delegation-family accounting): a child never
  spends more than its ancestors have left.
- **Settlement at the realized cost** (:func:`reconcile`, ``POST /v1/reconcile``, the trusted
  tool-server side): the hold closes at ``realized_cost`` and the difference goes back. A
  closed hold, another currency, or a cost over the hold is refused (the kernel clamps an
  over-hold cost to the hold; this sidecar refuses it, so a tool server's error is seen).
- **Refund** (:func:`reverse`, ``POST /v1/budgets/reverse``, used by the
  ``reverse_budget_charge`` activity): the charge of a named receipt is refunded exactly once;
  the refund is a signed Chio receipt of its own in the receipt log. A second refund refunds
  nothing and says so.

Receipts of settlements and refunds sign the decision's ``parameter_hash`` with
``redaction_mode: "redacted"``: they prove which call they close without carrying its
parameters. Nothing here quotes a parameter value.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import chio_receipts_native

from chio_receipts.schemas import ChioWireError, canonical_json, content_hash, parameter_hash, uuid7
from chio_receipts.sidecar import _chio
from chio_receipts.sidecar._chio import ChioRequestError
from chio_receipts.sidecar._guards import CallContext, GuardResult, GuardVerdict
from chio_receipts.sidecar._store import (
    BudgetAccount,
    BudgetCharge,
    BudgetRefusal,
    SidecarStore,
)

__all__ = [
    "BUDGET_FIELDS",
    "BudgetGuard",
    "Lineage",
    "ReversalAnswer",
    "ReversalRefused",
    "hold_of",
    "reconcile",
    "remaining_over",
    "reverse",
]

BUDGET_FIELDS: Final = ("max_invocations", "max_cost_per_invocation", "max_total_cost")
"""The grant fields that make a budget."""

Lineage = Callable[[str], Sequence[tuple[str, Mapping[str, Any] | None]]]
"""``capability_id -> [(id, kernel token or None), ...]``: the capability's ancestors, nearest
first, each with its kernel-format token when it has one."""


def _has_budget(grant: Mapping[str, Any] | None) -> bool:
    return grant is not None and any(grant.get(f) is not None for f in BUDGET_FIELDS)


def _units(amount: object) -> int | None:
    if isinstance(amount, Mapping) and isinstance(amount.get("units"), int):
        return int(amount["units"])
    return None


def _currency(grant: Mapping[str, Any]) -> str:
    for field in ("max_cost_per_invocation", "max_total_cost"):
        amount = grant.get(field)
        if isinstance(amount, Mapping) and isinstance(amount.get("currency"), str):
            return str(amount["currency"])
    return ""


def _account(capability_id: str, index: int, grant: Mapping[str, Any]) -> BudgetAccount:
    cap = grant.get("max_invocations")
    return BudgetAccount(
        capability_id=capability_id,
        grant_index=index,
        max_invocations=int(cap) if isinstance(cap, int) else None,
        max_total_units=_units(grant.get("max_total_cost")),
    )


def _refusal_reason(refusal: BudgetRefusal, capability_id: str, currency: str) -> str:
    whose = (
        f"capability {refusal.capability_id}"
        if refusal.capability_id == capability_id
        else f"ancestor capability {refusal.capability_id}"
    )
    if refusal.constraint == "request_id":
        return "request_id already backs a budget hold; choose a fresh request_id"
    if refusal.constraint == "max_invocations":
        return (
            f"invocation budget exhausted for {whose}: grant {refusal.grant_index} "
            f"max_invocations {refusal.limit} reached"
        )
    left = max(refusal.limit - refusal.used, 0)
    unit = f" {currency}" if currency else ""
    return (
        f"cost budget exhausted for {whose}: grant {refusal.grant_index} max_total_cost "
        f"{refusal.limit}{unit} has {left} left, the call holds {refusal.requested}"
    )


class BudgetGuard:
    """The guard that charges budgets (name ``"budget"``; put it last, after the guards that
    may deny, so a hold is only opened for a call the others allow).

    ``store`` keeps the usage and the holds; ``lineage`` gives a capability's ancestors (the
    sidecar's :meth:`~chio_receipts.sidecar.LocalSidecar.lineage`), so charges count against
    them too. The sidecar calls :meth:`finish` once the decision is signed: the hold is then
    keyed by the receipt, or released when the decision did not end in an allow.
    """

    name = "budget"

    def __init__(self, store: SidecarStore, lineage: Lineage | None = None) -> None:
        self._store = store
        self._lineage = lineage

    def __repr__(self) -> str:
        return f"BudgetGuard(store={self._store!r})"

    def _accounts(
        self, call: CallContext
    ) -> tuple[list[BudgetAccount], int, str, tuple[str, int] | None]:
        """The accounts the call is charged against, the hold's units and currency, and the
        call's own (capability, grant) when it has a budget."""
        accounts: list[BudgetAccount] = []
        costs: list[int] = []
        currency = ""
        own: tuple[str, int] | None = None
        grant = call.grant
        if _has_budget(grant) and grant is not None and call.grant_index is not None:
            own = (call.capability_id, call.grant_index)
            accounts.append(_account(call.capability_id, call.grant_index, grant))
            if (per := _units(grant.get("max_cost_per_invocation"))) is not None:
                costs.append(per)
            currency = _currency(grant)
        if self._lineage is not None:
            for ancestor_id, token in self._lineage(call.capability_id):
                if token is None:
                    continue
                scope = token.get("scope") or {}
                index = _chio.grant_for(scope, call.tool_server, call.tool)
                if index is None:
                    continue
                anc = scope["grants"][index]
                if not _has_budget(anc):
                    continue
                accounts.append(_account(ancestor_id, index, anc))
                if (per := _units(anc.get("max_cost_per_invocation"))) is not None:
                    costs.append(per)
                currency = currency or _currency(anc)
        # The hold is the worst case the nearest budget allows per call (the kernel's debit).
        units = costs[0] if costs else 0
        return accounts, units, currency, own

    def check(self, call: CallContext) -> GuardResult:
        """Open a hold on every budget the call counts against, or deny naming the first
        budget without room."""
        accounts, units, currency, own = self._accounts(call)
        if not accounts:
            return GuardResult(guard=self.name, verdict=GuardVerdict.ALLOW)
        grant_index = own[1] if own is not None else (call.grant_index or 0)
        request_id = call.request_id or uuid7()
        hold_id = f"budget-hold:{request_id}:{call.capability_id}:{grant_index}"
        try:
            p_hash = parameter_hash(call.parameters)
        except ChioWireError:
            p_hash = ""
        temporal = call.temporal or {}
        charge = BudgetCharge(
            hold_id=hold_id,
            capability_id=call.capability_id,
            grant_index=grant_index,
            accounts=tuple((a.capability_id, a.grant_index) for a in accounts),
            units=units,
            currency=currency,
            tool_server=call.tool_server,
            tool_name=call.tool,
            parameter_hash=p_hash,
            workflow_id=str(temporal.get("workflow_id", "")),
            run_id=str(temporal.get("run_id", "")),
            request_id=call.request_id,
        )
        refusal = self._store.charge_budget(charge, accounts)
        if refusal is not None:
            return GuardResult(
                guard=self.name,
                verdict=GuardVerdict.DENY,
                reason=_refusal_reason(refusal, call.capability_id, currency),
                constraint=refusal.constraint,
                details={
                    "capability_id": refusal.capability_id,
                    "grant_index": refusal.grant_index,
                    "limit": refusal.limit,
                    "used": refusal.used,
                    "requested": refusal.requested,
                },
            )
        details: dict[str, Any] = {"hold_id": hold_id, "exposure_units": units}
        if currency:
            details["currency"] = currency
        return GuardResult(guard=self.name, verdict=GuardVerdict.ALLOW, details=details)

    def finish(
        self, result: GuardResult, *, allowed: bool, receipt_id: str, chio_receipt_id: str
    ) -> None:
        """Key the hold ``result`` opened by the signed decision, or release it if the
        decision was not an allow."""
        hold_id = hold_of((result,))
        if hold_id is None:
            return
        if allowed:
            self._store.bind_budget_charge(hold_id, receipt_id, chio_receipt_id)
        else:
            self._store.release_budget_charge(hold_id)


def hold_of(evidence: Sequence[GuardResult]) -> str | None:
    """The budget hold an allowed decision opened (from its guard results), if any."""
    for result in evidence:
        if result.guard == BudgetGuard.name and result.allowed:
            hold = result.details.get("hold_id")
            if isinstance(hold, str):
                return hold
    return None


# -- settlement and refunds ----------------------------------------------------------------------


class _Signer(Protocol):
    """What settlement and refunds need of the sidecar (``LocalSidecar`` has it)."""

    @property
    def store(self) -> SidecarStore: ...

    @property
    def policy_hash(self) -> str: ...

    def trusted_keys(self) -> set[str]: ...

    def sign_chio_receipt(self, body: dict[str, Any]) -> dict[str, Any]: ...


def _rejected(message: str) -> ChioRequestError:
    return ChioRequestError(400, "chio_reconcile_rejected", message)


def _closing_body(
    charge: BudgetCharge,
    *,
    receipt_kind: str,
    terminal: Mapping[str, Any],
    policy_hash: str,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The receipt body that closes a charge: the decision's call, by parameter hash only."""
    budget_authority: dict[str, Any] = {
        "hold_id": charge.hold_id,
        "authorize": {"event_id": f"{charge.hold_id}:authorize", "exposure_units": charge.units},
        "terminal": dict(terminal),
    }
    metadata: dict[str, Any] = {
        "receipt_context": {"request_id": f"{charge.hold_id}:{terminal['disposition']}"},
        "budget_authority": budget_authority,
        **extra,
    }
    body: dict[str, Any] = {
        "timestamp": int(time.time()),
        "capability_id": charge.capability_id,
        "tool_server": charge.tool_server,
        "tool_name": charge.tool_name,
        "action": {"parameters": {}, "parameter_hash": charge.parameter_hash},
        "receipt_kind": receipt_kind,
        "boundary_class": "prevent" if receipt_kind == "mediated_decision" else "detect_only",
        "tool_origin": "caller_executed",
        "redaction_mode": "redacted",
        "content_hash": content_hash(),
        "policy_hash": policy_hash,
        "metadata": metadata,
        "trust_level": "mediated" if receipt_kind == "mediated_decision" else "verified",
    }
    if receipt_kind == "mediated_decision":
        body["decision"] = {"verdict": "allow"}
    else:
        body["observation_outcome"] = "observed"
    return body


def _verify_nonce(
    signer: _Signer, signed: Mapping[str, Any], arguments: object
) -> Mapping[str, Any]:
    """The presented execution nonce, checked as the kernel's reconcile checks it (binding to
    the arguments, a reserved hold, signature by this sidecar, expiry); raises otherwise."""
    nonce = signed.get("nonce")
    signature = signed.get("signature")
    if not isinstance(nonce, Mapping) or not isinstance(signature, str):
        raise _rejected("execution_nonce must be {nonce, signature}")
    bound = nonce.get("bound_to")
    if not isinstance(bound, Mapping):
        raise _rejected("execution_nonce.nonce.bound_to is missing")
    try:
        presented = parameter_hash(arguments)
    except ChioWireError:
        raise _rejected("arguments have no canonical JSON form") from None
    if presented != bound.get("parameter_hash"):
        raise _rejected("reconcile-by-nonce arguments do not match the nonce parameter binding")
    if not isinstance(nonce.get("reserved_hold_id"), str):
        raise _rejected(
            "presented nonce does not name a reserved budget hold; nothing to reconcile"
        )
    try:
        message = canonical_json(dict(nonce))
        sig = bytes.fromhex(signature)
    except (ChioWireError, ValueError):
        raise _rejected("reconcile-by-nonce rejected the nonce: malformed") from None
    for key in signer.trusted_keys():
        with contextlib.suppress(ValueError):
            if chio_receipts_native.verify(bytes.fromhex(key), message, sig):
                break
    else:
        raise _rejected("reconcile-by-nonce rejected the nonce: signature did not verify")
    expires = nonce.get("expires_at")
    if not isinstance(expires, int) or expires < int(time.time()):
        raise _rejected("reconcile-by-nonce rejected the nonce: expired")
    return nonce


def reconcile(
    signer: _Signer,
    *,
    realized_units: int,
    currency: str,
    execution_nonce: Mapping[str, Any] | None = None,
    arguments: object = None,
    receipt_id: str | None = None,
) -> dict[str, Any]:
    """Settle a hold at its realized cost and return the signed settlement receipt.

    The hold is named by the kernel's ``execution_nonce`` (with the exact ``arguments`` it
    authorized) or, for a decision on the project's route, by the decision's ``receipt_id``.
    Raises :class:`ChioRequestError` 400 ``chio_reconcile_rejected`` (unknown or closed hold,
    another currency, a cost over the hold, a nonce that does not check) and settles nothing.
    """
    store = signer.store
    if execution_nonce is not None:
        nonce = _verify_nonce(signer, execution_nonce, arguments)
        charge = store.budget_charge(str(nonce["reserved_hold_id"]))
        bound = nonce["bound_to"]
        if charge is not None and charge.capability_id != bound.get("capability_id"):
            raise _rejected("the budget hold's capability does not match the nonce binding")
        nonce_id = nonce.get("nonce_id")
    else:
        charge = store.budget_charge(receipt_id or "")
        nonce_id = None
    if charge is None:
        raise _rejected("no reserved budget hold for this reconcile")
    if charge.units > 0 and currency != charge.currency:
        raise _rejected(
            f"realized currency {currency!r} does not match the reserved grant currency "
            f"{charge.currency!r}"
        )
    settled = store.settle_budget_charge(charge.hold_id, realized_units)
    if settled.refusal or settled.charge is None:
        raise _rejected(settled.refusal or "the hold could not be settled")
    done = settled.charge
    terminal = {
        "disposition": "reconciled",
        "event_id": f"{done.hold_id}:reconcile",
        "exposure_units": done.units,
        "realized_spend_units": realized_units,
        "committed_cost_units_after": settled.committed_after,
    }
    extra: dict[str, Any] = {
        "financial": {
            "grant_index": done.grant_index,
            "cost_charged": realized_units,
            "currency": done.currency,
        }
    }
    body = _closing_body(
        done,
        receipt_kind="mediated_decision",
        terminal=terminal,
        policy_hash=signer.policy_hash,
        extra=extra,
    )
    if isinstance(nonce_id, str):
        body["metadata"]["budget_authority"]["execution_nonce_id"] = nonce_id
    receipt = signer.sign_chio_receipt(body)
    store.close_budget_charge(done.hold_id, str(receipt["id"]))
    return receipt


@dataclass(frozen=True, slots=True, kw_only=True)
class ReversalAnswer:
    """What a refund did: ``refunded`` False when the charge had been refunded before."""

    refunded: bool
    charge: BudgetCharge
    refunded_units: int
    receipt: dict[str, Any] | None
    refund_receipt_id: str


class ReversalRefused(Exception):
    """A refund that cannot be made: ``status`` 404 (no such charge) or 403 (another run)."""

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason


def reverse(
    signer: _Signer,
    receipt_id: str,
    *,
    run: tuple[str, str] | None = None,
    reversed_by: str = "",
) -> ReversalAnswer:
    """Refund the charge of the decision ``receipt_id`` exactly once (see module doc).

    ``run`` (workflow id, run id) restricts the refund to a charge made for that run (what a
    worker credential may refund); ``reversed_by`` is the credential's name, recorded in the
    refund receipt. Raises :class:`ReversalRefused`.
    """
    store = signer.store
    done = store.reverse_budget_charge(receipt_id, run=run)
    if done.charge is None:
        status, error = (403, "other_run") if "another run" in done.refusal else (404, "no_charge")
        raise ReversalRefused(status, error, done.refusal)
    charge = done.charge
    if not done.refunded:
        return ReversalAnswer(
            refunded=False,
            charge=charge,
            refunded_units=0,
            receipt=None,
            refund_receipt_id=charge.closing_receipt_id,
        )
    terminal = {
        "disposition": "reversed",
        "event_id": f"{charge.hold_id}:reverse",
        "exposure_units": charge.units,
        "realized_spend_units": 0,
        "reversed_units": done.refunded_units,
        "reversed_invocations": 1,
        "committed_cost_units_after": done.committed_after,
    }
    extra = {
        "budget_reversal": {
            "decision_receipt_id": charge.receipt_id,
            "decision_chio_id": charge.chio_receipt_id,
            "workflow_id": charge.workflow_id,
            "run_id": charge.run_id,
            "currency": charge.currency,
            "reversed_by": reversed_by,
        }
    }
    body = _closing_body(
        charge,
        receipt_kind="trace_observation",
        terminal=terminal,
        policy_hash=signer.policy_hash,
        extra=extra,
    )
    receipt = signer.sign_chio_receipt(body)
    store.close_budget_charge(charge.hold_id, str(receipt["id"]))
    return ReversalAnswer(
        refunded=True,
        charge=charge,
        refunded_units=done.refunded_units,
        receipt=receipt,
        refund_receipt_id=str(receipt["id"]),
    )


def remaining_over(
    parent_scope: Mapping[str, Any],
    child_scope: Mapping[str, Any],
    usage: Callable[[int], tuple[int, int]],
) -> str | None:
    """Why ``child_scope`` asks for more budget than the parent has left, or None.

    For every child grant, the parent grant that covers it (the first, as the kernel matches)
    bounds ``max_invocations`` by the parent's limit minus its invocations so far and
    ``max_total_cost`` by its limit minus what it has committed (``usage(parent_index)``)."""
    for c_index, child in enumerate(child_scope.get("grants", [])):
        for p_index, parent in enumerate(parent_scope.get("grants", [])):
            if not _chio.scope_is_subset({"grants": [child]}, {"grants": [parent]}):
                continue
            if not _has_budget(parent):
                break
            used_invocations, committed = usage(p_index)
            limit = parent.get("max_invocations")
            mine = child.get("max_invocations")
            if isinstance(limit, int) and isinstance(mine, int) and mine > limit - used_invocations:
                return (
                    f"new_scope grant {c_index} max_invocations {mine} exceeds the parent's "
                    f"remaining {max(limit - used_invocations, 0)}"
                )
            total = _units(parent.get("max_total_cost"))
            asked = _units(child.get("max_total_cost"))
            if total is not None and asked is not None and asked > total - committed:
                return (
                    f"new_scope grant {c_index} max_total_cost {asked} exceeds the parent's "
                    f"remaining {max(total - committed, 0)}"
                )
            break
    return None
