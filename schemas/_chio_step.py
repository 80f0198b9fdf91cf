"""The Chio receipt inside a step event: how it is bound to the Temporal context, and checked.

A kernel-format receipt (:mod:`._chio_wire`) signs the tool call: capability, tool server, tool,
parameters, decision. It does not name a Temporal run. The step event (``StepReceipt``, schema v2)
carries the Temporal context beside it, and the two are bound by the receipt's
``metadata.receipt_context.request_id``: the worker (or our sidecar) sends the kernel's mediated
``/v1/evaluate`` a ``request_id`` that is the hash of the context (:func:`request_id_for`), and
the sidecar signs it into the receipt. A verifier recomputes that hash from the event's fields, so
moving a receipt to another run, activity, attempt or chain position breaks it. Every Chio sidecar
accepts a caller's ``request_id`` (chio-api-protect 0.1.2 requires a fresh one per call; the
context includes the event's UUIDv7, so it always is).

:func:`check_chio_step` is the hot-path check of the builder, ``verify`` and the SIEM exporter.
It reads the exact signed bytes the event carries (``chio_signed`` = ``JCS({"body", "id"})``), so
it needs no canonicalization of the body: ``JCS`` writes ``"body"`` before ``"id"``, hence the
body's canonical JSON is a slice of those bytes, and the receipt id is its SHA-256. It agrees with
:func:`._chio_wire.verify_kernel_receipt` (and with the kernel's own verifier, which the tests use
as an oracle) on every receipt.

The check itself is compiled: ``chio_receipts_native.check_steps`` (``native/src/check.rs``)
runs it, a batch of steps at a time for the builder, with every Ed25519 signature in one batch
equation. The functions here are its Python face. Where a refusal quotes a parser's own error
(``chio_receipt is not JSON: ...``, ``... is not readable: ...``, ``... no canonical form:
...``), the text after the colon is serde_json's or the native reader's; and receipts that
Python's ``json`` reads but serde_json does not (NaN, Infinity, numbers beyond a double, lone
surrogates, nesting deeper than 128) are refused as not JSON. No kernel writes such a receipt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

import chio_receipts_native

from chio_receipts.schemas._chio_wire import (
    ChioWireError,
    _receipt_signing_bytes,
    _receipt_view,
)
from chio_receipts.schemas._records import StepReceipt, Verdict

__all__ = [
    "APPROVAL_REQUIRED",
    "APPROVAL_SIGNAL",
    "REQUEST_ID_PREFIX",
    "SIGNATURE_REFUSAL",
    "ChioStepFields",
    "SignatureCheck",
    "approval_state",
    "check_chio_step",
    "check_signed_receipt",
    "chio_step_fields",
    "chio_step_payload",
    "chio_verdict",
    "request_id_for",
    "settle",
    "signed_message",
]

REQUEST_ID_PREFIX: Final = "chio-temporal-v1:"
"""Prefix of a ``request_id`` that binds a receipt to a step event's Temporal context."""

# The step fields the request id covers (the native ``step_request_id`` binds them): every field
# known before the decision. Tool server, tool, capability and verdict are in the signed body
# itself (and compared with the step's); a deny's reason is compared with the signed decision's.
# Left unbound: the allow reason (the sidecar's wording), latency_us (measured after the
# decision), and the v1 Avro signature fields.
_BODY_PREFIX: Final = b'{"body":'
_ID_SUFFIX_LEN: Final = len(b',"id":"') + 64 + len(b'"}')

# Decision verdicts that an ALLOW / DENY step may carry. The kernel's mediated route signs an
# authorized call as "incomplete" (authorized before execution, with an execution nonce).
_VERDICTS: Final = {Verdict.ALLOW: ("allow", "incomplete"), Verdict.DENY: ("deny",)}
APPROVAL_REQUIRED: Final = "approval_required"
"""``metadata.approval.state`` of a receipt whose call waits for a person's approval."""
APPROVAL_SIGNAL: Final = "chio_approval"
"""Name of the Temporal signal that brings a person's decision to the waiting workflow."""

