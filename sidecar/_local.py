"""An in-process policy sidecar: capabilities, attenuation, expiry, revocation, signing.

Evaluation is a pure check (capability known, not revoked, not expired along its chain, tool in
scope) on in-memory state, followed by one Ed25519 signature. State is written through to a
:class:`~chio_receipts.sidecar._store.SidecarStore` (SQLite; ``:memory:`` unless one is given)
in short transactions before an answer is returned, and read back when the sidecar starts, so a
sidecar on the same store keeps its capabilities and revocations across restarts. State is
bounded: expired capabilities are dropped after a grace period.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, overload

from chio_receipts.schemas import (
    CapabilityToken,
    ChioWireError,
    EvaluationRequest,
    KeyPair,
    ProtocolError,
    SignedReceipt,
    StepOutcome,
    Verdict,
    is_subset,
    normalize_scope,
    now_us,
    parameter_hash,
    request_id_for,
    sign_capability_token,
    sign_chio_outcome,
    sign_delegation_link,
    sign_kernel_receipt,
    uuid7,
    verify_capability_token,
)
from chio_receipts.schemas._chio_wire import sign_kernel_receipt_text
from chio_receipts.schemas._signing import seal_receipt
from chio_receipts.sidecar import _budgets, _chio
from chio_receipts.sidecar._approvals import ApprovalBook, Hold
from chio_receipts.sidecar._chio import ChioRequestError
from chio_receipts.sidecar._datadir import key_id_for
from chio_receipts.sidecar._errors import InvalidCapability, ScopeWidening, UnknownCapability
from chio_receipts.sidecar._guards import (
    CallContext,
    Guard,
    GuardResult,
    GuardVerdict,
    evidence_json,
)
from chio_receipts.sidecar._store import ChioTokenRow, SidecarStore

__all__ = ["ChioDecision", "LocalSidecar"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChioDecision:
    """A decision on a Chio kernel route: the signed kernel-format receipt and what it says."""

    allowed: bool
    receipt: dict[str, Any]
    reason: str
    guard: str
    execution_nonce: dict[str, Any] | None = None
    approval_id: str | None = None
    """Set when the call waits for a person's approval (the receipt is then a deny)."""

    @property
    def revoked(self) -> bool:
        """True when the capability or one of its ancestors was revoked."""
        return self.guard == "revocation"


@dataclass(frozen=True, slots=True, kw_only=True)
class _Decision:
    """One policy decision, before anything is signed: what both evaluation routes share."""

    verdict: Verdict
    reason: str
    guard: str
    capability_id: str
    token: CapabilityToken | None = None
    kernel: Mapping[str, Any] | None = None
    grant_index: int | None = None
    evidence: tuple[GuardResult, ...] = ()
    """The results of the guards that ran (the receipt's ``evidence``)."""
    approval: GuardResult | None = None
    """The guard result that asked for a person's approval (verdict PENDING_APPROVAL)."""
    hold: Hold | None = None
    """What the approval step decided: a request (new or still pending), or an answer used."""


_MAX_TTL_SECONDS = 366 * 24 * 3600


