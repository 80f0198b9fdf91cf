"""The Chio kernel's wire format: canonical JSON, signed receipts and capability tokens.

Everything here follows chio-core-types 0.1.2 (the crate behind chio-kernel 0.1.2) byte for byte,
and works on raw JSON objects (``dict``): a receipt or token is never re-serialised through a
model, because a model that drops or adds a field changes the signed bytes.

- Canonical JSON is RFC 8785 as ``src/canonical.rs`` writes it: keys sorted by UTF-16 code units,
  shortest round-trip numbers with the ECMAScript exponent rules, minimal string escaping except
  that every Unicode control character (U+0000-U+001F *and* U+007F-U+009F, Rust's
  ``char::is_control``) is written as ``\\u00xx``.
- A receipt's ``id`` is ``sha256_hex(JCS(id input))``, the id input being every body field except
  ``id`` with empty optional fields left out (``src/receipt/body.rs``, ``ChioReceiptIdInput``).
  Before the id is computed the signer's nonce is bound into ``metadata`` under
  ``chio_receipt_signing_nonce`` (``src/receipt/signing.rs``). The Ed25519 signature covers
  ``JCS({"id": id, "body": id input})``.
- A capability token is signed over ``JCS(token minus "signature")`` with ``schema`` present
  (``src/capability/token.rs``, ``CapabilityTokenSigningBody``); each delegation link over
  ``JCS(link minus "signature")`` by its delegator (``src/capability/attenuation.rs``).
- Keys are the raw 32-byte Ed25519 public key as 64 lowercase hex characters, signatures 128 hex
  characters. Only Ed25519 is supported; ``p256:``/``p384:``/``hybrid:`` material is rejected.

Verification reads a received object the way the kernel's serde types do: unknown fields are
ignored, ``null`` optional fields and empty lists count as absent, keys may carry ``0x`` or upper
case hex. Signing produces exactly that normal form, so a verifier that hashes the raw object
(``chio.invariants`` in chio-sdk 0.1.0) sees the same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import chio_receipts_native
import nacl.exceptions
import nacl.signing

from chio_receipts.schemas._errors import ProtocolError
from chio_receipts.schemas._protocol import uuid7
from chio_receipts.schemas._signing import KeyPair

__all__ = [
    "CAPABILITY_SCHEMA",
    "RECEIPT_NONCE_KEY",
    "SDK_OPERATION_SPELLING",
    "CapabilityVerification",
    "ChioWireError",
    "KernelReceiptVerification",
    "canonical_json",
    "content_hash",
    "parameter_hash",
    "receipt_id",
    "sign_capability_token",
    "sign_delegation_link",
    "sign_kernel_receipt",
    "sign_kernel_receipt_text",
    "stream_content_hash",
    "verify_capability_token",
    "verify_kernel_receipt",
]

CAPABILITY_SCHEMA: Final = "chio.capability.v1"
"""The ``schema`` of a capability token (``CHIO_CAPABILITY_SCHEMA``)."""

SDK_OPERATION_SPELLING: Final = {
    "Invoke": "invoke",
    "ReadResult": "read_result",
    "Read": "read",
    "Subscribe": "subscribe",
    "Get": "get",
    "Delegate": "delegate",
}
"""chio-sdk-python's ``Operation`` → the kernel's serde spelling (which signatures cover)."""

RECEIPT_NONCE_KEY: Final = "chio_receipt_signing_nonce"
"""The metadata key the signer's nonce is bound under before the receipt id is computed."""

_U64_MAX: Final = (1 << 64) - 1

SigningKey: TypeAlias = nacl.signing.SigningKey | KeyPair
"""An Ed25519 private key: PyNaCl's ``SigningKey`` or the project's :class:`KeyPair`."""


class ChioWireError(ProtocolError):
    """A value has no canonical JSON form, or a Chio wire object cannot be signed as given.

    A data error (``retriable = False``): the same input fails the same way.
    """


# ---------------------------------------------------------------- canonical JSON (RFC 8785)


