"""The sidecar protocol's wire objects, shared by the worker (client) and the sidecar (server).

Capability tokens, scopes, the evaluation request, the signed receipt a sidecar answers with,
their JSON forms, and the small pure helpers both sides use to make them (ids, clocks). The
worker side (``interceptor``) and the sidecar side (``sidecar``) both import them from here and
never from each other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from uuid_utils import uuid7 as _uuid7

from chio_receipts.schemas._errors import ProtocolError
from chio_receipts.schemas._records import StepReceipt, Verdict

__all__ = [
    "CapabilityToken",
    "EvaluationRequest",
    "Scope",
    "SignedReceipt",
    "is_subset",
    "normalize_scope",
    "now_us",
    "receipt_from_json",
    "receipt_to_json",
    "uuid7",
]

Scope = tuple[str, ...]
"""A capability scope: the sorted, de-duplicated tool names it allows."""


def normalize_scope(tools: Iterable[str]) -> Scope:
    """Sorted unique tool names; :class:`ProtocolError` for an empty name or a non-string."""
    out = set()
    for tool in tools:
        if not isinstance(tool, str) or not tool.strip():
            raise ProtocolError(f"scope entries must be non-empty strings, got {tool!r}")
        out.add(tool)
    return tuple(sorted(out))


def is_subset(child: Iterable[str], parent: Iterable[str]) -> bool:
    """True when every tool of ``child`` is allowed by ``parent``."""
    return set(child) <= set(parent)


def now_us() -> int:
    """Wall-clock time in integer microseconds since the epoch (UTC)."""
    return time.time_ns() // 1000


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) string, monotonic within this process.

    Ids made in the same millisecond still sort in creation order (a counter seeded at random
    each millisecond); the random bits come from a generator that is reseeded in a forked child,
    so parent and child never share them.
    """
    return str(_uuid7())


