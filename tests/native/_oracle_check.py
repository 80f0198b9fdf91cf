"""The Chio receipt check as it was written in Python, kept as the oracle of the native one.

The product checks steps and outcome records with ``chio_receipts_native.check_steps`` /
``check_outcomes`` (``schemas.check_chio_step``, ``consumers._chio.chio_refusal`` and the
builder's ``_verify_all`` call them). This module is the former pure-Python implementation, line
for line, with the former Python canonical JSON writer (``_canonical_oracle``, RFC 8785 as the
kernel writes it), so that the tests compare the native check with an independent one. It is
test code: nothing in the product imports it.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Final

import chio_receipts_native

from chio_receipts.consumers._chio import ChioRefusal
from chio_receipts.consumers._dlq import Reason
from chio_receipts.consumers._wire import Plain
from chio_receipts.schemas import StepOutcome, StepReceipt, Verdict, signed_body
from tests.native._canonical_oracle import OracleError as CanonicalError
from tests.native._canonical_oracle import canonical_json

SignatureCheck = Callable[[bytes, bytes, bytes], bool]

SIGNATURE_REFUSAL: Final = "the Chio receipt signature does not verify under kernel_key"
REQUEST_ID_PREFIX: Final = "chio-temporal-v1:"
OUTCOME_REQUEST_ID_PREFIX: Final = "chio-temporal-v1-outcome:"
APPROVAL_REQUIRED: Final = "approval_required"


def parameter_hash(parameters: object) -> str:
    return hashlib.sha256(canonical_json(parameters)).hexdigest()


# ---------------------------------------------------------------- request ids

_STEP_BOUND: Final = (
    "receipt_id",
    "namespace",
    "workflow_id",
    "run_id",
    "workflow_type",
    "task_queue",
    "activity_id",
    "activity_type",
    "attempt",
    "is_local",
    "action",
    "resource",
    "subject",
    "capability_chain",
    "scope",
    "argument_digest",
    "argument_key_id",
    "scheduled_at",
    "started_at",
    "evaluated_at",
    "worker_identity",
)
_get_step_bound = operator.attrgetter(*_STEP_BOUND)
_CHAIN: Final = _STEP_BOUND.index("capability_chain")
_SCOPE: Final = _STEP_BOUND.index("scope")

_OUTCOME_BOUND: Final = (
    "outcome_id",
    "namespace",
    "workflow_id",
    "run_id",
    "workflow_type",
    "task_queue",
    "activity_id",
    "activity_type",
    "attempt",
    "is_local",
    "tool_server",
    "tool",
    "capability_id",
    "decision_receipt_id",
    "decision_chio_id",
    "status",
    "error_type",
    "started_at",
    "ended_at",
    "duration_us",
    "result_digest",
    "result_key_id",
    "worker_identity",
    "trace_id",
    "span_id",
)
_get_outcome_bound = operator.attrgetter(*_OUTCOME_BOUND)
_STATUS: Final = _OUTCOME_BOUND.index("status")


def request_id_for(step: StepReceipt) -> str:
    values = list(_get_step_bound(step))
    values[_CHAIN] = list(values[_CHAIN])
    values[_SCOPE] = list(values[_SCOPE])
    values.append(step.prev_hash.hex())
    text = json.dumps(values, ensure_ascii=True, separators=(",", ":"))
    return REQUEST_ID_PREFIX + hashlib.sha256(text.encode("ascii")).hexdigest()


def outcome_request_id(outcome: StepOutcome) -> str:
    values = list(_get_outcome_bound(outcome))
    values[_STATUS] = outcome.status.value
    text = json.dumps(values, ensure_ascii=True, separators=(",", ":"))
    return OUTCOME_REQUEST_ID_PREFIX + hashlib.sha256(text.encode("ascii")).hexdigest()


# ---------------------------------------------------------------- the checks

_BODY_PREFIX: Final = b'{"body":'
_ID_SUFFIX_LEN: Final = len(b',"id":"') + 64 + len(b'"}')
_VERDICTS: Final = {Verdict.ALLOW: ("allow", "incomplete"), Verdict.DENY: ("deny",)}


def chio_verdict(receipt: Mapping[str, Any]) -> Verdict:
    decision = receipt.get("decision")
    verdict = decision.get("verdict") if isinstance(decision, Mapping) else None
    if verdict == "deny":
        metadata = receipt.get("metadata")
        approval = metadata.get("approval") if isinstance(metadata, Mapping) else None
        if isinstance(approval, Mapping) and approval.get("state") == APPROVAL_REQUIRED:
            return Verdict.PENDING_APPROVAL
    for step_verdict, names in _VERDICTS.items():
        if verdict in names:
            return step_verdict
    return Verdict.UNKNOWN


def _normal(receipt: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in receipt.items()
        if k not in ("id", "signature") and v is not None and v != []
    }


def _native_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    return chio_receipts_native.verify(public_key, message, signature)


def check_signed_receipt(
    chio_receipt: str,
    signed: bytes,
    trusted_keys: Collection[str] | None,
    *,
    verify: SignatureCheck = _native_verify,
) -> dict[str, Any] | str:
    try:
        receipt = json.loads(chio_receipt)
    except ValueError as exc:
        return f"chio_receipt is not JSON: {exc}"
    if not isinstance(receipt, dict):
        return "chio_receipt is not a JSON object"
    claimed = receipt.get("id")
    if not isinstance(claimed, str) or len(claimed) != 64:
        return "chio_receipt has no receipt id"
    if (
        len(signed) <= len(_BODY_PREFIX) + _ID_SUFFIX_LEN
        or not signed.startswith(_BODY_PREFIX)
        or signed[-_ID_SUFFIX_LEN:] != b',"id":"' + claimed.encode("ascii", "replace") + b'"}'
    ):
        return "chio_signed is not the signed message of this receipt"
    body_json = signed[len(_BODY_PREFIX) : -_ID_SUFFIX_LEN]
    if hashlib.sha256(body_json).hexdigest() != claimed:
        return "the receipt id is not the hash of the signed body"
    try:
        body = json.loads(body_json)
    except ValueError:
        return "chio_signed does not hold a JSON body"
    if not isinstance(body, dict) or body != _normal(receipt):
        return "chio_receipt differs from the body it claims was signed"
    key_hex = str(body.get("kernel_key", "")).removeprefix("0x").lower()
    signature = receipt.get("signature")
    if not _signature_verifies(key_hex, signed, signature, verify):
        return SIGNATURE_REFUSAL
    if trusted_keys is not None and key_hex not in trusted_keys:
        return f"kernel_key {key_hex[:16]}… is not a trusted signer"
    return body


def _signature_verifies(
    key_hex: str, message: bytes, signature: object, verify: SignatureCheck
) -> bool:
    if not isinstance(signature, str) or len(key_hex) != 64:
        return False
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        key = bytes.fromhex(key_hex)
    except ValueError:
        return False
    return verify(key, message, raw)


def check_chio_step(
    step: StepReceipt,
    *,
    trusted_keys: Collection[str] | None = None,
    verify: SignatureCheck = _native_verify,
) -> str | None:
    if not step.chio_receipt:
        return None
    checked = check_signed_receipt(step.chio_receipt, step.chio_signed, trusted_keys, verify=verify)
    if isinstance(checked, str):
        return checked
    body = checked
    action = body.get("action")
    if not isinstance(action, dict):
        return "the Chio receipt has no action"
    if body.get("redaction_mode", "none") == "none":
        try:
            if parameter_hash(action.get("parameters")) != action.get("parameter_hash"):
                return "parameter_hash does not match the receipt's parameters"
        except CanonicalError as exc:
            return f"the receipt's parameters have no canonical form: {exc}"
    metadata = body.get("metadata")
    context = metadata.get("receipt_context") if isinstance(metadata, dict) else None
    if not isinstance(context, dict) or context.get("request_id") != request_id_for(step):
        return "the Chio receipt is not bound to this step's Temporal context"
    if body.get("capability_id") != step.capability_id:
        return "the Chio receipt names another capability"
    if body.get("tool_server") != step.tool_server or body.get("tool_name") != step.tool:
        return "the Chio receipt names another tool"
    if chio_verdict(body) is not step.verdict:
        return "the Chio receipt's decision is not the step's verdict"
    decision = body.get("decision")
    if step.verdict in (Verdict.DENY, Verdict.PENDING_APPROVAL) and (
        not isinstance(decision, dict) or decision.get("reason", "") != step.reason
    ):
        return "the step's deny reason is not the one the Chio receipt signed"
    return None


def check_chio_outcome(
    outcome: StepOutcome,
    *,
    trusted_keys: Collection[str] | None = None,
    verify: SignatureCheck = _native_verify,
) -> str | None:
    if not outcome.chio_receipt:
        return "the outcome record carries no Chio receipt"
    checked = check_signed_receipt(
        outcome.chio_receipt, outcome.chio_signed, trusted_keys, verify=verify
    )
    if isinstance(checked, str):
        return checked
    body = checked
    if body.get("receipt_kind") != "trace_observation" or "decision" in body:
        return "the outcome's Chio receipt is not a trace observation"
    metadata = body.get("metadata")
    context = metadata.get("receipt_context") if isinstance(metadata, dict) else None
    if not isinstance(context, dict) or context.get("request_id") != outcome_request_id(outcome):
        return "the Chio receipt is not bound to this outcome record"
    if body.get("capability_id") != outcome.capability_id:
        return "the Chio receipt names another capability"
    if body.get("tool_server") != outcome.tool_server or body.get("tool_name") != outcome.tool:
        return "the Chio receipt names another tool"
    return None


# ---------------------------------------------------------------- the consumer's refusals


class _Trust(Collection[str]):
    __slots__ = ("keys", "missed")

    def __init__(self, keys: Collection[str]) -> None:
        self.keys = keys
        self.missed: str | None = None

    def __contains__(self, key: object) -> bool:
        if key in self.keys:
            return True
        self.missed = str(key)
        return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _refusal(
    record: Mapping[str, Any],
    trusted: Collection[str],
    kind: str,
    parse: Callable[[dict[str, Any]], Any],
    check: Callable[..., str | None],
) -> ChioRefusal | None:
    if not record.get("chio_receipt"):
        return None
    try:
        parsed = parse(dict(record))
    except (KeyError, TypeError, ValueError) as exc:
        return ChioRefusal(Reason.BAD_CHIO_RECEIPT, f"the {kind} record is not readable: {exc}")
    trust = _Trust(trusted)
    why = check(parsed, trusted_keys=trust)
    if why is None:
        return None
    if trust.missed is not None:
        return ChioRefusal(Reason.UNTRUSTED_KERNEL_KEY, why, trust.missed)
    return ChioRefusal(Reason.BAD_CHIO_RECEIPT, why)


def chio_refusal(
    record: Mapping[str, Any], trusted: Collection[str], verify: SignatureCheck = _native_verify
) -> ChioRefusal | None:
    return _refusal(
        record,
        trusted,
        "step",
        StepReceipt.from_avro,
        lambda step, trusted_keys: check_chio_step(step, trusted_keys=trusted_keys, verify=verify),
    )


def outcome_refusal(
    record: Mapping[str, Any], trusted: Collection[str], verify: SignatureCheck = _native_verify
) -> ChioRefusal | None:
    return _refusal(
        record,
        trusted,
        "outcome",
        StepOutcome.from_avro,
        lambda outcome, trusted_keys: check_chio_outcome(
            outcome, trusted_keys=trusted_keys, verify=verify
        ),
    )


class _Recorded:
    """An Ed25519 check that records its triple for the batch and answers True."""

    __slots__ = ("index", "triples")

    def __init__(self, triples: list[tuple[bytes, bytes, bytes]]) -> None:
        self.triples = triples
        self.index = -1

    def __call__(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        self.index = len(self.triples)
        self.triples.append((public_key, message, signature))
        return True


Verdict_ = ChioRefusal | bool | None


def verify_all(
    checks: Sequence[tuple[Plain, bytes | None]], trusted: frozenset[str]
) -> list[ChioRefusal | bool | None]:
    """The builder's former ``_verify_all``: the Python check per step, every signature of the
    batch settled by one native ``verify_batch``."""
    triples: list[tuple[bytes, bytes, bytes]] = []
    plans: list[tuple[int, int, ChioRefusal | None] | None] = []
    for plain, key in checks:
        avro = -1
        if key is not None:
            parts = signed_body(plain.body)
            if parts is None:
                plans.append(None)
                continue
            avro = len(triples)
            triples.append((key, *parts))
        chio, refusal = -1, None
        if plain.record["chio_receipt"]:
            recorded = _Recorded(triples)
            refusal = chio_refusal(plain.record, trusted, recorded)
            chio = recorded.index
        plans.append((avro, chio, refusal))
    valid = chio_receipts_native.verify_batch(triples)
    out: list[ChioRefusal | bool | None] = []
    for plan in plans:
        if plan is None:
            out.append(False)
            continue
        avro, chio, refused = plan
        if avro >= 0 and not valid[avro]:
            out.append(False)
        elif chio >= 0 and not valid[chio]:
            out.append(ChioRefusal(Reason.BAD_CHIO_RECEIPT, SIGNATURE_REFUSAL))
        else:
            out.append(refused)
    return out