def canonical_json(value: object, *, safe_integers: bool = False) -> bytes:
    """The RFC 8785 canonical JSON bytes of ``value``, as chio-core-types 0.1.2 writes them.

    Written by the kernel's own canonicalizer in the native core
    (``chio_receipts_native.canonical_json_of``: the value becomes a ``serde_json::Value`` and
    chio-core-types ``canonicalize`` writes it). ``value`` is what :func:`json.loads` returns
    (dict, list, str, int, float, bool, None; tuples count as lists, other mappings as dicts).
    Integers must fit a 64-bit integer, as in the kernel's ``serde_json`` values;
    ``safe_integers=True`` also rejects magnitudes above 2**53 - 1 like the kernel's strict text
    path (``canonical_json_bytes_from_str``). Raises :class:`ChioWireError` for NaN, Infinity,
    non-string keys, strings with lone surrogates, values that are not JSON and nesting deeper
    than 900 levels; the message never quotes the value.
    """
    try:
        return chio_receipts_native.canonical_json_of(value, safe_integers)
    except ValueError as exc:
        raise ChioWireError(str(exc)) from None


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parameter_hash(parameters: object) -> str:
    """``action.parameter_hash``: SHA-256 hex of the canonical JSON of the tool's parameters."""
    return _sha256_hex(canonical_json(parameters))


def content_hash(output: object = None) -> str:
    """A receipt's ``content_hash`` for a tool output: SHA-256 hex of its canonical JSON.

    With no output (an authorization or a deny) the kernel hashes ``null``:
    ``74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b``.
    """
    if output is None:
        return _NULL_HASH
    return _sha256_hex(canonical_json(output))


_NULL_HASH: Final = hashlib.sha256(b"null").hexdigest()


def stream_content_hash(chunks: Iterable[object]) -> str:
    """``content_hash`` of a streamed output: SHA-256 of the concatenated chunk hashes (hex)."""
    return _sha256_hex("".join(content_hash(chunk) for chunk in chunks).encode("ascii"))


# ---------------------------------------------------------------- keys and signatures

_HEX: Final = re.compile(r"[0-9a-fA-F]*")


def _key_hex(value: object, field: str) -> str:
    """A public key as the kernel re-serialises it (``PublicKey::to_hex``)."""
    return _ed25519_hex(value, field, what="keys", size=32).lower()


def _signature_bytes(value: object, field: str) -> bytes:
    return bytes.fromhex(_ed25519_hex(value, field, what="signatures", size=64))


def _ed25519_hex(value: object, field: str, *, what: str, size: int) -> str:
    # The kernel's hex form (``0x`` optional) of ``size`` bytes; other algorithms' prefixes
    # are refused by name.
    if not isinstance(value, str):
        raise ChioWireError(f"{field} must be a hex string")
    if value.startswith(("p256:", "p384:", "hybrid:")):
        raise ChioWireError(f"{field}: only Ed25519 {what} are supported")
    raw = value.removeprefix("0x")
    if len(raw) != 2 * size or not _HEX.fullmatch(raw):
        raise ChioWireError(f"{field} must be {size} bytes of hex")
    return raw


def _signature_hex(value: object, field: str) -> str:
    """A signature as the kernel re-serialises it (``Signature::to_hex``)."""
    return _signature_bytes(value, field).hex()


def _public_hex(key: SigningKey) -> str:
    if isinstance(key, KeyPair):
        return key.public_key.hex()
    return bytes(key.verify_key).hex()


def _sign(key: SigningKey, message: bytes) -> str:
    # The native core signs for both kinds of key (PyNaCl's key by its seed).
    if isinstance(key, KeyPair):
        return key.sign(message).hex()
    return chio_receipts_native.sign(bytes(key), message).hex()


def _verifies(key_hex: str, message: bytes, signature: bytes) -> bool:
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        return False
    return chio_receipts_native.verify(key, message, signature)


# ---------------------------------------------------------------- typed views of raw JSON

_RECEIPT_KINDS: Final = frozenset({"mediated_decision", "trace_observation", "advisory_evaluation"})
_BOUNDARY_CLASSES: Final = frozenset({"prevent", "detect_only", "advisory_only", "cannot_see"})
_OBSERVATION_OUTCOMES: Final = frozenset({"observed", "evaluated", "dropped"})
_TOOL_ORIGINS: Final = frozenset(
    {"caller_executed", "host_executed_provider_reported", "host_executed_unmediated"}
)
_REDACTION_MODES: Final = frozenset({"none", "summary", "redacted"})
_TRUST_LEVELS: Final = frozenset({"mediated", "verified", "advisory"})
_TRUST_FOR_KIND: Final = {
    "mediated_decision": "mediated",
    "trace_observation": "verified",
    "advisory_evaluation": "advisory",
}
_DECISION_FIELDS: Final = {
    "allow": (),
    "deny": ("reason", "guard"),
    "cancelled": ("reason",),
    "incomplete": ("reason",),
}
_OPERATIONS: Final = frozenset(
    {"invoke", "read_result", "read", "subscribe", "get", "delegate"},
)


