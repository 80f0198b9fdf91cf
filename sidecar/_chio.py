"""The Chio kernel's face of the sidecar, pure parts: scopes, spellings, receipt bodies.

The sidecar answers the routes of the Chio kernel's sidecar (chio-api-protect 0.1.2) beside its
own. This module holds what those routes need that is not I/O and not the policy decision:

- scope strings (``tool:SERVER:TOOL:OP``, ``tools:TOOL``, ``TOOL:OP``, ``resource:URI:OP``,
  ``prompt:NAME:OP``) parsed as the kernel's ``parse_sidecar_scope`` does;
- ``ChioScope`` objects in either spelling of operations (chio-sdk-python writes ``"Invoke"``,
  the kernel ``"invoke"``), normalised to the kernel's;
- the SDK view of a kernel token (:func:`sdk_spelling`) and back (:func:`kernel_spelling`);
- the subset check of an attenuation and the ``Attenuation`` entries of its delegation link;
- the subject key the kernel derives from a requested subject (:func:`derive_subject_key`);
- the kernel-format receipt body of a mediated decision and the signed execution nonce.

Tokens and receipts stay raw JSON objects; nothing here re-serialises them through a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import nacl.signing

from chio_receipts.schemas import (
    SDK_OPERATION_SPELLING,
    KeyPair,
    canonical_json,
    content_hash,
    parameter_hash,
    uuid7,
)
from chio_receipts.sidecar._errors import SidecarError

__all__ = [
    "KERNEL_VERSION",
    "POLICY_DOCUMENT",
    "POLICY_HASH",
    "ChioRequestError",
    "attenuations",
    "derive_subject_key",
    "execution_nonce",
    "kernel_spelling",
    "normalize_scope",
    "parse_scope_strings",
    "receipt_body",
    "scope_is_subset",
    "sdk_spelling",
    "tool_names",
]

KERNEL_VERSION: Final = "0.1.2"
"""The kernel release whose routes and shapes these are."""

POLICY_DOCUMENT: Final = {
    "policy": "chio-receipts.sidecar.capability-scope",
    "version": 1,
    "checks": [
        "capability_known",
        "issuer_trusted",
        "not_revoked",
        "not_expired",
        "tool_in_scope",
    ],
}
"""The policy the sidecar enforces, as data: what ``policy_hash`` in a receipt names."""

POLICY_HASH: Final = hashlib.sha256(canonical_json(POLICY_DOCUMENT)).hexdigest()
"""``policy_hash`` of every receipt: SHA-256 hex of the canonical JSON of the policy."""

EXECUTION_NONCE_SCHEMA: Final = "chio.execution_nonce.v1"
EXECUTION_NONCE_TTL_SECONDS: Final = 30

# The kernel's operation aliases (parse_sidecar_operation); ``shorthand`` is the TOOL:OP form.
_OPERATION_ALIASES: Final = {
    "invoke": "invoke",
    "call": "invoke",
    "exec": "invoke",
    "execute": "invoke",
    "read_result": "read_result",
    "result": "read_result",
    "read": "read",
    "subscribe": "subscribe",
    "watch": "subscribe",
    "get": "get",
    "delegate": "delegate",
}
# chio-sdk-python's ``Operation`` spelling and the kernel's serde spelling.
_SDK_TO_KERNEL: Final = SDK_OPERATION_SPELLING
_KERNEL_TO_SDK: Final = {v: k for k, v in _SDK_TO_KERNEL.items()}
_KERNEL_OPERATIONS: Final = frozenset(_KERNEL_TO_SDK)


class ChioRequestError(SidecarError):
    """A request on a kernel route that is answered ``{"error", "message"}`` with ``status``."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message


def _bad(message: str) -> ChioRequestError:
    return ChioRequestError(400, "chio_bad_request", message)


def _operation(raw: str, *, shorthand: bool) -> str:
    low = raw.lower()
    if low == "write" and shorthand:
        return "invoke"
    op = _OPERATION_ALIASES.get(low)
    if op is None:
        raise _bad(f"unsupported controller scope operation: {raw}")
    return op