class LocalSidecar:
    """The policy sidecar, in-process.

    It has the methods of the worker's ``chio_receipts.interceptor.Evaluator`` protocol, so a
    worker can use it in place of a remote sidecar (it satisfies the protocol structurally; this
    package does not import the interceptor).

    ``key`` signs receipts (a fresh key, its id derived from its public key, when omitted);
    ``retired_keys`` are public keys of earlier keys still exported for verification.
    ``store`` holds the state (capabilities, revocations, public keys, and the receipt log);
    without one, an in-memory store that keeps no receipt log (it would only grow).
    ``max_capabilities`` bounds memory: beyond it, expired capabilities older than
    ``expired_grace_seconds`` are dropped, and then creation is refused.
    ``guards`` run in order on every call that scope and expiry allow (see ``_guards``);
    ``policy_hash`` names the policy they enforce in every receipt (:meth:`use_guards` swaps
    both at once, for a reload). Budgets of kernel-format grants (``max_invocations``,
    ``max_cost_per_invocation``, ``max_total_cost``) are charged after the guards by a
    built-in :class:`~chio_receipts.sidecar._budgets.BudgetGuard`, in the store.
    """

    def __init__(
        self,
        key: KeyPair | None = None,
        *,
        store: SidecarStore | None = None,
        retired_keys: Mapping[str, bytes] | None = None,
        max_capabilities: int = 100_000,
        expired_grace_seconds: float = 3600.0,
        guards: Sequence[Guard] = (),
        policy_hash: str = _chio.POLICY_HASH,
    ) -> None:
        # One tuple, swapped whole: a request in flight keeps the set it started with.
        self._policy: tuple[tuple[Guard, ...], str] = (tuple(guards), policy_hash)
        self._log_receipts = store is not None
        self._store = store if store is not None else SidecarStore.memory()
        self._retired = dict(retired_keys or {})
        self._caps: dict[str, CapabilityToken] = {c.id: c for c in self._store.capabilities()}
        # Kernel-format tokens, raw as signed; the row keeps the requested subject and job uid.
        self._chio_rows: dict[str, ChioTokenRow] = self._store.chio_tokens()
        self._chio: dict[str, dict[str, Any]] = {
            cap_id: json.loads(row.token) for cap_id, row in self._chio_rows.items()
        }
        self._revoked: set[str] = self._store.revocations()
        self._max = max_capabilities
        self._grace_us = int(expired_grace_seconds * 1_000_000)
        self._key = key or _fresh_key()
        self.use_key(self._key)
        self._approvals = ApprovalBook(
            self._store,
            lambda body: sign_kernel_receipt(body, self._key),
            log=self._log_chio if self._log_receipts else None,
        )
        self._budget = _budgets.BudgetGuard(self._store, self.lineage)

    @property
    def approvals(self) -> ApprovalBook:
        """The approval requests and their answers (see ``_approvals``)."""
        return self._approvals

    def _log_chio(self, receipt: Mapping[str, Any]) -> None:
        text = json.dumps(receipt, separators=(",", ":"), ensure_ascii=False)
        self._store.log_receipt(str(receipt["id"]), self._key.key_id, text.encode(), fmt="chio")

    def __repr__(self) -> str:
        return f"LocalSidecar(key_id={self._key.key_id!r}, capabilities={len(self._caps)})"

    @property
    def key_id(self) -> str:
        """Id of the signing key."""
        return self._key.key_id

    @property
    def store(self) -> SidecarStore:
        """Where the state is kept."""
        return self._store

    def use_key(self, key: KeyPair) -> None:
        """Sign from now on with ``key``; earlier keys stay published as retired keys."""
        self._store.add_key(key.key_id, key.public_key)
        self._store.retire_keys(except_key_id=key.key_id)
        self._key = key

    @property
    def policy_hash(self) -> str:
        """``policy_hash`` of the receipts signed now: the active policy set."""
        return self._policy[1]

    @property
    def guards(self) -> tuple[Guard, ...]:
        """The active guards, in the order they run."""
        return self._policy[0]

    def use_guards(self, guards: Sequence[Guard], policy_hash: str) -> None:
        """Replace the guards and the policy hash at once (a policy reload)."""
        self._policy = (tuple(guards), policy_hash)

    # -- capabilities ------------------------------------------------------------------------

    def mint(
        self,
        subject: str,
        scope: Iterable[str],
        ttl_seconds: float,
        *,
        parent_id: str | None = None,
        chio_subject: tuple[str, str] | None = None,
        chio_scope: Mapping[str, Any] | None = None,
    ) -> CapabilityToken:
        """Synchronous :meth:`create_capability` (pure, no I/O).

        With ``chio_scope`` (a kernel ``ChioScope`` in normal form) and ``chio_subject``
        (requested subject, job uid) the capability also gets a signed kernel-format token,
        stored with it (see :meth:`chio_token`).
        """
        if not isinstance(subject, str) or not subject:
            raise InvalidCapability("a capability needs a non-empty subject")
        try:
            norm = normalize_scope(scope)
        except ProtocolError as exc:
            raise InvalidCapability(str(exc)) from exc
        if not norm:
            raise InvalidCapability("a capability needs at least one tool in its scope")
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int | float)
            or not math.isfinite(ttl_seconds)
            or not 0 < ttl_seconds <= _MAX_TTL_SECONDS
        ):
            raise InvalidCapability(
                f"ttl_seconds must be in (0, {_MAX_TTL_SECONDS}], got {ttl_seconds!r}"
            )
        now = now_us()
        expires = now + int(ttl_seconds * 1_000_000)
        chain: tuple[str, ...] = ()
        if parent_id is not None:
            parent = self._get(parent_id)
            if not is_subset(norm, parent.scope):
                wider = sorted(set(norm) - set(parent.scope))
                raise ScopeWidening(
                    f"attenuation of {parent_id} asks for tools outside its scope: {wider}"
                )
            expires = min(expires, parent.expires_at)
            chain = (*parent.chain, parent.id)
            if subject != parent.subject:
                raise InvalidCapability("an attenuated capability keeps its parent's subject")
        self._make_room(now)
        token = CapabilityToken(
            id=f"cap-{uuid7()}",
            subject=subject,
            scope=norm,
            issued_at=now,
            expires_at=expires,
            parent_id=parent_id,
            chain=chain,
            issuer_key_id=self._key.key_id,
        )
        row = None
        signed = None
        if chio_scope is not None and chio_subject is not None:
            signed = self._sign_chio_token(token, chio_scope, chio_subject)
            row = ChioTokenRow(
                token=json.dumps(signed, separators=(",", ":"), ensure_ascii=False),
                requested_subject=chio_subject[0],
                job_uid=chio_subject[1],
            )
        self._store.put_capability(token, chio_token=row)
        self._caps[token.id] = token
        if signed is not None and row is not None:
            self._chio[token.id] = signed
            self._chio_rows[token.id] = row
        return token

    def _sign_chio_token(
        self,
        token: CapabilityToken,
        scope: Mapping[str, Any],
        subject: tuple[str, str],
    ) -> dict[str, Any]:
        holder = _chio.derive_subject_key(*subject)
        holder_hex = bytes(holder.verify_key).hex()
        body: dict[str, Any] = {
            "id": token.id,
            "subject": holder_hex,
            "scope": dict(scope),
            "issued_at": token.issued_at // 1_000_000,
            "expires_at": token.expires_at // 1_000_000,
        }
        if token.parent_id is not None:
            parent = self._chio.get(token.parent_id)
            if parent is None:
                raise InvalidCapability(f"capability {token.parent_id} has no Chio token")
            # The holder delegates to itself with a narrower scope: the link is signed by the
            # subject key the kernel derives, so the chain verifies like a kernel delegation.
            link = sign_delegation_link(
                {
                    "capability_id": parent["id"],
                    "delegatee": holder_hex,
                    "timestamp": body["issued_at"],
                    "attenuations": _chio.attenuations(parent["scope"], scope),
                },
                holder,
            )
            body["delegation_chain"] = [*parent.get("delegation_chain", []), link]
        try:
            return sign_capability_token(body, self._key)
        except ChioWireError as exc:
            raise ChioRequestError(400, "chio_bad_request", f"invalid scope: {exc}") from exc

    def _make_room(self, now: int) -> None:
        if len(self._caps) < self._max:
            return
        cutoff = now - self._grace_us
        dropped = [c.id for c in self._caps.values() if c.expires_at < cutoff]
        if dropped:
            self._store.drop_capabilities(dropped)
        for cap_id in dropped:
            del self._caps[cap_id]
            self._revoked.discard(cap_id)
            self._chio.pop(cap_id, None)
            self._chio_rows.pop(cap_id, None)
        if len(self._caps) >= self._max:
            raise InvalidCapability(
                f"the sidecar holds {self._max} live capabilities; raise max_capabilities"
            )

    def _get(self, capability_id: str) -> CapabilityToken:
        token = self._caps.get(capability_id)
        if token is None:
            raise UnknownCapability(f"no capability {capability_id!r}")
        return token

    def derive(
        self, capability_id: str, *, scope: Iterable[str], ttl_seconds: float | None = None
    ) -> CapabilityToken:
        """Synchronous :meth:`attenuate`."""
        parent = self._get(capability_id)
        if self._revoked_in_chain(parent):
            raise InvalidCapability(f"capability {capability_id} is revoked")
        if ttl_seconds is None:
            ttl_seconds = max((parent.expires_at - now_us()) / 1_000_000, 1e-6)
        return self.mint(parent.subject, scope, ttl_seconds, parent_id=capability_id)

    def revoke_now(self, capability_id: str) -> None:
        """Synchronous :meth:`revoke`."""
        self._get(capability_id)
        self._store.revoke(capability_id)
        self._revoked.add(capability_id)

    async def create_capability(
        self,
        subject: str,
        scope: Iterable[str],
        ttl_seconds: float,
        *,
        parent_id: str | None = None,
    ) -> CapabilityToken:
        """Mint a capability (:class:`InvalidCapability` when the request is refused)."""
        return self.mint(subject, scope, ttl_seconds, parent_id=parent_id)

    async def attenuate(
        self,
        capability_id: str,
        *,
        scope: Iterable[str],
        ttl_seconds: float | None = None,
    ) -> CapabilityToken:
        """Mint a narrower child; a wider or disjoint scope raises :class:`ScopeWidening`."""
        return self.derive(capability_id, scope=scope, ttl_seconds=ttl_seconds)

    async def get_capability(self, capability_id: str) -> CapabilityToken:
        """The capability with this id (:class:`UnknownCapability` otherwise)."""
        return self._get(capability_id)

    async def revoke(self, capability_id: str) -> None:
        """Revoke a capability; its descendants are denied through their chain."""
        self.revoke_now(capability_id)

    async def public_keys(self) -> Mapping[str, bytes]:
        """Public keys by key id (the current key and retired ones)."""
        return MappingProxyType({**self._retired, **self._store.public_keys()})

    # -- evaluation --------------------------------------------------------------------------

    def _revoked_in_chain(self, token: CapabilityToken) -> bool:
        revoked = self._revoked
        return bool(revoked) and (token.id in revoked or not revoked.isdisjoint(token.chain))

    def decide(
        self, request: EvaluationRequest, at_us: int
    ) -> tuple[Verdict, str, CapabilityToken | None]:
        """The policy decision alone (pure): verdict, reason, and the capability if known."""
        verdict, reason, token, _ = self._decide(request, at_us)
        return verdict, reason, token

    def _decide(
        self, request: EvaluationRequest, at_us: int
    ) -> tuple[Verdict, str, CapabilityToken | None, str]:
        # The fourth value names the check that denied (the "guard" of a kernel receipt).
        token = self._caps.get(request.capability_id) if request.capability_id else None
        if request.deny_reason is not None:
            return Verdict.DENY, request.deny_reason, token, "caller"
        if not request.capability_id:
            return Verdict.DENY, "no capability presented", None, "capability"
        if token is None:
            return Verdict.DENY, f"unknown capability {request.capability_id}", None, "capability"
        if self._revoked_in_chain(token):
            return Verdict.DENY, f"capability {token.id} is revoked", token, "revocation"
        if token.expired(at_us):
            return Verdict.DENY, f"capability {token.id} expired", token, "expiry"
        for ancestor_id in token.chain:
            ancestor = self._caps.get(ancestor_id)
            if ancestor is None or ancestor.expired(at_us):
                reason = f"parent capability {ancestor_id} expired or unknown"
                return Verdict.DENY, reason, token, "expiry"
        if not token.allows(request.tool):
            return (
                Verdict.DENY,
                f"tool {request.tool!r} is not in the scope of capability {token.id}",
                token,
                "scope",
            )
        reason = f"tool {request.tool!r} allowed by capability {token.id}"
        return Verdict.ALLOW, reason, token, ""

    def _decide_call(
        self,
        *,
        capability_id: str,
        tool_server: str,
        tool: str,
        at_us: int,
        presented: Mapping[str, Any] | None = None,
        deny_reason: str | None = None,
        parameters: object = None,
        temporal: Mapping[str, Any] | None = None,
        request_id: str = "",
        guards: Sequence[Guard] = (),
    ) -> _Decision:
        """The one decision of both evaluation routes: a presented kernel token's checks (the
        mediated route), the policy (:meth:`_decide`), the kernel-format grant's server, then
        the guards (``guards``, in order) on the call's parameters and Temporal context."""
        kernel: Mapping[str, Any] | None
        if presented is not None:
            token = _chio.kernel_spelling(presented)
            capability_id = str(token.get("id", ""))
            stored = self._chio.get(capability_id)
            refusal = None
            if str(token.get("issuer", "")).lower() not in self.trusted_keys():
                refusal = "capability issuer is not trusted"
            elif not verify_capability_token(token).valid:
                refusal = "capability signature did not verify"
            elif stored is None or stored.get("signature") != token.get("signature"):
                refusal = f"unknown capability {capability_id}"
            if refusal is not None:
                return _Decision(
                    verdict=Verdict.DENY,
                    reason=refusal,
                    guard="capability",
                    capability_id=capability_id,
                )
            kernel = stored
        else:
            kernel = self._chio.get(capability_id)
        request = EvaluationRequest(
            capability_id=capability_id, tool_server=tool_server, tool=tool, deny_reason=deny_reason
        )
        verdict, reason, cap, guard = self._decide(request, at_us)
        grant_index: int | None = None
        if verdict is Verdict.ALLOW and kernel is not None:
            # A capability with a kernel-format token is bound to its grants' servers too.
            grant_index = _chio.grant_for(kernel["scope"], tool_server, tool)
            if grant_index is None:
                verdict, guard = Verdict.DENY, "scope"
                reason = (
                    f"tool {tool!r} on server {tool_server!r} is not in the scope of "
                    f"capability {capability_id}"
                )
        evidence: tuple[GuardResult, ...] = ()
        approval: GuardResult | None = None
        hold: Hold | None = None
        budgeted = verdict is Verdict.ALLOW and self._budgeted(cap, kernel, grant_index)
        if verdict is Verdict.ALLOW and (guards or budgeted):
            call = CallContext(
                capability_id=capability_id,
                tool_server=tool_server,
                tool=tool,
                parameters=parameters,
                grant=kernel["scope"]["grants"][grant_index]
                if kernel is not None and grant_index is not None
                else None,
                grant_index=grant_index,
                token=kernel,
                temporal=temporal or {},
                request_id=request_id,
                at_us=at_us,
            )
            stopped, evidence, hold = self._approvals.run(guards, call)
            if stopped is None and budgeted:
                # Budgets are the grant's, not a policy's: charged last, once every guard
                # allowed (an approval included), so a hold only opens for a call that is
                # allowed.
                charged = self._budget.check(call)
                if charged.details or not charged.allowed:
                    evidence = (*evidence, charged)
                stopped = None if charged.allowed else charged
            if stopped is not None:
                verdict, guard, reason = Verdict.DENY, stopped.guard, stopped.reason
                if stopped.verdict is GuardVerdict.APPROVAL_REQUIRED:
                    verdict, approval = Verdict.PENDING_APPROVAL, stopped
        return _Decision(
            verdict=verdict,
            reason=reason,
            guard=guard,
            capability_id=capability_id,
            token=cap,
            kernel=kernel,
            grant_index=grant_index,
            evidence=evidence,
            approval=approval,
            hold=hold,
        )

    @overload
    def _kernel_receipt(
        self, decision: _Decision, *, as_text: Literal[False] = False, **fields: Any
    ) -> dict[str, Any]: ...

    @overload
    def _kernel_receipt(
        self, decision: _Decision, *, as_text: Literal[True], **fields: Any
    ) -> tuple[str, str, bytes]: ...

    def _kernel_receipt(
        self, decision: _Decision, *, as_text: bool = False, **fields: Any
    ) -> dict[str, Any] | tuple[str, str, bytes]:
        """The decision as a kernel-format receipt signed with the sidecar's key (``fields``:
        :meth:`_kernel_body`'s). ``as_text``: ``(id, compact JSON, signed bytes)`` for a step
        event instead of the receipt's dict (one canonicalization, no copy)."""
        body = self._kernel_body(decision, **fields)
        if as_text:
            return sign_kernel_receipt_text(body, self._key)
        return sign_kernel_receipt(body, self._key)

    def _kernel_body(
        self,
        decision: _Decision,
        *,
        at_us: int,
        tool_server: str,
        tool: str,
        parameters: object,
        request_id: str,
        policy_hash: str,
        redact: bool = False,
    ) -> dict[str, Any]:
        """The decision's kernel-format receipt body, unsigned."""
        body = _chio.receipt_body(
            timestamp=at_us // 1_000_000,
            token=decision.kernel,
            capability_id=decision.capability_id,
            tool_server=tool_server,
            tool_name=tool,
            parameters=parameters,
            request_id=request_id,
            allowed=decision.verdict is Verdict.ALLOW,
            reason=decision.reason,
            guard=decision.guard,
            grant_index=decision.grant_index,
            redact=redact,
            evidence=evidence_json(decision.evidence),
            policy_hash=policy_hash,
        )
        if decision.hold is not None:
            body["metadata"]["approval"] = decision.hold.metadata()
        return body

    def evaluate_now(self, request: EvaluationRequest) -> SignedReceipt:
        """Synchronous :meth:`evaluate`: decide once, sign a Chio receipt, sign the step.

        The step event carries the decision twice over: the kernel-format receipt (signed by
        the sidecar's key, bound to the step's Temporal context by its ``request_id``, with the
        request's parameters or, with ``redact_parameters``, only their hash) and the Avro
        signature over the whole record, which covers that receipt too. The receipt log keeps
        the signed Avro body (format ``step``): it holds the Chio receipt, so one row per
        decision, and ``verify-log`` checks it with the Avro signature as before.

        Parameters with no canonical JSON form are refused (:class:`ProtocolError`); the
        message never quotes them.
        """
        t0 = time.perf_counter_ns()
        evaluated_at = now_us()
        guards, policy_hash = self._policy
        decision = self._decide_call(
            capability_id=request.capability_id,
            tool_server=request.tool_server,
            tool=request.tool,
            at_us=evaluated_at,
            deny_reason=request.deny_reason,
            parameters=request.parameters,
            temporal=_temporal_context(request),
            guards=guards,
        )
        token = decision.token
        step = request.step(
            receipt_id=uuid7(),
            token=token,
            verdict=decision.verdict,
            reason=decision.reason,
            evaluated_at=evaluated_at,
            key_id=self._key.key_id,
        )
        try:
            chio_id, chio_text, chio_signed = self._kernel_receipt(
                decision,
                as_text=True,
                at_us=evaluated_at,
                tool_server=request.tool_server,
                tool=request.tool,
                parameters=request.parameters,
                request_id=request_id_for(step),
                policy_hash=policy_hash,
                redact=request.redact_parameters,
            )
        except ChioWireError:
            self._finish_guards(guards, decision, allowed=False)
            raise ProtocolError("the parameters have no canonical JSON form") from None
        self._finish_guards(
            guards,
            decision,
            allowed=decision.verdict is Verdict.ALLOW,
            receipt_id=step.receipt_id,
            chio_receipt_id=chio_id,
        )
        # The receipt was made above and is still this call's alone: it is finished and signed
        # in place (one record per attempt, no unsigned copy).
        body = seal_receipt(
            step,
            self._key,
            chio_receipt=chio_text,
            chio_signed=chio_signed,
            latency_us=(time.perf_counter_ns() - t0) // 1000,
        )
        if decision.hold is not None:
            self._approvals.open(
                decision.hold, request_receipt_id=step.receipt_id, request_chio_id=chio_id
            )
        if self._log_receipts:
            self._store.log_receipt(step.receipt_id, step.key_id, body)
        return SignedReceipt(receipt=step, body=body)

    async def evaluate(self, request: EvaluationRequest) -> SignedReceipt:
        """Decide one attempt and sign the receipt (no I/O)."""
        return self.evaluate_now(request)

    def record_outcome_now(self, outcome: StepOutcome) -> StepOutcome:
        """Synchronous :meth:`record_outcome`: ``outcome`` carrying its Chio
        ``trace_observation`` receipt signed by the key that signs the decisions, under the
        sidecar's policy hash (``schemas.sign_chio_outcome``). Nothing is stored."""
        return sign_chio_outcome(outcome, self._key, policy_hash=self.policy_hash)

    async def record_outcome(self, outcome: StepOutcome) -> StepOutcome:
        """Sign an outcome record (no I/O)."""
        return self.record_outcome_now(outcome)

    # -- the Chio kernel's routes -------------------------------------------------------------

    @property
    def durable(self) -> bool:
        """True when receipts and revocations are kept in a store file (not in memory)."""
        return self._log_receipts and self._store.path != ":memory:"

    def trusted_keys(self) -> set[str]:
        """Hex public keys whose tokens and receipts this sidecar trusts: its own, all of them."""
        keys = {**self._retired, **self._store.public_keys()}
        return {k.hex() for k in keys.values()} | {self._key.public_key.hex()}

    def chio_mint(
        self, subject: str, scope: Mapping[str, Any], ttl_seconds: int, job_uid: str = ""
    ) -> dict[str, Any]:
        """Mint a capability with a signed kernel-format token (``scope`` normalised)."""
        tools = _chio.tool_names(scope)
        if not tools:
            # The kernel silently mints an empty-scope token here; a token that allows nothing
            # is a caller's mistake (an unparsed scope), so it is refused.
            raise ChioRequestError(
                400, "chio_bad_request", "the requested scope grants no tool to invoke"
            )
        cap = self.mint(
            subject, tools, ttl_seconds, chio_subject=(subject, job_uid), chio_scope=scope
        )
        return self._chio[cap.id]

    def chio_token(self, capability_id: str) -> dict[str, Any] | None:
        """The signed kernel-format token of a capability, as signed (None if it has none)."""
        return self._chio.get(capability_id)

    def chio_release(self, capability_id: str) -> None:
        """Revoke a capability by id (durable); its attenuated children follow."""
        self._store.revoke(capability_id)
        self._revoked.add(capability_id)

    def _chio_revoked(self, token: Mapping[str, Any]) -> bool:
        ids = [token.get("id")] + [
            link.get("capability_id")
            for link in token.get("delegation_chain") or []
            if isinstance(link, Mapping)
        ]
        return any(i in self._revoked for i in ids if isinstance(i, str))

    def chio_validate(
        self,
        token: Mapping[str, Any],
        *,
        expected_subject: str | None = None,
        expected_scope: Mapping[str, Any] | None = None,
    ) -> tuple[bool, str | None]:
        """The kernel's validate checks, in its order: revocation, issuer, signature, expiry,
        revoked ancestors, then the expected subject and scope."""
        token = _chio.kernel_spelling(token)
        if self._chio_revoked({"id": token.get("id")}):
            return False, "capability has been revoked"
        if str(token.get("issuer", "")).lower() not in self.trusted_keys():
            return False, "capability issuer is not trusted"
        if not verify_capability_token(token).signature_valid:
            return False, "capability signature did not verify"
        expires_at = token.get("expires_at")
        if not isinstance(expires_at, int) or expires_at <= int(time.time()):
            return False, "capability has expired"
        if self._chio_revoked(token):
            return False, "a delegated capability in the chain has been revoked"
        if expected_subject and expected_subject.strip() != token.get("subject"):
            return False, "capability subject does not match expected_subject"
        if expected_scope is not None:
            scope = _chio.normalize_scope(token.get("scope"))
            if not _chio.scope_is_subset(_chio.normalize_scope(expected_scope), scope):
                return False, "expected_scope is not a subset of capability scope"
        return True, None

    def chio_attenuate(
        self, parent_token: Mapping[str, Any], new_scope: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Mint a child of a token this sidecar issued, with a strictly narrower scope.

        The parent must verify, be one of this sidecar's tokens and be live; the child keeps its
        subject and expiry bound and carries a delegation link signed by the subject key.
        """
        parent = _chio.kernel_spelling(parent_token)
        cap_id = str(parent.get("id", ""))
        stored = self._chio.get(cap_id)
        if stored is None or stored.get("signature") != parent.get("signature"):
            raise ChioRequestError(
                404, "chio_capability_not_found", "the parent token was not issued here"
            )
        valid, reason = self.chio_validate(stored)
        if not valid:
            raise ChioRequestError(403, "chio_capability_invalid", f"parent token: {reason}")
        child = _chio.normalize_scope(new_scope)
        if not _chio.scope_is_subset(child, stored["scope"]) or child == stored["scope"]:
            raise ChioRequestError(
                409,
                "chio_scope_not_narrower",
                "new_scope must be a strict subset of the parent token's scope",
            )
        over = _budgets.remaining_over(
            stored["scope"], child, lambda index: self._store.budget_usage(cap_id, index)
        )
        if over is not None:
            raise ChioRequestError(409, "chio_budget_exceeds_parent", over)
        row = self._chio_rows[cap_id]
        tools = _chio.tool_names(child)
        if not tools:
            raise ChioRequestError(400, "chio_bad_request", "new_scope grants no tool to invoke")
        remaining = max((self._get(cap_id).expires_at - now_us()) / 1_000_000, 1e-6)
        cap = self.mint(
            row.requested_subject,
            tools,
            remaining,
            parent_id=cap_id,
            chio_subject=(row.requested_subject, row.job_uid),
            chio_scope=child,
        )
        return self._chio[cap.id]

    def chio_evaluate(
        self,
        *,
        tool_server: str,
        tool_name: str,
        parameters: object,
        request_id: str | None = None,
        token: Mapping[str, Any] | None = None,
        capability_id: str | None = None,
    ) -> ChioDecision:
        """Decide a tool call on a kernel route and sign a kernel-format receipt.

        ``token`` (the kernel's mediated body) is the presented capability, checked against
        the one this sidecar issued; ``capability_id`` (chio-sdk-python's body) names a stored
        one. Allow and deny receipts are signed and appended to the receipt log.
        """
        try:
            param_hash = parameter_hash(parameters)
        except ChioWireError:
            raise ChioRequestError(
                400, "chio_bad_request", "invalid parameters: no canonical JSON form"
            ) from None
        at_us = now_us()
        request_id = request_id or uuid7()
        guards, policy_hash = self._policy
        decision = self._decide_call(
            capability_id=capability_id or "",
            tool_server=tool_server,
            tool=tool_name,
            at_us=at_us,
            presented=token,
            parameters=parameters,
            request_id=request_id,
            guards=guards,
        )
        allowed = decision.verdict is Verdict.ALLOW
        try:
            receipt = self._kernel_receipt(
                decision,
                at_us=at_us,
                tool_server=tool_server,
                tool=tool_name,
                parameters=parameters,
                request_id=request_id,
                policy_hash=policy_hash,
            )
        except BaseException:
            self._finish_guards(guards, decision, allowed=False)
            raise
        self._finish_guards(
            guards,
            decision,
            allowed=allowed,
            receipt_id=receipt["id"],
            chio_receipt_id=receipt["id"],
        )
        if decision.hold is not None:
            self._approvals.open(
                decision.hold, request_receipt_id=receipt["id"], request_chio_id=receipt["id"]
            )
        if self._log_receipts:
            self._log_chio(receipt)
        nonce = None
        kernel = decision.kernel
        if allowed:
            nonce = _chio.execution_nonce(
                self._key,
                now=at_us // 1_000_000,
                subject_id=str(kernel["subject"]) if kernel is not None else "",
                request_id=request_id,
                capability_id=decision.capability_id,
                tool_server=tool_server,
                tool_name=tool_name,
                parameter_hash=param_hash,
                reserved_hold_id=_budgets.hold_of(decision.evidence),
            )
        return ChioDecision(
            allowed=allowed,
            receipt=receipt,
            reason="" if allowed else decision.reason,
            guard=decision.guard,
            execution_nonce=nonce,
            approval_id=decision.hold.approval_id
            if decision.hold is not None and decision.verdict is Verdict.PENDING_APPROVAL
            else None,
        )

    # -- budgets (see _budgets) ----------------------------------------------------------------

    def lineage(self, capability_id: str) -> list[tuple[str, Mapping[str, Any] | None]]:
        """The ancestors of a capability, nearest first, each with its kernel-format token
        (``None`` for one without): what a budget charge also counts against."""
        token = self._caps.get(capability_id)
        if token is None:
            return []
        return [(a, self._chio.get(a)) for a in reversed(token.chain)]

    def sign_chio_receipt(self, body: dict[str, Any]) -> dict[str, Any]:
        """Sign a kernel-format receipt ``body`` with the current key and append it to the
        receipt log (a settlement's or a refund's receipt)."""
        receipt = sign_kernel_receipt(body, self._key)
        if self._log_receipts:
            self._log_chio(receipt)
        return receipt

    def _budgeted(
        self,
        cap: CapabilityToken | None,
        kernel: Mapping[str, Any] | None,
        grant_index: int | None,
    ) -> bool:
        """Whether a call may count against a budget: its grant has one, or it has ancestors
        (whose grants may). Nothing is charged otherwise, and no evidence is added."""
        if cap is not None and cap.chain:
            return True
        if kernel is None or grant_index is None:
            return False
        grant = kernel["scope"]["grants"][grant_index]
        return any(grant.get(f) is not None for f in _budgets.BUDGET_FIELDS)

    def _finish_guards(
        self,
        guards: Sequence[Guard],
        decision: _Decision,
        *,
        allowed: bool,
        receipt_id: str = "",
        chio_receipt_id: str = "",
    ) -> None:
        """Tell each guard that ran and has a ``finish`` hook how its decision ended; a budget
        hold is keyed by the signed receipt, or released when the call was not allowed."""
        for guard, result in zip((*guards, self._budget), decision.evidence, strict=False):
            finish = getattr(guard, "finish", None)
            if finish is not None:
                finish(
                    result, allowed=allowed, receipt_id=receipt_id, chio_receipt_id=chio_receipt_id
                )


def _temporal_context(request: EvaluationRequest) -> dict[str, Any]:
    """The attempt's Temporal context as the guards see it."""
    return {
        "namespace": request.namespace,
        "workflow_id": request.workflow_id,
        "run_id": request.run_id,
        "workflow_type": request.workflow_type,
        "task_queue": request.task_queue,
        "activity_id": request.activity_id,
        "activity_type": request.activity_type,
        "attempt": request.attempt,
        "is_local": request.is_local,
    }


def _fresh_key() -> KeyPair:
    seed = os.urandom(32)
    return KeyPair.from_seed(key_id_for(KeyPair.from_seed("", seed).public_key), seed)