def _str(obj: Mapping[str, Any], field: str, where: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str):
        raise ChioWireError(f"{where}{field} must be a string")
    return value


def _u64(obj: Mapping[str, Any], field: str, where: str = "") -> int:
    value = obj.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise ChioWireError(f"{where}{field} must be an unsigned 64-bit integer")
    return value


def _enum(obj: Mapping[str, Any], field: str, allowed: frozenset[str]) -> str:
    value = obj.get(field)
    if value not in allowed:
        raise ChioWireError(f"{field} must be one of {sorted(allowed)}, not {value!r}")
    return str(value)


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ChioWireError(f"{field} must be a JSON object")
    return value


def _items(value: object, field: str) -> list[Mapping[str, Any]]:
    """An optional list field: ``None`` and ``[]`` are absent (``Vec::is_empty``)."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ChioWireError(f"{field} must be a list")
    return [_mapping(item, f"{field}[]") for item in value]


def _decision(value: object) -> dict[str, Any]:
    decision = _mapping(value, "decision")
    verdict = decision.get("verdict")
    if verdict not in _DECISION_FIELDS:
        raise ChioWireError(f"decision.verdict must be one of {sorted(_DECISION_FIELDS)}")
    out: dict[str, Any] = {"verdict": verdict}
    for field in _DECISION_FIELDS[str(verdict)]:
        out[field] = _str(decision, field, "decision.")
    return out


def _receipt_view(receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The receipt's id input (``ChioReceiptIdInput``) as serde reads and re-writes it."""
    action = _mapping(receipt.get("action"), "action")
    if "parameters" not in action:
        raise ChioWireError("action.parameters is missing")
    view: dict[str, Any] = {
        "timestamp": _u64(receipt, "timestamp"),
        "capability_id": _str(receipt, "capability_id", ""),
        "tool_server": _str(receipt, "tool_server", ""),
        "tool_name": _str(receipt, "tool_name", ""),
        "action": {
            "parameters": action["parameters"],
            "parameter_hash": _str(action, "parameter_hash", "action."),
        },
    }
    if receipt.get("decision") is not None:
        view["decision"] = _decision(receipt["decision"])
    view["receipt_kind"] = _enum(receipt, "receipt_kind", _RECEIPT_KINDS)
    view["boundary_class"] = _enum(receipt, "boundary_class", _BOUNDARY_CLASSES)
    if receipt.get("observation_outcome") is not None:
        view["observation_outcome"] = _enum(receipt, "observation_outcome", _OBSERVATION_OUTCOMES)
    view["tool_origin"] = _enum(receipt, "tool_origin", _TOOL_ORIGINS)
    view["redaction_mode"] = _enum(receipt, "redaction_mode", _REDACTION_MODES)
    actors = []
    for actor in _items(receipt.get("actor_chain"), "actor_chain"):
        ref = {"actor_id": _str(actor, "actor_id", "actor_chain[].")}
        if actor.get("actor_kind") is not None:
            ref["actor_kind"] = _str(actor, "actor_kind", "actor_chain[].")
        actors.append(ref)
    if actors:
        view["actor_chain"] = actors
    view["content_hash"] = _str(receipt, "content_hash", "")
    view["policy_hash"] = _str(receipt, "policy_hash", "")
    evidence = []
    for item in _items(receipt.get("evidence"), "evidence"):
        verdict = item.get("verdict")
        if not isinstance(verdict, bool):
            raise ChioWireError("evidence[].verdict must be a boolean")
        entry: dict[str, Any] = {
            "guard_name": _str(item, "guard_name", "evidence[]."),
            "verdict": verdict,
        }
        if item.get("details") is not None:
            entry["details"] = _str(item, "details", "evidence[].")
        evidence.append(entry)
    if evidence:
        view["evidence"] = evidence
    if receipt.get("metadata") is not None:
        view["metadata"] = receipt["metadata"]
    view["trust_level"] = _enum(receipt, "trust_level", _TRUST_LEVELS)
    if receipt.get("tenant_id") is not None:
        view["tenant_id"] = _str(receipt, "tenant_id", "")
    view["kernel_key"] = _key_hex(receipt.get("kernel_key"), "kernel_key")
    if receipt.get("bbs_projection_version") is not None or receipt.get("bbs_signature"):
        raise ChioWireError("receipts with BBS selective-disclosure material are not supported")
    return view


