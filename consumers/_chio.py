"""The Chio receipt check every consumer runs on a step (pure): who may sign, and why not.

A step event (``StepReceipt`` v2) may carry the Chio kernel receipt of its decision
(``chio_receipt`` and its signed bytes ``chio_signed``). :func:`chio_refusal` runs the check of
``schemas.check_chio_step`` on a plain decoded step record and says why the step must be
refused, or nothing. It is the one check the receipt builder, ``verify`` and the SIEM exporter
share, so they agree on every step. The check is compiled (``chio_receipts_native.check_steps``,
which reads the record's fields itself); :func:`step_verdicts` runs it on a whole batch, with
every Ed25519 signature of the batch (the Avro ones too) in one batch equation.

Which steps are accepted (:func:`signed_by`):

* a step signed by our sidecar (``key_id`` and ``signature`` set) must pass the Avro signature
  check, and its Chio receipt, when it carries one, must check too;
* a step whose only signature is its Chio receipt (``key_id`` ``""`` and an empty
  ``signature``: published by a kernel evaluator) is accepted iff that receipt checks;
* a step with neither is refused as unsigned (:data:`UNSIGNED`, dead-letter reason
  ``unsigned_step``): there is no key to look up, so it is not an unknown key.

The trusted signers of Chio receipts are the hex public keys of every key the consumer's
:class:`~chio_receipts.consumers.KeyRing` knows (our sidecars' keys) plus the kernel keys the
operator configured; an unknown ``kernel_key`` makes the caller refresh its key ring once (the
check records which key it missed) before it refuses the step.

Outcome records (``StepOutcome``) carry a Chio ``trace_observation`` receipt signed by the same
keys; :func:`outcome_refusal` runs ``schemas.check_chio_outcome`` under the same trusted keys and
refuses with the same reasons. A record without a receipt is not refused here: the builder keeps
it flagged unsigned (a gate failure the sidecar could not sign).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import chio_receipts_native

from chio_receipts.consumers._dlq import Reason
from chio_receipts.schemas import SIGNATURE_REFUSAL, SignatureCheck, StepStatus

STATUSES = frozenset(status.value for status in StepStatus)

__all__ = [
    "KERNEL_SIGNED",
    "SIDECAR_SIGNED",
    "UNSIGNED",
    "UNSIGNED_DETAIL",
    "ChioRefusal",
    "StepVerdict",
    "chio_refusal",
    "outcome_refusal",
    "outcome_refusals",
    "parse_kernel_keys",
    "signature_refusal",
    "signed_by",
    "step_verdicts",
]

SIDECAR_SIGNED = "sidecar"
"""The step carries an Avro signature (``key_id`` + ``signature``)."""
KERNEL_SIGNED = "kernel"
"""The step's only signature is its Chio receipt."""
UNSIGNED = "unsigned"
"""Neither: refused as unsigned (``Reason.UNSIGNED_STEP``)."""

UNSIGNED_DETAIL = "UnsignedStep: the step carries neither an Avro signature nor a Chio receipt"
"""The dead letter's error text for an unsigned step."""


def signed_by(record: Mapping[str, Any]) -> str:
    """How the plain step ``record`` is signed: :data:`SIDECAR_SIGNED`, :data:`KERNEL_SIGNED`
    or :data:`UNSIGNED`."""
    if record["key_id"] or record["signature"]:
        return SIDECAR_SIGNED
    return KERNEL_SIGNED if record.get("chio_receipt") else UNSIGNED


def parse_kernel_keys(values: Collection[str]) -> frozenset[str]:
    """Operator-configured kernel keys as lowercase hex (``0x`` and upper case accepted, as the
    kernel reads them); a value that is not 32 bytes of hex raises ``ValueError``."""
    keys: set[str] = set()
    for value in values:
        text = value.strip().removeprefix("0x").removeprefix("0X").lower()
        if not text:
            continue
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise ValueError(f"a trusted kernel key must be 64 hex digits, got {value!r}")
        keys.add(text)
    return frozenset(keys)