def parse_scope_strings(scopes: Iterable[str]) -> dict[str, Any]:
    """A kernel ``ChioScope`` from the mint route's scope strings (``parse_sidecar_scope``)."""
    scope: dict[str, list[dict[str, Any]]] = {}
    for raw in scopes:
        if not isinstance(raw, str):
            raise _bad("scopes must be strings")
        parts = [p.strip() for p in raw.split(":") if p.strip()]
        if parts[:1] == ["tools"] and len(parts) >= 2:
            grant = {"server_id": "*", "tool_name": ":".join(parts[1:]), "operations": ["invoke"]}
            scope.setdefault("grants", []).append(grant)
        elif len(parts) == 2:
            op = _operation(parts[1], shorthand=True)
            scope.setdefault("grants", []).append(
                {"server_id": "*", "tool_name": parts[0], "operations": [op]}
            )
        elif len(parts) == 4 and parts[0] == "tool":
            op = _operation(parts[3], shorthand=False)
            scope.setdefault("grants", []).append(
                {"server_id": parts[1], "tool_name": parts[2], "operations": [op]}
            )
        elif len(parts) == 3 and parts[0] in ("resource", "prompt"):
            op = _operation(parts[2], shorthand=False)
            field, name = (
                ("resource_grants", "uri_pattern")
                if parts[0] == "resource"
                else ("prompt_grants", "prompt_name")
            )
            scope.setdefault(field, []).append({name: parts[1], "operations": [op]})
        else:
            raise _bad(f"unsupported controller scope syntax: {raw}")
    return dict(scope)