def _semantics_error(view: Mapping[str, Any]) -> str | None:
    """``ChioReceiptBody::validate_signable_semantics`` (receipt/body.rs, receipt/metadata.rs)."""
    kind, boundary = view["receipt_kind"], view["boundary_class"]
    outcome, decision = view.get("observation_outcome"), view.get("decision")
    if boundary == "cannot_see":
        return f"{kind} receipts cannot use cannot_see as a signed runtime boundary"
    if kind == "mediated_decision":
        if boundary != "prevent" or outcome is not None or decision is None:
            return (
                "mediated_decision receipts require a prevent boundary, no observation outcome, "
                "and a decision"
            )
    else:
        expected = "detect_only" if kind == "trace_observation" else "advisory_only"
        if decision is not None:
            return f"{kind} receipts must not carry an authorization decision"
        if boundary != expected or outcome is None:
            return f"{kind} receipts require a {expected} boundary and an observation outcome"
    if view["trust_level"] != _TRUST_FOR_KIND[kind]:
        return f"{kind} receipts require trust_level {_TRUST_FOR_KIND[kind]}"
    return None


def _receipt_id(view: Mapping[str, Any]) -> str:
    return _sha256_hex(canonical_json(view))


def _receipt_signing_bytes(receipt_id_value: str, view: Mapping[str, Any]) -> bytes:
    return canonical_json({"id": receipt_id_value, "body": view})


# ---------------------------------------------------------------- kernel receipts

# The kernel receipt's fields in its struct order (what a receipt body may hold).
_RECEIPT_ORDER: Final = (
    "timestamp",
    "capability_id",
    "tool_server",
    "tool_name",
    "action",
    "decision",
    "receipt_kind",
    "boundary_class",
    "observation_outcome",
    "tool_origin",
    "redaction_mode",
    "actor_chain",
    "content_hash",
    "policy_hash",
    "evidence",
    "metadata",
    "trust_level",
    "tenant_id",
    "kernel_key",
)
_RECEIPT_INPUT_FIELDS: Final = frozenset(_RECEIPT_ORDER)


def receipt_id(body: Mapping[str, Any]) -> str:
    """The content-addressed id of a receipt body (``chio_receipt_id``).

    ``body`` is a receipt without or with ``id``/``signature`` (both are ignored); the nonce must
    already be bound into ``metadata`` and ``kernel_key`` set, as in a signed receipt.
    """
    return _receipt_id(_receipt_view(body))


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelReceiptVerification:
    """What :func:`verify_kernel_receipt` found. Truthy exactly when ``valid``."""

    valid: bool
    """``ChioReceipt::verify_signature``: semantics valid, id recomputed, signature verified
    (and, when trusted keys were given, ``kernel_key`` among them)."""
    reason: str | None
    """Why the receipt is not valid; ``None`` when it is."""
    receipt_id_valid: bool
    signature_valid: bool
    semantics_valid: bool
    parameter_hash_valid: bool
    """Whether ``action.parameter_hash`` matches the parameters (the sidecar's verify route
    requires it too; the signature check alone does not)."""
    kernel_key: str | None
    """The signer's key as lowercase hex, for a trust decision; ``None`` if unreadable."""

    def __bool__(self) -> bool:
        return self.valid


def _receipt_failure(reason: str) -> KernelReceiptVerification:
    return KernelReceiptVerification(
        valid=False,
        reason=reason,
        receipt_id_valid=False,
        signature_valid=False,
        semantics_valid=False,
        parameter_hash_valid=False,
        kernel_key=None,
    )