@dataclass(frozen=True, slots=True)
class ChioRefusal:
    """Why a step's Chio receipt is refused: the dead-letter ``reason`` label, the check's own
    explanation, and the untrusted ``kernel_key`` when that is the reason."""

    reason: str
    detail: str
    untrusted_key: str | None = None

    def error(self) -> str:
        """The dead letter's error text (its ``detail`` header)."""
        return f"ChioReceipt: {self.detail}"


StepVerdict = Literal[False] | ChioRefusal | None
"""A step's verdict: None (it holds), False (its Avro signature does not verify), or the refusal
of its Chio receipt."""


def _refusal_of(result: Any) -> ChioRefusal | None:
    # A native result: None, or (detail, untrusted key).
    if result is None:
        return None
    detail, untrusted = result
    if untrusted is not None:
        return ChioRefusal(Reason.UNTRUSTED_KERNEL_KEY, detail, untrusted)
    return ChioRefusal(Reason.BAD_CHIO_RECEIPT, detail)


def _one(result: Any, verify: SignatureCheck | None) -> ChioRefusal | None:
    if verify is not None:
        result, triple = result
        if triple is not None and not verify(*triple):
            return signature_refusal()
    return _refusal_of(result)


def _plain(record: Mapping[str, Any]) -> Any:
    # The native reader takes a dict (or a StepReceipt / StepOutcome) as it is.
    return record if isinstance(record, dict) else dict(record)


def chio_refusal(
    record: Mapping[str, Any], trusted: Collection[str], verify: SignatureCheck | None = None
) -> ChioRefusal | None:
    """Why the plain step ``record``'s Chio receipt does not hold, or None (also for a step
    without one). ``trusted`` holds the lowercase hex public keys allowed to sign receipts.
    ``verify``: the Ed25519 check, when not the native one (``schemas.SignatureCheck``)."""
    if not record.get("chio_receipt"):
        return None
    [result] = chio_receipts_native.check_steps(
        ((_plain(record), None),), trusted, defer=verify is not None
    )
    return _one(result, verify)


def step_verdicts(
    items: Sequence[tuple[Mapping[str, Any], tuple[bytes, bytes, bytes] | Literal[False] | None]],
    trusted: Collection[str],
) -> list[StepVerdict]:
    """Each plain step record's verdict: its Avro signature (``(public_key, message,
    signature)``; ``False`` for a body that is not signed; ``None`` for a step without one),
    then its Chio receipt (when it carries one) as :func:`chio_refusal` checks it. Every Ed25519
    signature of the batch is verified with one batch equation; the GIL is released meanwhile."""
    return [
        r if r is None or r is False else _refusal_of(r)
        for r in chio_receipts_native.check_steps(items, trusted)
    ]


def signature_refusal() -> ChioRefusal:
    """The refusal of a Chio receipt whose Ed25519 signature does not verify (what
    :func:`chio_refusal` says for it when it verifies the signature itself)."""
    return ChioRefusal(Reason.BAD_CHIO_RECEIPT, SIGNATURE_REFUSAL)


def outcome_refusal(
    record: Mapping[str, Any], trusted: Collection[str], verify: SignatureCheck | None = None
) -> ChioRefusal | None:
    """Why the plain outcome ``record``'s Chio receipt does not hold, or None (also for a record
    without one: an unsigned record is the caller's to flag). ``trusted`` and ``verify`` as for
    :func:`chio_refusal`."""
    if not record.get("chio_receipt"):
        return None
    [result] = chio_receipts_native.check_outcomes(
        (_plain(record),), STATUSES, trusted, defer=verify is not None
    )
    return _one(result, verify)


def outcome_refusals(
    records: Sequence[Mapping[str, Any]], trusted: Collection[str]
) -> list[ChioRefusal | None]:
    """:func:`outcome_refusal` of each plain outcome record, their signatures verified with one
    batch equation (the GIL released meanwhile)."""
    return [_refusal_of(r) for r in chio_receipts_native.check_outcomes(records, STATUSES, trusted)]