SIGNATURE_REFUSAL: Final = "the Chio receipt signature does not verify under kernel_key"
"""Why a carried receipt is refused when its Ed25519 signature does not verify."""

SignatureCheck = Callable[[bytes, bytes, bytes], bool]
"""An Ed25519 check ``(public key, message, signature) -> valid`` (raw bytes). The default is
``chio_receipts_native.verify``; a caller checking many receipts passes one that records the
triple and answers ``True``, then verifies all of them with one ``verify_batch`` and refuses
the receipts whose signature failed with :data:`SIGNATURE_REFUSAL` (every check that follows the
signature's in :func:`check_signed_receipt` is then moot: the signature's refusal comes first)."""


def request_id_for(step: StepReceipt) -> str:
    """The ``request_id`` binding a receipt to ``step``'s Temporal context.

    ``"chio-temporal-v1:"`` + SHA-256 hex of the compact JSON array (``json.dumps`` with
    ``ensure_ascii``, ``","``/``":"`` separators) of the bound fields in this order: receipt_id,
    namespace, workflow_id, run_id, workflow_type, task_queue, activity_id, activity_type,
    attempt, is_local, action, resource, subject, capability_chain (array), scope (array),
    argument_digest, argument_key_id, scheduled_at, started_at, evaluated_at, worker_identity,
    then prev_hash as lowercase hex. It is the project's own digest (the kernel only signs the
    string), so plain JSON of a fixed array is enough: deterministic, no key order to sort.
    Computed natively (``chio_receipts_native.step_request_id``, the check's own binding).
    """
    return chio_receipts_native.step_request_id(step)