def verify_kernel_receipt(
    receipt: Mapping[str, Any], *, trusted_keys: Collection[str] | None = None
) -> KernelReceiptVerification:
    """Verify a signed receipt as the kernel does (``ChioReceipt::verify_signature``).

    Checks the v1 semantics, recomputes the content-addressed id and verifies the Ed25519
    signature of ``kernel_key`` over ``{"id", "body"}``. With ``trusted_keys`` (hex public keys)
    the signer must also be one of them. Never raises for a malformed receipt: it is not valid.
    """
    try:
        view = _receipt_view(receipt)
        claimed_id = _str(receipt, "id", "")
        signature = _signature_bytes(receipt.get("signature"), "signature")
        action = view["action"]
        params_ok = parameter_hash(action["parameters"]) == action["parameter_hash"]
    except ChioWireError as exc:
        return _receipt_failure(f"malformed receipt: {exc}")
    semantics = _semantics_error(view)
    id_ok = _receipt_id(view) == claimed_id
    sig_ok = _verifies(view["kernel_key"], _receipt_signing_bytes(claimed_id, view), signature)
    trusted = trusted_keys is None or view["kernel_key"] in {
        key.removeprefix("0x").lower() for key in trusted_keys
    }
    reason = (
        (f"semantics: {semantics}" if semantics else None)
        or (None if id_ok else "the id is not the hash of the receipt body")
        or (None if sig_ok else "the signature does not verify under kernel_key")
        or (None if trusted else "kernel_key is not a trusted signer")
    )
    return KernelReceiptVerification(
        valid=reason is None,
        reason=reason,
        receipt_id_valid=id_ok,
        signature_valid=sig_ok,
        semantics_valid=semantics is None,
        parameter_hash_valid=params_ok,
        kernel_key=view["kernel_key"],
    )


def sign_kernel_receipt(
    body: Mapping[str, Any], signing_key: SigningKey, *, nonce: str | None = None
) -> dict[str, Any]:
    """Sign a receipt body as ``ChioReceipt::sign`` does and return the signed receipt.

    ``body`` holds the receipt fields except ``id``, ``signature`` and (optionally)
    ``kernel_key``, which is taken from ``signing_key``. ``action.parameter_hash`` is computed
    when absent and must match when present; with a ``redaction_mode`` other than ``none`` it
    must be given (the hash of the parameters before redaction) and is signed as given.
    The nonce (the kernel's ``rcpt-<uuidv7>``, generated when not given; an empty one binds
    nothing) goes into ``metadata``: a non-object metadata value is kept under
    ``original_metadata``. The result is a new dict in the kernel's field order and normal form
    (empty optional fields left out).

    Raises :class:`ChioWireError` for unknown fields, wrong types, unsignable semantics (e.g. a
    mediated decision without a decision), or a ``kernel_key`` that is not the signer's.
    """
    new_id, view, message = _signed_view(body, signing_key, nonce)
    signature = _sign(signing_key, message)
    # A deep copy: later changes to the caller's body must not reach the signed receipt.
    return copy.deepcopy({"id": new_id, **_in_struct_order(view), "signature": signature})


def sign_kernel_receipt_text(
    body: Mapping[str, Any], signing_key: KeyPair, *, nonce: str | None = None
) -> tuple[str, str, bytes]:
    """:func:`sign_kernel_receipt` for a step event: ``(receipt id, receipt as compact JSON,
    signed bytes)``, what ``chio_step_payload`` gives for the signed receipt, without the
    receipt's dict (nor its deep copy) and with the body canonicalized once."""
    new_id, view, message = _signed_view(body, signing_key, nonce)
    signature = _sign(signing_key, message)
    receipt = {"id": new_id, **_in_struct_order(view), "signature": signature}
    return new_id, _COMPACT.encode(receipt), message


