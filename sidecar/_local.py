"""An in-process policy sidecar: capabilities, attenuation, expiry, revocation, signing.

Evaluation is a pure check (capability known, not revoked, not expired along its chain, tool in
scope) on in-memory state, followed by one Ed25519 signature. State is written through to a
:class:`~chio_receipts.sidecar._store.SidecarStore` (SQLite; ``:memory:`` unless one is given)
in short transactions before an answer is returned, and read back when the sidecar starts, so a
sidecar on the same store keeps its capabilities and revocations across restarts. State is
bounded: expired capabilities are dropped after a grace period.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from chio_receipts.schemas import (
    CapabilityToken,
    EvaluationRequest,
    KeyPair,
    ProtocolError,
    SignedReceipt,
    StepReceipt,
    Verdict,
    is_subset,
    normalize_scope,
    now_us,
    sign_receipt,
    uuid7,
)
from chio_receipts.sidecar._datadir import key_id_for
from chio_receipts.sidecar._errors import InvalidCapability, ScopeWidening, UnknownCapability
from chio_receipts.sidecar._store import SidecarStore

__all__ = ["LocalSidecar"]

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
    """

    def __init__(
        self,
        key: KeyPair | None = None,
        *,
        store: SidecarStore | None = None,
        retired_keys: Mapping[str, bytes] | None = None,
        max_capabilities: int = 100_000,
        expired_grace_seconds: float = 3600.0,
    ) -> None:
        self._log_receipts = store is not None
        self._store = store if store is not None else SidecarStore.memory()
        self._retired = dict(retired_keys or {})
        self._caps: dict[str, CapabilityToken] = {c.id: c for c in self._store.capabilities()}
        self._revoked: set[str] = self._store.revocations()
        self._max = max_capabilities
        self._grace_us = int(expired_grace_seconds * 1_000_000)
        self._key = key or _fresh_key()
        self.use_key(self._key)

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

    # -- capabilities ------------------------------------------------------------------------

    def mint(
        self,
        subject: str,
        scope: Iterable[str],
        ttl_seconds: float,
        *,
        parent_id: str | None = None,
    ) -> CapabilityToken:
        """Synchronous :meth:`create_capability` (pure, no I/O)."""
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
        self._store.put_capability(token)
        self._caps[token.id] = token
        return token

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
        token = self._caps.get(request.capability_id) if request.capability_id else None
        if request.deny_reason is not None:
            return Verdict.DENY, request.deny_reason, token
        if not request.capability_id:
            return Verdict.DENY, "no capability presented", None
        if token is None:
            return Verdict.DENY, f"unknown capability {request.capability_id}", None
        if self._revoked_in_chain(token):
            return Verdict.DENY, f"capability {token.id} is revoked", token
        if token.expired(at_us):
            return Verdict.DENY, f"capability {token.id} expired", token
        for ancestor_id in token.chain:
            ancestor = self._caps.get(ancestor_id)
            if ancestor is None or ancestor.expired(at_us):
                return Verdict.DENY, f"parent capability {ancestor_id} expired or unknown", token
        if not token.allows(request.tool):
            return (
                Verdict.DENY,
                f"tool {request.tool!r} is not in the scope of capability {token.id}",
                token,
            )
        return Verdict.ALLOW, f"tool {request.tool!r} allowed by capability {token.id}", token

    def evaluate_now(self, request: EvaluationRequest) -> SignedReceipt:
        """Synchronous :meth:`evaluate`: decide, build the receipt, sign it."""
        t0 = time.perf_counter_ns()
        evaluated_at = now_us()
        verdict, reason, token = self.decide(request, evaluated_at)
        receipt = StepReceipt(
            receipt_id=uuid7(),
            namespace=request.namespace,
            workflow_id=request.workflow_id,
            run_id=request.run_id,
            workflow_type=request.workflow_type,
            task_queue=request.task_queue,
            activity_id=request.activity_id,
            activity_type=request.activity_type,
            attempt=request.attempt,
            is_local=request.is_local,
            tool_server=request.tool_server,
            tool=request.tool,
            action="invoke",
            resource=f"{request.tool_server}/{request.tool}",
            subject=token.subject if token else "",
            capability_id=request.capability_id,
            capability_chain=token.chain if token else (),
            scope=token.scope if token else (),
            verdict=verdict,
            reason=reason,
            argument_digest=request.argument_digest,
            argument_key_id=request.argument_key_id,
            scheduled_at=request.scheduled_at,
            started_at=request.started_at,
            evaluated_at=evaluated_at,
            latency_us=(time.perf_counter_ns() - t0) // 1000,
            worker_identity=request.worker_identity,
            prev_hash=request.prev_hash,
            key_id=self._key.key_id,
        )
        receipt, body = sign_receipt(receipt, self._key)
        if self._log_receipts:
            self._store.log_receipt(receipt.receipt_id, receipt.key_id, body)
        return SignedReceipt(receipt=receipt, body=body)

    async def evaluate(self, request: EvaluationRequest) -> SignedReceipt:
        """Decide one attempt and sign the receipt (no I/O)."""
        return self.evaluate_now(request)


def _fresh_key() -> KeyPair:
    seed = os.urandom(32)
    return KeyPair.from_seed(key_id_for(KeyPair.from_seed("", seed).public_key), seed)