def approval_state(receipt: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``metadata.approval`` object of a kernel receipt (``None`` when it has none)."""
    metadata = receipt.get("metadata")
    approval = metadata.get("approval") if isinstance(metadata, Mapping) else None
    return approval if isinstance(approval, Mapping) else None


def chio_verdict(receipt: Mapping[str, Any]) -> Verdict:
    """The step verdict a kernel receipt's decision stands for (UNKNOWN when it is neither).

    The kernel has no pending decision: like its pending-approval response, a receipt of a
    call held for approval is a ``deny`` whose ``metadata.approval.state`` is
    ``approval_required``; it stands for PENDING_APPROVAL."""
    decision = receipt.get("decision")
    verdict = decision.get("verdict") if isinstance(decision, Mapping) else None
    if verdict == "deny":
        approval = approval_state(receipt)
        if approval is not None and approval.get("state") == APPROVAL_REQUIRED:
            return Verdict.PENDING_APPROVAL
    for step_verdict, names in _VERDICTS.items():
        if verdict in names:
            return step_verdict
    return Verdict.UNKNOWN


def signed_message(receipt_id: str, body_json: bytes) -> bytes:
    """``JCS({"body": body, "id": receipt_id})`` from the body's canonical JSON."""
    return _BODY_PREFIX + body_json + b',"id":"' + receipt_id.encode("ascii") + b'"}'


class ChioStepFields:
    """The columns of a step's Chio receipt that analytics keeps (empty for a v1 step)."""

    __slots__ = (
        "boundary_class",
        "content_hash",
        "decision",
        "guard",
        "kernel_key",
        "parameter_hash",
        "policy_hash",
        "receipt_id",
        "receipt_kind",
        "redaction_mode",
        "tool_origin",
        "trust_level",
    )

    def __init__(self, receipt: Mapping[str, Any] | None) -> None:
        r: Mapping[str, Any] = receipt or {}
        decision = _mapping(r.get("decision"))
        action = _mapping(r.get("action"))
        self.receipt_id = str(r.get("id") or "")
        self.receipt_kind = str(r.get("receipt_kind") or "")
        self.boundary_class = str(r.get("boundary_class") or "")
        self.trust_level = str(r.get("trust_level") or "")
        self.tool_origin = str(r.get("tool_origin") or "")
        self.redaction_mode = str(r.get("redaction_mode") or "")
        self.policy_hash = str(r.get("policy_hash") or "")
        self.content_hash = str(r.get("content_hash") or "")
        self.kernel_key = str(r.get("kernel_key") or "")
        self.decision = str(decision.get("verdict") or "")
        self.guard = str(decision.get("guard") or "")
        self.parameter_hash = str(action.get("parameter_hash") or "")


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def chio_step_fields(step: StepReceipt) -> ChioStepFields:
    """The analytics columns of ``step``'s Chio receipt (all empty for a v1 step)."""
    return ChioStepFields(json.loads(step.chio_receipt) if step.chio_receipt else None)


def check_chio_step(
    step: StepReceipt,
    *,
    trusted_keys: Collection[str] | None = None,
    verify: SignatureCheck = chio_receipts_native.verify,
) -> str | None:
    """Why ``step``'s Chio receipt does not hold, or ``None`` when it does.

    Checks, in order: the receipt parses; the signed bytes are ``JCS({"body", "id"})`` of this
    receipt (its id is the SHA-256 of the body, the body is the receipt's); the Ed25519 signature
    of ``kernel_key`` over them; ``kernel_key`` is trusted (when ``trusted_keys``, lowercase hex,
    is given); the parameter hash (unless the sidecar redacted the parameters); the binding
    ``request_id``; and that capability, tool server, tool and verdict are the step's own.
    A step without a Chio receipt (schema v1) is not checked here: it returns ``None``.
    ``verify`` is the Ed25519 check (see :data:`SignatureCheck`). The check is the native
    ``check_steps`` (see the module's docstring for where its wording departs from Python's).
    """
    if not step.chio_receipt:
        return None
    return settle(
        chio_receipts_native.check_steps(
            ((step, None),), trusted_keys, defer=verify is not chio_receipts_native.verify
        )[0],
        verify,
    )


def settle(result: Any, verify: SignatureCheck = chio_receipts_native.verify) -> str | None:
    """The refusal text of one native check result (``None`` when it holds). With a ``verify``
    other than the native one the result was computed with ``defer=True``: ``(verdict,
    triple)``, and the receipt's signature is checked here with ``verify``."""
    if verify is not chio_receipts_native.verify:
        result, triple = result
        if triple is not None and not verify(*triple):
            return SIGNATURE_REFUSAL
    return None if result is None else str(result[0])


def check_signed_receipt(
    chio_receipt: str,
    signed: bytes,
    trusted_keys: Collection[str] | None,
    *,
    verify: SignatureCheck = chio_receipts_native.verify,
) -> dict[str, Any] | str:
    """The signed body of a carried Chio receipt, or why it does not hold.

    ``chio_receipt`` is the receipt's compact JSON and ``signed`` the bytes its signature covers
    (``JCS({"body", "id"})``). Checks that the receipt parses; that ``signed`` is the signed
    message of this receipt (its id is the SHA-256 of the body, the body is the receipt's); the
    Ed25519 signature of ``kernel_key`` over it; and that ``kernel_key`` is trusted (when
    ``trusted_keys``, lowercase hex, is given). The check is the native ``check_signed``.
    ``verify`` is the Ed25519 check (see :data:`SignatureCheck`).
    """
    why = settle(
        chio_receipts_native.check_signed(
            chio_receipt, signed, trusted_keys, defer=verify is not chio_receipts_native.verify
        ),
        verify,
    )
    if why is not None:
        return why
    body: dict[str, Any] = json.loads(signed[len(_BODY_PREFIX) : -_ID_SUFFIX_LEN])
    return body


def chio_step_payload(receipt: Mapping[str, Any]) -> tuple[str, bytes]:
    """``(chio_receipt, chio_signed)`` of a signed receipt, for a step event.

    The receipt is kept as compact JSON exactly as received (every field, in its order); the
    signed message is computed once here, by the producer, so verifiers need not.
    """
    try:
        view = _receipt_view(receipt)
    except ChioWireError as exc:
        raise ChioWireError(f"the sidecar's receipt cannot be carried: {exc}") from exc
    text = json.dumps(receipt, separators=(",", ":"), ensure_ascii=False)
    return text, _receipt_signing_bytes(str(receipt.get("id", "")), view)