# json.dumps(separators=(",", ":"), ensure_ascii=False), made once instead of per call.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _signed_view(
    body: Mapping[str, Any], signing_key: SigningKey, nonce: str | None
) -> tuple[str, dict[str, Any], bytes]:
    """The receipt id, the checked id input of ``body`` with the nonce bound, and the bytes the
    signature covers (``JCS({"body": view, "id": id})``, from one canonicalization)."""
    unknown = set(body) - _RECEIPT_INPUT_FIELDS
    if unknown:
        raise ChioWireError(f"fields that a kernel receipt does not sign: {sorted(unknown)}")
    key_hex = _public_hex(signing_key)
    if body.get("kernel_key") is not None and _key_hex(body["kernel_key"], "kernel_key") != key_hex:
        raise ChioWireError("kernel_key is not the public key of the signing key")
    fields = dict(body)
    fields["kernel_key"] = key_hex
    action = dict(_mapping(fields.get("action"), "action"))
    if "parameters" not in action:
        raise ChioWireError("action.parameters is missing")
    if fields.get("redaction_mode", "none") == "none":
        expected_hash = parameter_hash(action["parameters"])
        if action.setdefault("parameter_hash", expected_hash) != expected_hash:
            raise ChioWireError("action.parameter_hash is not the hash of action.parameters")
    elif "parameter_hash" not in action:
        # Redacted parameters: the hash is of the parameters the sidecar saw, not of these.
        raise ChioWireError("a redacted receipt needs the parameter_hash of the real parameters")
    fields["action"] = action
    view = _receipt_view(fields)
    semantics = _semantics_error(view)
    if semantics:
        raise ChioWireError(semantics)
    bound = (_new_nonce() if nonce is None else nonce).strip()
    if bound:
        metadata = view.get("metadata")
        if not isinstance(metadata, Mapping):
            metadata = {} if metadata is None else {"original_metadata": metadata}
        view["metadata"] = {**metadata, RECEIPT_NONCE_KEY: bound}
    canonical = canonical_json(view)
    new_id = _sha256_hex(canonical)
    # "body" sorts before "id"; the id is lowercase hex, which JSON writes as is.
    message = b'{"body":' + canonical + b',"id":"' + new_id.encode("ascii") + b'"}'
    return new_id, view, message


def _new_nonce() -> str:
    # The kernel's receipt nonces are ``rcpt-<uuidv7>``.
    return f"rcpt-{uuid7()}"


def _in_struct_order(view: Mapping[str, Any]) -> dict[str, Any]:
    # The kernel's field order, for readers; canonical JSON does not depend on it.
    return {field: view[field] for field in _RECEIPT_ORDER if field in view}


# ---------------------------------------------------------------- capability tokens

_TOKEN_FIELDS: Final = frozenset(
    {
        "schema",
        "id",
        "issuer",
        "subject",
        "scope",
        "issued_at",
        "expires_at",
        "delegation_chain",
        "aggregate_invocation_budget",
        "algorithm",
        "caveats",
        "scope_attenuations",
        "attenuation_proof",
        "budget_share_bps",
        "signature",
    }
)


def _operations(grant: Mapping[str, Any], where: str) -> list[str]:
    operations = grant.get("operations")
    if not isinstance(operations, list | tuple) or any(op not in _OPERATIONS for op in operations):
        raise ChioWireError(f"{where}operations must be a list of {sorted(_OPERATIONS)}")
    return [str(op) for op in operations]


def _amount(value: object, field: str) -> dict[str, Any]:
    amount = _mapping(value, field)
    return {"units": _u64(amount, "units", f"{field}."), "currency": _str(amount, "currency", "")}


def _tool_grant(grant: Mapping[str, Any]) -> dict[str, Any]:
    where = "scope.grants[]."
    out: dict[str, Any] = {
        "server_id": _str(grant, "server_id", where),
        "tool_name": _str(grant, "tool_name", where),
        "operations": _operations(grant, where),
    }
    constraints = _items(grant.get("constraints"), where + "constraints")
    if any(c.get("type") == "require_cumulative_approval_above" for c in constraints):
        raise ChioWireError("cumulative-approval constraints are not supported")
    if constraints:
        out["constraints"] = [dict(c) for c in constraints]
    if grant.get("max_invocations") is not None:
        out["max_invocations"] = _u64(grant, "max_invocations", where)
    for field in ("max_cost_per_invocation", "max_total_cost"):
        if grant.get(field) is not None:
            out[field] = _amount(grant[field], where + field)
    if grant.get("dpop_required") is not None:
        if not isinstance(grant["dpop_required"], bool):
            raise ChioWireError(where + "dpop_required must be a boolean")
        out["dpop_required"] = grant["dpop_required"]
    return out


def _scope(value: object) -> dict[str, Any]:
    """``ChioScope`` as serde re-writes it (capability/scope.rs)."""
    scope = _mapping(value, "scope")
    out: dict[str, Any] = {}
    grants = [_tool_grant(g) for g in _items(scope.get("grants"), "scope.grants")]
    if grants:
        out["grants"] = grants
    for field, name in (("resource_grants", "uri_pattern"), ("prompt_grants", "prompt_name")):
        where = f"scope.{field}[]."
        entries = [
            {name: _str(g, name, where), "operations": _operations(g, where)}
            for g in _items(scope.get(field), "scope." + field)
        ]
        if entries:
            out[field] = entries
    return out