def _kernel_operations(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _bad(f"{where}.operations must be a non-empty list")
    out = []
    for op in value:
        kernel = _SDK_TO_KERNEL.get(op, op) if isinstance(op, str) else None
        if kernel not in _KERNEL_OPERATIONS:
            raise _bad(f"{where}.operations: unknown operation {op!r}")
        out.append(str(kernel))
    return out


def normalize_scope(scope: object) -> dict[str, Any]:
    """A ``ChioScope`` object (either operation spelling) in the kernel's normal form.

    Empty lists and ``null`` fields are left out, as serde writes them; unknown grant fields are
    kept as sent (the token signer checks them). Raises :class:`ChioRequestError` (400).
    """
    if not isinstance(scope, Mapping):
        raise _bad("scope must be an object")
    out: dict[str, Any] = {}
    for field in ("grants", "resource_grants", "prompt_grants"):
        entries = scope.get(field)
        if entries is None:
            continue
        if not isinstance(entries, list) or not all(isinstance(g, Mapping) for g in entries):
            raise _bad(f"scope.{field} must be a list of objects")
        normal = []
        for grant in entries:
            entry = {k: v for k, v in grant.items() if v is not None and v != []}
            entry["operations"] = _kernel_operations(grant.get("operations"), f"scope.{field}[]")
            normal.append(entry)
        if normal:
            out[field] = normal
    return out


def _respell(token: Mapping[str, Any], table: Mapping[str, str]) -> dict[str, Any]:
    scope = token.get("scope")
    if not isinstance(scope, Mapping):
        return dict(token)
    new_scope: dict[str, Any] = dict(scope)
    for field in ("grants", "resource_grants", "prompt_grants"):
        entries = scope.get(field)
        if isinstance(entries, list):
            new_scope[field] = [
                {**g, "operations": [table.get(op, op) for op in g.get("operations", [])]}
                if isinstance(g, Mapping) and isinstance(g.get("operations"), list)
                else g
                for g in entries
            ]
    return {**token, "scope": new_scope}


def sdk_spelling(token: Mapping[str, Any]) -> dict[str, Any]:
    """The kernel token with its operations in chio-sdk-python's spelling (``"Invoke"``).

    Same id, fields and signature; the signature covers the kernel spelling, so a verifier
    first maps the operations back with :func:`kernel_spelling`.
    """
    return _respell(token, _KERNEL_TO_SDK)


def kernel_spelling(token: Mapping[str, Any]) -> dict[str, Any]:
    """A token as received, with SDK-spelled operations mapped to the kernel's."""
    return _respell(token, _SDK_TO_KERNEL)


def tool_names(scope: Mapping[str, Any]) -> list[str]:
    """The tools a scope lets its holder invoke: the sidecar engine's scope."""
    names = []
    for grant in scope.get("grants", []):
        if "invoke" not in grant["operations"]:
            continue
        name = grant.get("tool_name")
        if not isinstance(name, str) or not name:
            raise _bad("scope.grants[].tool_name must be a non-empty string")
        if name == "*":
            raise _bad("wildcard tool names are not supported by this sidecar")
        if not isinstance(grant.get("server_id"), str) or not grant["server_id"]:
            raise _bad("scope.grants[].server_id must be a non-empty string")
        names.append(name)
    return names


def grant_for(scope: Mapping[str, Any], tool_server: str, tool_name: str) -> int | None:
    """Index of the first grant that lets ``tool_name`` on ``tool_server`` be invoked."""
    for index, grant in enumerate(scope.get("grants", [])):
        if (
            grant.get("tool_name") == tool_name
            and grant.get("server_id") in ("*", tool_server)
            and "invoke" in grant.get("operations", [])
        ):
            return index
    return None


def _grant_covers(parent: Mapping[str, Any], child: Mapping[str, Any]) -> bool:
    if parent.get("server_id") not in ("*", child.get("server_id")):
        return False
    if parent.get("tool_name") not in ("*", child.get("tool_name")):
        return False
    if not set(child["operations"]) <= set(parent["operations"]):
        return False
    # Every constraint of the parent must stay; the child may add more.
    child_constraints = list(child.get("constraints", []))
    if any(c not in child_constraints for c in parent.get("constraints", [])):
        return False
    for field in ("max_invocations",):
        if parent.get(field) is not None and (
            child.get(field) is None or child[field] > parent[field]
        ):
            return False
    for field in ("max_cost_per_invocation", "max_total_cost"):
        cap = parent.get(field)
        if cap is not None:
            mine = child.get(field)
            if mine is None or mine.get("currency") != cap.get("currency"):
                return False
            if mine.get("units", 0) > cap.get("units", 0):
                return False
    return not (parent.get("dpop_required") and not child.get("dpop_required"))


def _named_covers(parent: Mapping[str, Any], child: Mapping[str, Any], name: str) -> bool:
    return parent.get(name) in ("*", child.get(name)) and set(child["operations"]) <= set(
        parent["operations"]
    )


def scope_is_subset(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """True when every grant of ``child`` is covered by a grant of ``parent`` (both normal)."""
    return (
        all(
            any(_grant_covers(p, c) for p in parent.get("grants", []))
            for c in child.get("grants", [])
        )
        and all(
            any(_named_covers(p, c, "uri_pattern") for p in parent.get("resource_grants", []))
            for c in child.get("resource_grants", [])
        )
        and all(
            any(_named_covers(p, c, "prompt_name") for p in parent.get("prompt_grants", []))
            for c in child.get("prompt_grants", [])
        )
    )


def attenuations(parent: Mapping[str, Any], child: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The kernel ``Attenuation`` entries that describe ``child`` narrowing ``parent``.

    ``remove_tool`` for a parent grant no child grant keeps, ``remove_operation`` for an
    operation dropped from a kept grant, ``add_constraint`` for a constraint the child adds.
    """
    out: list[dict[str, Any]] = []
    for grant in parent.get("grants", []):
        server, tool = grant["server_id"], grant["tool_name"]
        kept = [
            c
            for c in child.get("grants", [])
            if c["server_id"] == server and c["tool_name"] == tool
        ]
        if not kept:
            out.append({"type": "remove_tool", "server_id": server, "tool_name": tool})
            continue
        ops = {op for c in kept for op in c["operations"]}
        out.extend(
            {"type": "remove_operation", "server_id": server, "tool_name": tool, "operation": op}
            for op in grant["operations"]
            if op not in ops
        )
        parent_constraints = list(grant.get("constraints", []))
        added = [
            con for c in kept for con in c.get("constraints", []) if con not in parent_constraints
        ]
        out.extend(
            {"type": "add_constraint", "server_id": server, "tool_name": tool, "constraint": con}
            for con in added
        )
    return out


def derive_subject_key(subject: str, job_uid: str = "") -> nacl.signing.SigningKey:
    """The key the kernel binds a minted token to: seed ``sha256(subject ‖ 0x00 ‖ job_uid)``.

    The kernel's mint does not use the requested subject as the token's key; it derives one
    (chio-api-protect ``derive_sidecar_subject_key``). The sidecar can therefore sign a
    delegation link as the subject when it attenuates.
    """
    seed = hashlib.sha256(subject.encode() + b"\x00" + job_uid.encode()).digest()
    return nacl.signing.SigningKey(seed)


def receipt_body(
    *,
    timestamp: int,
    token: Mapping[str, Any] | None,
    capability_id: str,
    tool_server: str,
    tool_name: str,
    parameters: object,
    request_id: str,
    allowed: bool,
    reason: str,
    guard: str,
    grant_index: int | None,
    redact: bool = False,
    evidence: Sequence[Mapping[str, Any]] = (),
    policy_hash: str = POLICY_HASH,
) -> dict[str, Any]:
    """The unsigned body of a mediated decision receipt, as the kernel fills it.

    ``content_hash`` is the hash of no output (the tool has not run at decision time). With
    ``redact`` the body signs empty parameters, the ``parameter_hash`` of the real ones and
    ``redaction_mode: "redacted"``: the receipt still verifies and a holder of the parameters
    can prove them, but none travel. Raises ``ChioWireError`` for parameters with no canonical
    JSON form. ``evidence`` is the kernel's ``GuardEvidence`` list of the guards that ran (left
    out when empty, as the kernel serializes it); ``policy_hash`` names the active policy set.
    """
    attribution: dict[str, Any] = {}
    if token is not None:
        attribution = {
            "subject_key": token.get("subject"),
            "issuer_key": token.get("issuer"),
            "delegation_depth": len(token.get("delegation_chain") or []),
        }
        if grant_index is not None:
            attribution["grant_index"] = grant_index
    metadata: dict[str, Any] = {"receipt_context": {"request_id": request_id}}
    if attribution:
        metadata["attribution"] = attribution
    decision: dict[str, Any] = (
        {"verdict": "allow"} if allowed else {"verdict": "deny", "reason": reason, "guard": guard}
    )
    action: dict[str, Any] = (
        {"parameters": {}, "parameter_hash": parameter_hash(parameters)}
        if redact
        else {"parameters": parameters}
    )
    body: dict[str, Any] = {
        "timestamp": timestamp,
        "capability_id": capability_id,
        "tool_server": tool_server,
        "tool_name": tool_name,
        "action": action,
        "decision": decision,
        "receipt_kind": "mediated_decision",
        "boundary_class": "prevent",
        "tool_origin": "caller_executed",
        "redaction_mode": "redacted" if redact else "none",
        "content_hash": content_hash(),
        "policy_hash": policy_hash,
        "metadata": metadata,
        "trust_level": "mediated",
    }
    if evidence:
        body["evidence"] = [dict(e) for e in evidence]
    return body


def execution_nonce(
    key: KeyPair,
    *,
    now: int,
    subject_id: str,
    request_id: str,
    capability_id: str,
    tool_server: str,
    tool_name: str,
    parameter_hash: str,
    reserved_hold_id: str | None = None,
) -> dict[str, Any]:
    """A signed execution nonce as the kernel mints one: Ed25519 over ``JCS(nonce)``.

    With ``reserved_hold_id`` (the budget hold the authorization opened) the nonce names it,
    and the request that reserved it, as the kernel's reserving authorization does: the tool
    server presents it to ``/v1/reconcile``."""
    nonce: dict[str, Any] = {
        "schema": EXECUTION_NONCE_SCHEMA,
        "nonce_id": uuid7(),
        "issued_at": now,
        "expires_at": now + EXECUTION_NONCE_TTL_SECONDS,
        "bound_to": {
            "subject_id": subject_id,
            "request_id": request_id,
            "capability_id": capability_id,
            "tool_server": tool_server,
            "tool_name": tool_name,
            "parameter_hash": parameter_hash,
        },
    }
    if reserved_hold_id is not None:
        nonce["reserved_hold_id"] = reserved_hold_id
        nonce["reserving_request_id"] = request_id
    return {"nonce": nonce, "signature": key.sign(canonical_json(nonce)).hex()}
