"""Outcome records as Chio receipts: how an attempt's body ended, signed and bound (pure).

The Chio kernel records what happens after an allow in three places, none of which fits one
Temporal attempt:

* ``/v1/receipts`` (chio-api-protect 0.1.2) signs a *job* submission (``job_name``,
  ``namespace``, ``job_uid``, pod ``steps``) as an HTTP receipt, not a ``ChioReceipt`` of a tool
  call;
* ``/v1/reconcile`` settles a budget hold at its realized cost, from the trusted tool-server side:
  it records money, not whether the call completed, failed or timed out;
* a receipt's ``content_hash`` is the SHA-256 of the call's output; a plain hash of a small result
  (``true``, an order id) is a dictionary oracle for it.

The receipt model itself has the right kind: a ``trace_observation`` receipt (no decision,
``boundary_class`` ``detect_only``, ``observation_outcome`` ``observed``, ``trust_level``
``verified``) is the kernel's record of something observed rather than decided. So an outcome is a
``StepOutcome`` event carrying a ``trace_observation`` ChioReceipt signed by the key that signed
the decision (our sidecar's), like the decision's own receipt in ``StepReceipt``:

* ``metadata.receipt_context.request_id`` is ``"chio-temporal-v1-outcome:"`` + SHA-256 of the
  fixed JSON array of every field of the event (:func:`outcome_request_id`), so the receipt is
  bound to the attempt, its status, duration and result digest;
* ``metadata.chio_temporal_outcome`` repeats them readably, with ``decision_receipt_id`` and the
  decision's Chio receipt id (the SHA-256 of its signed body): the chain to the decision;
* ``content_hash`` is the kernel's hash of ``null`` (no output is recorded); the keyed digest
  of the result travels in the event and is bound through the request id;
* ``action.parameters`` is ``{}``: the decision's receipt holds the call's parameters.

:func:`check_chio_outcome` is the check the builder, ``verify`` and the SIEM exporter share; it
is compiled (``chio_receipts_native.check_outcomes``, with :func:`outcome_request_id`'s binding),
like the step's (see :mod:`._chio_step` for where its wording departs from Python's).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any, Final

import chio_receipts_native

from chio_receipts.schemas._chio_step import SignatureCheck, chio_step_payload, settle
from chio_receipts.schemas._chio_wire import SigningKey, content_hash, sign_kernel_receipt
from chio_receipts.schemas._records import StepOutcome, StepStatus

__all__ = [
    "OUTCOME_METADATA_KEY",
    "OUTCOME_REQUEST_ID_PREFIX",
    "STATUSES",
    "check_chio_outcome",
    "outcome_receipt_body",
    "outcome_request_id",
    "sign_chio_outcome",
]

OUTCOME_REQUEST_ID_PREFIX: Final = "chio-temporal-v1-outcome:"
OUTCOME_METADATA_KEY: Final = "chio_temporal_outcome"

# The request id binds every field of the event except the receipt itself, in schema order
# (the native ``outcome_request_id``); ``status`` as its symbol, one of these.
STATUSES: Final = frozenset(status.value for status in StepStatus)
_NULL_CONTENT_HASH: Final = content_hash(None)


def outcome_request_id(outcome: StepOutcome) -> str:
    """``"chio-temporal-v1-outcome:"`` + SHA-256 hex of the compact JSON array of every field of
    ``outcome`` but its receipt (schema order, ``status`` as its symbol), computed natively
    (``chio_receipts_native.outcome_request_id``, the check's own binding)."""
    return chio_receipts_native.outcome_request_id(outcome, STATUSES)


def outcome_receipt_body(outcome: StepOutcome, *, policy_hash: str) -> dict[str, Any]:
    """The ``trace_observation`` receipt body (unsigned) that records ``outcome``."""
    return {
        "timestamp": max(outcome.ended_at, 0) // 1_000_000,
        "capability_id": outcome.capability_id,
        "tool_server": outcome.tool_server,
        "tool_name": outcome.tool,
        "action": {"parameters": {}},
        "receipt_kind": "trace_observation",
        "boundary_class": "detect_only",
        "observation_outcome": "observed",
        "tool_origin": "caller_executed",
        "redaction_mode": "none",
        "content_hash": _NULL_CONTENT_HASH,
        "policy_hash": policy_hash,
        "metadata": {
            "receipt_context": {"request_id": outcome_request_id(outcome)},
            OUTCOME_METADATA_KEY: {
                "decision_receipt_id": outcome.decision_receipt_id,
                "decision_chio_id": outcome.decision_chio_id,
                "status": outcome.status.value,
                "error_type": outcome.error_type,
                "duration_us": outcome.duration_us,
                "result_digest": outcome.result_digest,
                "result_key_id": outcome.result_key_id,
            },
        },
        "trust_level": "verified",
    }


def sign_chio_outcome(
    outcome: StepOutcome, signing_key: SigningKey, *, policy_hash: str
) -> StepOutcome:
    """``outcome`` carrying its ``trace_observation`` receipt signed by ``signing_key``."""
    receipt = sign_kernel_receipt(
        outcome_receipt_body(outcome, policy_hash=policy_hash), signing_key
    )
    text, signed = chio_step_payload(receipt)
    return replace(outcome, chio_receipt=text, chio_signed=signed)


def check_chio_outcome(
    outcome: StepOutcome,
    *,
    trusted_keys: Collection[str] | None = None,
    verify: SignatureCheck = chio_receipts_native.verify,
) -> str | None:
    """Why ``outcome``'s receipt does not hold, or ``None`` when it does.

    Checks the signed bytes, id and Ed25519 signature as for a decision (and that the signer is
    trusted, when ``trusted_keys`` is given); that it is a ``trace_observation`` receipt; that
    its request id binds every field of the event; and that capability, tool server and tool are
    the event's. An event without a receipt (an unsigned gate failure) is refused here: callers
    decide whether an unsigned record may stand (see the builder's gap accounting). ``verify``
    is the Ed25519 check (``SignatureCheck``: a batch verifier records it, as for steps).
    """
    if not outcome.chio_receipt:
        return "the outcome record carries no Chio receipt"
    return settle(
        chio_receipts_native.check_outcomes(
            (outcome,), STATUSES, trusted_keys, defer=verify is not chio_receipts_native.verify
        )[0],
        verify,
    )