@dataclass(frozen=True, slots=True, kw_only=True)
class CapabilityToken:
    """A capability minted by the sidecar: who may call which tools until when.

    ``chain`` lists the ancestor capability ids, root first, ending with ``parent_id``.
    """

    id: str
    subject: str
    scope: Scope
    issued_at: int
    expires_at: int
    parent_id: str | None = None
    chain: tuple[str, ...] = ()
    issuer_key_id: str = ""

    def expired(self, at_us: int | None = None) -> bool:
        """True once ``at_us`` (default: now) is at or past ``expires_at``."""
        return (now_us() if at_us is None else at_us) >= self.expires_at

    def allows(self, tool: str) -> bool:
        """True when ``tool`` is in this token's scope."""
        return tool in self.scope

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the sidecar API's capability object)."""
        return {
            "id": self.id,
            "subject": self.subject,
            "scope": list(self.scope),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "parent_id": self.parent_id,
            "chain": list(self.chain),
            "issuer_key_id": self.issuer_key_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CapabilityToken:
        """Inverse of :meth:`to_json`; raises ``KeyError``/``TypeError``/``ValueError``."""
        parent = data.get("parent_id")
        return cls(
            id=_str(data["id"]),
            subject=_str(data["subject"]),
            scope=tuple(_str(s) for s in _list(data["scope"])),
            issued_at=_int(data["issued_at"]),
            expires_at=_int(data["expires_at"]),
            parent_id=None if parent is None else _str(parent),
            chain=tuple(_str(s) for s in _list(data.get("chain", []))),
            issuer_key_id=_str(data.get("issuer_key_id", "")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationRequest:
    """Everything the interceptor knows about one attempt, sent to the sidecar for a decision.

    The sidecar decides, fills verdict, reason, receipt id, evaluation time, latency, subject,
    scope and chain from the capability, and signs. ``deny_reason`` lets the caller ask for a
    signed *deny* it already decided on (no grant, misconfigured override); it can never turn
    into an allow.

    ``parameters`` is the call's JSON value as the Chio receipt's ``action.parameters`` signs
    it (the interceptor sends ``{"args": [...]}``, or ``{"args_digest": ...}`` for arguments
    with no JSON form). With ``redact_parameters`` the sidecar signs empty parameters and only
    their ``parameter_hash``. Parameters never appear in ``repr`` (nor in logs or errors).
    """

    capability_id: str
    tool_server: str
    tool: str
    namespace: str = ""
    workflow_id: str = ""
    run_id: str = ""
    workflow_type: str = ""
    task_queue: str = ""
    activity_id: str = ""
    activity_type: str = ""
    attempt: int = 1
    is_local: bool = False
    argument_digest: str = ""
    argument_key_id: str = ""
    scheduled_at: int = 0
    started_at: int = 0
    worker_identity: str = ""
    prev_hash: bytes = b""
    deny_reason: str | None = None
    parameters: Any = field(default_factory=dict, repr=False)
    redact_parameters: bool = False
    trace_id: str = ""
    """OpenTelemetry trace id of the attempt's span (32 lowercase hex), or empty."""
    span_id: str = ""
    """OpenTelemetry span id of the attempt's span (16 lowercase hex), or empty."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``prev_hash`` as hex)."""
        return {
            "capability_id": self.capability_id,
            "tool_server": self.tool_server,
            "tool": self.tool,
            "namespace": self.namespace,
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "workflow_type": self.workflow_type,
            "task_queue": self.task_queue,
            "activity_id": self.activity_id,
            "activity_type": self.activity_type,
            "attempt": self.attempt,
            "is_local": self.is_local,
            "argument_digest": self.argument_digest,
            "argument_key_id": self.argument_key_id,
            "scheduled_at": self.scheduled_at,
            "started_at": self.started_at,
            "worker_identity": self.worker_identity,
            "prev_hash": self.prev_hash.hex(),
            "deny_reason": self.deny_reason,
            "parameters": self.parameters,
            "redact_parameters": self.redact_parameters,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
        }

    def step(
        self,
        *,
        receipt_id: str,
        token: CapabilityToken | None,
        verdict: Verdict,
        reason: str,
        evaluated_at: int,
        key_id: str = "",
    ) -> StepReceipt:
        """The step receipt of this attempt, as a sidecar decided it: subject, chain and scope
        from ``token`` (empty without one), no latency, no Chio receipt, no signature yet."""
        return StepReceipt(
            receipt_id=receipt_id,
            namespace=self.namespace,
            workflow_id=self.workflow_id,
            run_id=self.run_id,
            workflow_type=self.workflow_type,
            task_queue=self.task_queue,
            activity_id=self.activity_id,
            activity_type=self.activity_type,
            attempt=self.attempt,
            is_local=self.is_local,
            tool_server=self.tool_server,
            tool=self.tool,
            action="invoke",
            resource=f"{self.tool_server}/{self.tool}",
            subject=token.subject if token else "",
            capability_id=self.capability_id,
            capability_chain=token.chain if token else (),
            scope=token.scope if token else (),
            verdict=verdict,
            reason=reason,
            argument_digest=self.argument_digest,
            argument_key_id=self.argument_key_id,
            scheduled_at=self.scheduled_at,
            started_at=self.started_at,
            evaluated_at=evaluated_at,
            latency_us=0,
            worker_identity=self.worker_identity,
            prev_hash=self.prev_hash,
            trace_id=self.trace_id,
            span_id=self.span_id,
            key_id=key_id,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationRequest:
        """Strict inverse of :meth:`to_json`; raises ``KeyError``/``TypeError``/``ValueError``."""
        deny = data.get("deny_reason")
        return cls(
            capability_id=_str(data["capability_id"]),
            tool_server=_str(data["tool_server"]),
            tool=_str(data["tool"]),
            namespace=_str(data.get("namespace", "")),
            workflow_id=_str(data.get("workflow_id", "")),
            run_id=_str(data.get("run_id", "")),
            workflow_type=_str(data.get("workflow_type", "")),
            task_queue=_str(data.get("task_queue", "")),
            activity_id=_str(data.get("activity_id", "")),
            activity_type=_str(data.get("activity_type", "")),
            attempt=_int(data.get("attempt", 1)),
            is_local=_bool(data.get("is_local", False)),
            argument_digest=_str(data.get("argument_digest", "")),
            argument_key_id=_str(data.get("argument_key_id", "")),
            scheduled_at=_int(data.get("scheduled_at", 0)),
            started_at=_int(data.get("started_at", 0)),
            worker_identity=_str(data.get("worker_identity", "")),
            prev_hash=bytes.fromhex(_str(data.get("prev_hash", ""))),
            deny_reason=None if deny is None else _str(deny),
            parameters=data.get("parameters", {}),
            redact_parameters=_bool(data.get("redact_parameters", False)),
            trace_id=_str(data.get("trace_id", "")),
            span_id=_str(data.get("span_id", "")),
        )

    def matches(self, receipt: StepReceipt) -> bool:
        """True when ``receipt`` carries this request's identity and context unchanged.

        The trace context is correlation data, not authority: a receipt from a sidecar that
        predates it (empty trace and span ids) still matches, so workers can be upgraded before
        their sidecar; a receipt naming *other* ids does not."""
        return (
            receipt.capability_id == self.capability_id
            and receipt.tool_server == self.tool_server
            and receipt.tool == self.tool
            and receipt.namespace == self.namespace
            and receipt.workflow_id == self.workflow_id
            and receipt.run_id == self.run_id
            and receipt.workflow_type == self.workflow_type
            and receipt.task_queue == self.task_queue
            and receipt.activity_id == self.activity_id
            and receipt.activity_type == self.activity_type
            and receipt.attempt == self.attempt
            and receipt.is_local == self.is_local
            and receipt.argument_digest == self.argument_digest
            and receipt.argument_key_id == self.argument_key_id
            and receipt.scheduled_at == self.scheduled_at
            and receipt.started_at == self.started_at
            and receipt.worker_identity == self.worker_identity
            and receipt.prev_hash == self.prev_hash
            and receipt.trace_id in (self.trace_id, "")
            and receipt.span_id in (self.span_id, "")
            and bool(receipt.trace_id) == bool(receipt.span_id)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedReceipt:
    """A signed step receipt and its schemaless Avro wire body (what the sink receives)."""

    receipt: StepReceipt
    body: bytes


_INT_MAX = 2**63 - 1


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    if not -_INT_MAX <= value <= _INT_MAX:
        raise ValueError("integer out of range")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def receipt_to_json(receipt: StepReceipt) -> dict[str, Any]:
    """A step receipt as JSON-ready dict (bytes as hex, verdict as its symbol)."""
    d = receipt.to_avro()
    d["prev_hash"] = receipt.prev_hash.hex()
    d["chio_signed"] = receipt.chio_signed.hex()
    d["signature"] = receipt.signature.hex()
    return d


def receipt_from_json(data: Mapping[str, Any]) -> StepReceipt:
    """Inverse of :func:`receipt_to_json`; raises ``KeyError``/``TypeError``/``ValueError``."""
    d = dict(data)
    d["prev_hash"] = bytes.fromhex(_str(d["prev_hash"]))
    # A sidecar older than schema v2 sends no Chio receipt.
    d["chio_receipt"] = _str(d.get("chio_receipt", ""))
    d["chio_signed"] = bytes.fromhex(_str(d.get("chio_signed", "")))
    d["signature"] = bytes.fromhex(_str(d["signature"]))
    d["capability_chain"] = [_str(s) for s in _list(d["capability_chain"])]
    d["scope"] = [_str(s) for s in _list(d["scope"])]
    for name in ("attempt", "scheduled_at", "started_at", "evaluated_at", "latency_us"):
        d[name] = _int(d[name])
    return StepReceipt.from_avro(d)