def _link_view(link: Mapping[str, Any]) -> dict[str, Any]:
    """``DelegationLinkBody`` as serde re-writes it (capability/attenuation.rs)."""
    where = "delegation_chain[]."
    if link.get("aggregate_budget") is not None or link.get("cumulative_approval") is not None:
        raise ChioWireError("delegation links with budget or approval markers are not supported")
    out: dict[str, Any] = {
        "capability_id": _str(link, "capability_id", where),
        "delegator": _key_hex(link.get("delegator"), where + "delegator"),
        "delegatee": _key_hex(link.get("delegatee"), where + "delegatee"),
    }
    attenuations = _items(link.get("attenuations"), where + "attenuations")
    if attenuations:
        out["attenuations"] = [dict(a) for a in attenuations]
    out["timestamp"] = _u64(link, "timestamp", where)
    if link.get("scope_hash") is not None:
        out["scope_hash"] = _str(link, "scope_hash", where)
    return out


def _token_view(token: Mapping[str, Any]) -> dict[str, Any]:
    """``CapabilityTokenSigningBody`` of a plain (non-attenuated) token."""
    schema = token.get("schema", CAPABILITY_SCHEMA)
    if schema != CAPABILITY_SCHEMA:
        raise ChioWireError(f"unknown capability schema {schema!r}")
    if token.get("algorithm") not in (None, "ed25519"):
        raise ChioWireError("only Ed25519 capability tokens are supported")
    if token.get("caveats"):
        raise ChioWireError("capability caveats are rejected fail-closed, as by the kernel")
    for field in ("aggregate_invocation_budget", "attenuation_proof", "budget_share_bps"):
        if token.get(field) is not None:
            raise ChioWireError(f"tokens carrying {field} are not supported")
    if token.get("scope_attenuations"):
        raise ChioWireError("tokens carrying scope_attenuations are not supported")
    view: dict[str, Any] = {
        "schema": CAPABILITY_SCHEMA,
        "id": _str(token, "id", ""),
        "issuer": _key_hex(token.get("issuer"), "issuer"),
        "subject": _key_hex(token.get("subject"), "subject"),
        "scope": _scope(token.get("scope")),
        "issued_at": _u64(token, "issued_at"),
        "expires_at": _u64(token, "expires_at"),
    }
    # The issuer signs each link whole, the delegator's signature included.
    chain = [
        {**_link_view(link), "signature": _signature_hex(link.get("signature"), "link signature")}
        for link in _items(token.get("delegation_chain"), "delegation_chain")
    ]
    if chain:
        view["delegation_chain"] = chain
    return view


def _chain_error(view: Mapping[str, Any], max_depth: int | None) -> str | None:
    """``validate_delegation_chain`` plus the kernel's leaf-subject check (kernel/validation.rs)."""
    links: list[Mapping[str, Any]] = view.get("delegation_chain", [])
    if not links:
        return None
    if max_depth is not None and len(links) > max_depth:
        return f"delegation depth {len(links)} exceeds {max_depth}"
    for index, link in enumerate(links):
        body = {field: value for field, value in link.items() if field != "signature"}
        if not _verifies(body["delegator"], canonical_json(body), bytes.fromhex(link["signature"])):
            return f"signature invalid at link index {index}"
        if index:
            previous = links[index - 1]
            if previous["delegatee"] != link["delegator"]:
                return f"link {index} delegator does not match link {index - 1} delegatee"
            if link["timestamp"] < previous["timestamp"]:
                return f"link {index} timestamp precedes link {index - 1} timestamp"
    if links[-1]["delegatee"] != view["subject"]:
        return "leaf capability subject does not match the final delegation delegatee"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CapabilityVerification:
    """What :func:`verify_capability_token` found. Truthy exactly when ``valid``."""

    valid: bool
    """Signature and delegation chain valid and, when a time was given, inside the window."""
    reason: str | None
    signature_valid: bool
    delegation_chain_valid: bool
    time_status: Literal["valid", "expired", "not_yet_valid"] | None
    """``issued_at <= now < expires_at``; ``None`` when no ``now`` was given."""

    def __bool__(self) -> bool:
        return self.valid


def verify_capability_token(
    token: Mapping[str, Any], *, now: int | None = None, max_delegation_depth: int | None = None
) -> CapabilityVerification:
    """Verify a capability token's signatures as the kernel does.

    The issuer's Ed25519 signature over the schema-aware signing body (the pre-schema body is
    also accepted for plain tokens, as ``CapabilityToken::verify_signature`` does); each
    delegation link's signature by its delegator, link continuity, non-decreasing timestamps,
    the optional depth limit, and that the last delegatee is the token's subject. With ``now``
    (unix seconds) the time window is checked too. Stateful kernel checks are the caller's:
    trusted issuers, revocation, and the stored ancestor snapshots of a delegated token.
    Attenuated tokens (``attenuation_proof``, ``scope_attenuations``, ``budget_share_bps``),
    aggregate budgets and caveats are reported as not valid.
    """
    try:
        view = _token_view(token)
        signature = _signature_bytes(token.get("signature"), "signature")
    except ChioWireError as exc:
        return CapabilityVerification(
            valid=False,
            reason=f"malformed or unsupported token: {exc}",
            signature_valid=False,
            delegation_chain_valid=False,
            time_status=None,
        )
    sig_ok = _verifies(view["issuer"], canonical_json(view), signature) or _verifies(
        view["issuer"], canonical_json({k: v for k, v in view.items() if k != "schema"}), signature
    )
    chain_error = _chain_error(view, max_delegation_depth)
    time_status: Literal["valid", "expired", "not_yet_valid"] | None = None
    if now is not None:
        if now < view["issued_at"]:
            time_status = "not_yet_valid"
        elif now >= view["expires_at"]:
            time_status = "expired"
        else:
            time_status = "valid"
    reason = (
        (None if sig_ok else "the issuer signature does not verify")
        or chain_error
        or (None if time_status in (None, "valid") else f"the token is {time_status}")
    )
    return CapabilityVerification(
        valid=reason is None,
        reason=reason,
        signature_valid=sig_ok,
        delegation_chain_valid=chain_error is None,
        time_status=time_status,
    )


def sign_capability_token(body: Mapping[str, Any], issuer_key: SigningKey) -> dict[str, Any]:
    """Sign a plain capability token as ``CapabilityToken::sign`` does.

    ``body`` holds ``id``, ``subject``, ``scope``, ``issued_at``, ``expires_at`` and optionally
    ``delegation_chain`` (signed links, see :func:`sign_delegation_link`) and ``issuer`` (which
    must be ``issuer_key``'s public key). The token comes back in the kernel's normal form with
    ``schema``, so the kernel, :func:`verify_capability_token` and chio-sdk's
    ``chio.invariants.capability.verify_capability`` (which hashes the raw token) all accept it.
    Raises :class:`ChioWireError` for unknown or unsupported fields and wrong types.
    """
    unknown = set(body) - (_TOKEN_FIELDS - {"signature"})
    if unknown:
        raise ChioWireError(f"fields that a capability token does not carry: {sorted(unknown)}")
    if "signature" in body:
        raise ChioWireError("the body is already signed")
    issuer = _public_hex(issuer_key)
    if body.get("issuer") is not None and _key_hex(body["issuer"], "issuer") != issuer:
        raise ChioWireError("issuer is not the public key of the signing key")
    fields = {**body, "issuer": issuer}
    view = _token_view(fields)
    return copy.deepcopy({**view, "signature": _sign(issuer_key, canonical_json(view))})


def sign_delegation_link(body: Mapping[str, Any], delegator_key: SigningKey) -> dict[str, Any]:
    """Sign a delegation link as ``DelegationLink::sign`` does (plain links only).

    ``body`` holds ``capability_id`` (the parent token), ``delegatee``, ``timestamp`` and
    optionally ``attenuations`` and ``scope_hash``; ``delegator`` is ``delegator_key``'s key.
    """
    delegator = _public_hex(delegator_key)
    if body.get("delegator") is not None and (
        _key_hex(body["delegator"], "delegator") != delegator
    ):
        raise ChioWireError("delegator is not the public key of the signing key")
    view = _link_view({**body, "delegator": delegator})
    return {**view, "signature": _sign(delegator_key, canonical_json(view))}
