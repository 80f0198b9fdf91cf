"""The native Chio check (``check_steps`` / ``check_outcomes``) against the former Python one.

``tests/native/_oracle_check.py`` is the Python check as it was written (its own canonical JSON
writer, ``json``, ``hashlib``, PyNaCl or the native single verify). Hypothesis builds signed
steps and outcome records (signed here with PyNaCl over ``JCS({"body", "id"})``, so a receipt
can hold any body with a valid signature), tampers with each field the check compares, with the
receipt text, its id and signature, the signed bytes, the key and the trusted set, and asserts
the native verdict is the oracle's: the same detail text, the same dead-letter reason and the
same untrusted key, alone and in batches with the Avro signatures.

Where the two are allowed to differ (documented in ``schemas._chio_step``): a refusal that quotes
a parser's error (``chio_receipt is not JSON: ...``) quotes serde_json's, and input only Python's
``json`` reads (NaN, Infinity, lone surrogates) is refused by the native check as not JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import chio_receipts_native as native
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from chio_receipts import schemas
from chio_receipts.consumers._chio import (
    SIDECAR_SIGNED,
    ChioRefusal,
    chio_refusal,
    outcome_refusal,
    signed_by,
)
from chio_receipts.consumers._consumer import _outcome_refusals, _verify_all
from chio_receipts.consumers._wire import Plain, decode_plain
from chio_receipts.schemas import KeyPair, StepOutcome, StepReceipt, StepStatus, Verdict
from chio_receipts.schemas._chio_step import check_signed_receipt
from tests.native import _oracle_check as oracle
from tests.support.avro_strategies import sample_step
from tests.support.consumer_factory import STEP

pytestmark = pytest.mark.unit

KERNEL = nacl.signing.SigningKey(bytes(range(3, 35)))
KERNEL_HEX = KERNEL.verify_key.encode().hex()
ROGUE = nacl.signing.SigningKey(bytes(range(5, 37)))
ROGUE_HEX = ROGUE.verify_key.encode().hex()
SIDECAR = KeyPair.from_seed("ed25519-00000000000000aa", bytes(range(32)))
TRUSTED = frozenset({KERNEL_HEX})
PARSER = "chio_receipt is not JSON: "
CHECK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _nacl(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


# ---------------------------------------------------------------- generation

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    # Floats from 2**64 up are the one pinned difference (see
    # test_a_float_past_u64_reads_as_the_kernel_reads_it); below it both agree.
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: abs(f) < 2.0**64)
    | text
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
exact_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
i64 = st.integers(-(2**63), 2**63 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)

STEP_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "receipt_id": text,
    "namespace": text,
    "workflow_id": text,
    "run_id": text,
    "workflow_type": text,
    "task_queue": text,
    "activity_id": text,
    "activity_type": text,
    "attempt": i32,
    "is_local": st.booleans(),
    "action": text,
    "resource": text,
    "subject": text,
    "capability_chain": st.lists(text, max_size=3).map(tuple),
    "scope": st.lists(text, max_size=3).map(tuple),
    "argument_digest": text,
    "argument_key_id": text,
    "scheduled_at": i64,
    "started_at": i64,
    "evaluated_at": i64,
    "worker_identity": text,
    "prev_hash": st.binary(max_size=32),
    "capability_id": text,
    "tool_server": text,
    "tool": text,
    "verdict": st.sampled_from(list(Verdict)),
    "reason": text,
}


@st.composite
def steps(draw: st.DrawFn) -> StepReceipt:
    chosen = draw(st.sets(st.sampled_from(sorted(STEP_FIELDS)), max_size=6))
    return sample_step(**{name: draw(STEP_FIELDS[name]) for name in chosen})


def sign_body(body: dict[str, Any], key: nacl.signing.SigningKey = KERNEL) -> tuple[str, bytes]:
    """``(chio_receipt, chio_signed)`` of ``body`` signed as the kernel signs: the id is the
    SHA-256 of the body's canonical JSON, the signature covers ``JCS({"body", "id"})``."""
    body_json = oracle.canonical_json(body)
    receipt_id = hashlib.sha256(body_json).hexdigest()
    signed = b'{"body":' + body_json + b',"id":"' + receipt_id.encode() + b'"}'
    receipt = {**body, "id": receipt_id, "signature": key.sign(signed).signature.hex()}
    return json.dumps(receipt, separators=(",", ":"), ensure_ascii=False), signed


def step_body(step: StepReceipt, parameters: Any) -> dict[str, Any]:
    decision: dict[str, Any] = {"verdict": "allow"}
    metadata: dict[str, Any] = {"receipt_context": {"request_id": oracle.request_id_for(step)}}
    if step.verdict is not Verdict.ALLOW:
        decision = {"verdict": "deny", "reason": step.reason, "guard": "capability"}
    if step.verdict is Verdict.PENDING_APPROVAL:
        metadata["approval"] = {"state": "approval_required"}
    if step.verdict is Verdict.UNKNOWN:
        decision = {"verdict": "cancelled"}
    return {
        "timestamp": 1_763_000_000,
        "capability_id": step.capability_id,
        "tool_server": step.tool_server,
        "tool_name": step.tool,
        "action": {"parameters": parameters, "parameter_hash": oracle.parameter_hash(parameters)},
        "decision": decision,
        "receipt_kind": "mediated_decision",
        "redaction_mode": "none",
        "content_hash": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "policy_hash": "0" * 64,
        "metadata": metadata,
        "kernel_key": KERNEL_HEX,
    }


# Changes to the body before it is signed (the signature holds): (name, change).
def _body_changes(draw: st.DrawFn, body: dict[str, Any]) -> str:
    name = draw(
        st.sampled_from(
            [
                "none",
                "parameter_hash",
                "redacted",
                "no action",
                "action not an object",
                "no metadata",
                "metadata not an object",
                "no context",
                "other request id",
                "capability",
                "tool server",
                "tool name",
                "verdict",
                "approval",
                "reason",
                "no reason",
                "decision not an object",
                "key upper case",
                "key 0x",
                "other key",
                "key not a string",
                "extra field",
                "no parameters",
            ]
        )
    )
    action, metadata = body["action"], body["metadata"]
    if name == "parameter_hash":
        action["parameter_hash"] = draw(st.sampled_from(["0" * 64, 5, None]))
    elif name == "redacted":
        body["redaction_mode"] = draw(st.sampled_from(["hashed", "none", 1]))
        action["parameter_hash"] = "1" * 64
    elif name == "no action":
        del body["action"]
    elif name == "action not an object":
        body["action"] = draw(json_leaf)
    elif name == "no metadata":
        del body["metadata"]
    elif name == "metadata not an object":
        body["metadata"] = draw(st.sampled_from([[1], "m", 3]))
    elif name == "no context":
        metadata["receipt_context"] = draw(st.sampled_from([{}, "x", None]))
    elif name == "other request id":
        metadata["receipt_context"]["request_id"] = draw(text | st.integers())
    elif name == "capability":
        body["capability_id"] = draw(json_leaf)
    elif name == "tool server":
        body["tool_server"] = draw(json_leaf)
    elif name == "tool name":
        body["tool_name"] = draw(json_leaf)
    elif name == "verdict":
        body["decision"]["verdict"] = draw(
            st.sampled_from(["allow", "incomplete", "deny", "other", 1, None])
        )
    elif name == "approval":
        body["decision"] = {"verdict": "deny", "reason": body["decision"].get("reason", "")}
        metadata["approval"] = draw(
            st.sampled_from([{"state": "approval_required"}, {"state": "x"}, "approval_required"])
        )
    elif name == "reason":
        body["decision"]["reason"] = draw(json_leaf)
    elif name == "no reason":
        body["decision"].pop("reason", None)
    elif name == "decision not an object":
        body["decision"] = draw(json_leaf)
    elif name == "key upper case":
        body["kernel_key"] = KERNEL_HEX.upper()
    elif name == "key 0x":
        body["kernel_key"] = draw(st.sampled_from(["0x", "0X", " "])) + KERNEL_HEX
    elif name == "other key":
        body["kernel_key"] = ROGUE_HEX
    elif name == "key not a string":
        body["kernel_key"] = draw(json_leaf)
    elif name == "extra field":
        body[draw(text)] = draw(json_value)
    elif name == "no parameters":
        del action["parameters"]
    return name


# Changes to the receipt text after signing.
def _receipt_change(draw: st.DrawFn, receipt_text: str) -> str:
    receipt = json.loads(receipt_text)
    name = draw(
        st.sampled_from(
            [
                "none",
                "field changed",
                "null field added",
                "empty list added",
                "field added",
                "id removed",
                "id not a string",
                "id length",
                "id non-ascii",
                "signature flipped",
                "signature removed",
                "signature not a string",
                "signature 0x",
                "signature 0X",
                "signature upper case",
                "signature spaced",
                "signature odd",
                "signature short",
                "integer as float",
                "integer as bool",
                "not JSON",
                "not an object",
            ]
        )
    )
    signature = receipt.get("signature", "")
    if name == "field changed":
        key = draw(st.sampled_from(sorted(k for k in receipt if k not in ("id", "signature"))))
        receipt[key] = draw(json_value)
    elif name == "null field added":
        receipt[draw(text)] = None
    elif name == "empty list added":
        receipt[draw(text)] = []
    elif name == "field added":
        receipt[draw(text)] = draw(json_value)
    elif name == "id removed":
        receipt.pop("id")
    elif name == "id not a string":
        receipt["id"] = draw(json_leaf)
    elif name == "id length":
        receipt["id"] = receipt["id"][: draw(st.integers(0, 63))]
    elif name == "id non-ascii":
        receipt["id"] = receipt["id"][:63] + "é"
    elif name == "signature flipped":
        i = draw(st.integers(0, len(signature) - 1))
        receipt["signature"] = (
            signature[:i] + ("1" if signature[i] != "1" else "2") + signature[i + 1 :]
        )
    elif name == "signature removed":
        receipt.pop("signature")
    elif name == "signature not a string":
        receipt["signature"] = draw(json_leaf)
    elif name == "signature 0x":
        receipt["signature"] = "0x" + signature
    elif name == "signature 0X":
        receipt["signature"] = "0X" + signature
    elif name == "signature upper case":
        receipt["signature"] = signature.upper()
    elif name == "signature spaced":
        receipt["signature"] = " ".join(signature[i : i + 2] for i in range(0, 128, 2)) + "\n"
    elif name == "signature odd":
        receipt["signature"] = signature[:-1]
    elif name == "signature short":
        receipt["signature"] = signature[:-2]
    elif name == "integer as float":
        receipt["timestamp"] = float(receipt.get("timestamp", 0))
    elif name == "integer as bool":
        receipt["n"] = 1
        receipt_text = json.dumps(receipt, separators=(",", ":"), ensure_ascii=False)
        return name + ":" + receipt_text.replace('"n":1', '"n":true', 1)
    if name == "not JSON":
        return name + ":" + receipt_text[: draw(st.integers(0, len(receipt_text) - 1))]
    if name == "not an object":
        return name + ":" + json.dumps([receipt])
    return name + ":" + json.dumps(receipt, separators=(",", ":"), ensure_ascii=False)


def _signed_change(draw: st.DrawFn, signed: bytes) -> bytes:
    name = draw(st.sampled_from(["none"] * 4 + ["flip", "truncate", "prefix", "empty", "suffix"]))
    if name == "flip":
        i = draw(st.integers(0, len(signed) - 1))
        return signed[:i] + bytes([signed[i] ^ 1]) + signed[i + 1 :]
    if name == "truncate":
        return signed[: draw(st.integers(0, len(signed) - 1))]
    if name == "prefix":
        return b'{"body" :' + signed[8:]
    if name == "empty":
        return b""
    if name == "suffix":
        return signed[:-2] + b"'}"
    return signed


def _signer(draw: st.DrawFn, body: dict[str, Any]) -> nacl.signing.SigningKey:
    """The key ``body`` names, now and then the other one (a signature that does not verify)."""
    own = ROGUE if body.get("kernel_key") == ROGUE_HEX else KERNEL
    return draw(st.sampled_from([own] * 7 + [ROGUE if own is KERNEL else KERNEL]))


@st.composite
def carried_steps(draw: st.DrawFn) -> tuple[StepReceipt, frozenset[str] | None, str]:
    """A step carrying a receipt, one or more things tampered with, and the trusted keys."""
    step = draw(steps())
    body = step_body(step, draw(json_value))
    if draw(st.booleans()):
        body["action"]["parameters"] = draw(exact_json)
        body["action"]["parameter_hash"] = oracle.parameter_hash(body["action"]["parameters"])
    changes = [_body_changes(draw, body)]
    try:
        receipt_text, signed = sign_body(body, _signer(draw, body))
    except oracle.CanonicalError:
        receipt_text, signed = sign_body(step_body(step, {}))
    if draw(st.integers(0, 2)) == 0:
        changed = _receipt_change(draw, receipt_text)
        name, _, receipt_text = changed.partition(":")
        changes.append(name)
    if draw(st.integers(0, 3)) == 0:
        signed = _signed_change(draw, signed)
    step = dataclasses.replace(step, chio_receipt=receipt_text, chio_signed=signed)
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(STEP_FIELDS)))
        step = dataclasses.replace(step, **{field: draw(STEP_FIELDS[field])})
        changes.append(field)
    trusted = draw(st.sampled_from([TRUSTED, TRUSTED, TRUSTED, frozenset({ROGUE_HEX}), None]))
    return step, trusted, "/".join(changes)


def same(native_detail: str | None, oracle_detail: str | None) -> bool:
    """The same refusal, allowing a parser's own words after ``chio_receipt is not JSON: ``."""
    if oracle_detail is not None and oracle_detail.startswith(PARSER):
        return native_detail is not None and native_detail.startswith(PARSER)
    return native_detail == oracle_detail


def same_refusal(got: ChioRefusal | None, want: ChioRefusal | None) -> bool:
    if got is None or want is None:
        return got is want
    return (
        got.reason == want.reason
        and got.untrusted_key == want.untrusted_key
        and same(got.detail, want.detail)
    )


# ---------------------------------------------------------------- steps


@CHECK
@given(steps(), json_value)
def test_any_parameters_get_the_oracles_verdict(step: StepReceipt, parameters: Any) -> None:
    """Floats included: one whose canonical form reads back as another number (a float that JCS
    writes as an integer beyond 2**53) makes the receipt differ from its body in both checks."""
    receipt_text, signed = sign_body(step_body(step, parameters))
    step = dataclasses.replace(step, chio_receipt=receipt_text, chio_signed=signed)
    want = oracle.check_chio_step(step, trusted_keys=TRUSTED)
    assert schemas.check_chio_step(step, trusted_keys=TRUSTED) == want
    assert schemas.check_chio_step(step, trusted_keys=TRUSTED, verify=_nacl) == want


@CHECK
@given(steps(), exact_json)
def test_a_valid_receipt_holds_in_both(step: StepReceipt, parameters: Any) -> None:
    receipt_text, signed = sign_body(step_body(step, parameters))
    step = dataclasses.replace(step, chio_receipt=receipt_text, chio_signed=signed)
    assert oracle.check_chio_step(step, trusted_keys=TRUSTED) is None
    assert schemas.check_chio_step(step, trusted_keys=TRUSTED) is None
    assert schemas.check_chio_step(step, trusted_keys=TRUSTED, verify=_nacl) is None
    assert chio_refusal(step.to_avro(), TRUSTED) is None


@CHECK
@given(carried_steps())
def test_tampered_steps_get_the_oracles_verdict(case: tuple[StepReceipt, Any, str]) -> None:
    step, trusted, changes = case
    want = oracle.check_chio_step(step, trusted_keys=trusted)
    event(str(want)[:40])
    got = schemas.check_chio_step(step, trusted_keys=trusted)
    assert same(got, want), changes
    assert same(schemas.check_chio_step(step, trusted_keys=trusted, verify=_nacl), want), changes
    record = step.to_avro()
    keys = trusted if trusted is not None else frozenset()
    assert same_refusal(chio_refusal(record, keys), oracle.chio_refusal(record, keys)), changes
    assert same_refusal(
        chio_refusal(record, keys, _nacl), oracle.chio_refusal(record, keys, _nacl)
    ), changes


@CHECK
@given(st.lists(carried_steps(), min_size=1, max_size=12), st.data())
def test_a_batch_gets_the_oracles_verdicts(
    cases: list[tuple[StepReceipt, Any, str]], data: st.DataObject
) -> None:
    checks: list[tuple[Plain, bytes | None]] = []
    for step, _, _ in cases:
        how = data.draw(st.sampled_from(["sidecar", "sidecar", "kernel", "bad avro"]))
        if how == "kernel":
            body = schemas.step_body(dataclasses.replace(step, key_id="", signature=b""))
        else:
            body = schemas.sign_receipt(step, SIDECAR)[1]
            if how == "bad avro":
                body = body[:-3] + bytes([body[-3] ^ 1]) + body[-2:]
        plain = decode_plain(schemas.frame(STEP, body))
        key = SIDECAR.public_key if signed_by(plain.record) == SIDECAR_SIGNED else None
        checks.append((plain, key))
    got = _verify_all(checks, TRUSTED)
    want = oracle.verify_all(checks, TRUSTED)
    assert len(got) == len(want)
    for g, w, (_, _, changes) in zip(got, want, cases, strict=True):
        if isinstance(w, ChioRefusal):
            assert isinstance(g, ChioRefusal), changes
            assert same_refusal(g, w), changes
        else:
            assert g is w, changes


def test_an_avro_body_that_is_not_signed_is_false_without_a_look_at_its_receipt() -> None:
    step = sample_step()
    receipt_text, signed = sign_body(step_body(step, {}))
    step = dataclasses.replace(step, chio_receipt=receipt_text, chio_signed=signed)
    plain = decode_plain(schemas.frame(STEP, schemas.step_body(step)))
    assert _verify_all([(plain, SIDECAR.public_key)], TRUSTED) == [False]
    assert oracle.verify_all([(plain, SIDECAR.public_key)], TRUSTED) == [False]


@CHECK
@given(steps())
def test_the_request_id_is_the_oracles(step: StepReceipt) -> None:
    want = oracle.request_id_for(step)
    assert schemas.request_id_for(step) == want
    assert native.step_request_id(step.to_avro()) == want


def test_numbers_compare_as_python_compares_them() -> None:
    """The body equality is Python's: 1 == 1.0 == true, 2**53 + 1 != 2.0**53."""
    step = sample_step()
    body = step_body(step, {})
    body["n"] = 1
    body["big"] = 2**53 + 1
    receipt_text, signed = sign_body(body)
    for old, new, holds in [
        ('"n":1', '"n":1.0', True),
        ('"n":1', '"n":true', True),
        ('"n":1', '"n":1e0', True),
        ('"n":1', '"n":2', False),
        (f'"big":{2**53 + 1}', f'"big":{float(2**53)}', False),
        (f'"big":{2**53 + 1}', f'"big":{2**53 + 1}.0', False),
    ]:
        assert old in receipt_text
        changed = dataclasses.replace(
            step, chio_receipt=receipt_text.replace(old, new, 1), chio_signed=signed
        )
        want = oracle.check_chio_step(changed)
        assert (want is None) is holds, new
        assert schemas.check_chio_step(changed) == want, new


def test_what_only_pythons_json_reads_is_refused_as_not_json() -> None:
    """The documented departure: NaN, Infinity and lone surrogates are not JSON to serde_json
    (no kernel writes them); Python's ``json`` reads them and refuses the receipt later."""
    step = sample_step()
    receipt_text, signed = sign_body(step_body(step, {}))
    for extra in ('"x":NaN,', '"x":Infinity,', '"x":"\\ud800",', '"x":1e400,'):
        changed = dataclasses.replace(
            step, chio_receipt="{" + extra + receipt_text[1:], chio_signed=signed
        )
        got = schemas.check_chio_step(changed)
        assert got is not None, extra
        assert got.startswith(PARSER), extra
        want = oracle.check_chio_step(changed)
        assert want == "chio_receipt differs from the body it claims was signed", extra


def test_the_parser_text_differs_but_the_verdict_does_not() -> None:
    step = sample_step()
    changed = dataclasses.replace(step, chio_receipt="{", chio_signed=b"")
    got, want = schemas.check_chio_step(changed), oracle.check_chio_step(changed)
    assert got is not None
    assert want is not None
    assert got.startswith(PARSER)
    assert want.startswith(PARSER)


def test_an_unreadable_record_is_refused_as_before() -> None:
    step = sample_step()
    receipt_text, signed = sign_body(step_body(step, {}))
    record = dataclasses.replace(step, chio_receipt=receipt_text, chio_signed=signed).to_avro()
    del record["workflow_id"]
    got = chio_refusal(record, TRUSTED)
    want = oracle.chio_refusal(record, TRUSTED)
    assert got is not None
    assert want is not None
    assert got.reason == want.reason
    assert got.detail.startswith("the step record is not readable: ")
    assert want.detail.startswith("the step record is not readable: ")
    assert "'workflow_id'" in got.detail


def test_an_untrusted_signer_names_its_key_and_a_bad_signature_overrides_it() -> None:
    step = sample_step()
    receipt_text, signed = sign_body(step_body(step, {}) | {"kernel_key": ROGUE_HEX}, ROGUE)
    step = dataclasses.replace(step, chio_receipt=receipt_text, chio_signed=signed)
    refusal = chio_refusal(step.to_avro(), TRUSTED)
    assert refusal == oracle.chio_refusal(step.to_avro(), TRUSTED)
    assert refusal is not None
    assert refusal.untrusted_key == ROGUE_HEX
    assert refusal.detail == f"kernel_key {ROGUE_HEX[:16]}… is not a trusted signer"
    receipt = json.loads(receipt_text)
    receipt["signature"] = "00" * 64
    forged = dataclasses.replace(step, chio_receipt=json.dumps(receipt))
    refusal = chio_refusal(forged.to_avro(), TRUSTED)
    assert refusal == oracle.chio_refusal(forged.to_avro(), TRUSTED)
    assert refusal is not None
    assert refusal.detail == schemas.SIGNATURE_REFUSAL


# ---------------------------------------------------------------- outcomes

OUTCOME_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "outcome_id": text,
    "namespace": text,
    "workflow_id": text,
    "activity_id": text,
    "attempt": i32,
    "is_local": st.booleans(),
    "tool_server": text,
    "tool": text,
    "capability_id": text,
    "decision_receipt_id": text,
    "decision_chio_id": text,
    "status": st.sampled_from(list(StepStatus)),
    "error_type": text,
    "started_at": i64,
    "ended_at": i64,
    "duration_us": i64,
    "result_digest": text,
    "trace_id": text,
    "span_id": text,
}


def _outcome(**overrides: Any) -> StepOutcome:
    fields: dict[str, Any] = {
        "outcome_id": "0190c0de-0000-7000-8000-000000000001",
        "namespace": "default",
        "workflow_id": "order-42",
        "run_id": "run-1",
        "workflow_type": "OrderWorkflow",
        "task_queue": "orders",
        "activity_id": "3",
        "activity_type": "charge_card",
        "attempt": 2,
        "is_local": False,
        "tool_server": "payments",
        "tool": "charge_card",
        "capability_id": "cap-1",
        "decision_receipt_id": "0190c0de-0000-7000-8000-0000000000aa",
        "decision_chio_id": "ab" * 32,
        "status": StepStatus.FAILED,
        "error_type": "CardDeclined",
        "started_at": 1_763_000_000_000_000,
        "ended_at": 1_763_000_000_250_000,
        "duration_us": 250_000,
        "result_key_id": "hmac-1",
        "worker_identity": "worker-1@host",
    }
    fields.update(overrides)
    return StepOutcome(**fields)


@st.composite
def carried_outcomes(draw: st.DrawFn) -> tuple[StepOutcome, frozenset[str], str]:
    chosen = draw(st.sets(st.sampled_from(sorted(OUTCOME_FIELDS)), max_size=5))
    outcome = _outcome(**{name: draw(OUTCOME_FIELDS[name]) for name in chosen})
    body = schemas.outcome_receipt_body(outcome, policy_hash="11" * 32)
    body["kernel_key"] = draw(st.sampled_from([KERNEL_HEX] * 5 + [ROGUE_HEX]))
    body["action"]["parameter_hash"] = oracle.parameter_hash({})
    change = draw(
        st.sampled_from(
            ["none", "kind", "decision", "request id", "capability", "tool", "no metadata"]
        )
    )
    if change == "kind":
        body["receipt_kind"] = draw(st.sampled_from(["mediated_decision", 1]))
    elif change == "decision":
        body["decision"] = {"verdict": "allow"}
    elif change == "request id":
        body["metadata"]["receipt_context"]["request_id"] = draw(text)
    elif change == "capability":
        body["capability_id"] = draw(json_leaf)
    elif change == "tool":
        body["tool_name"] = draw(json_leaf)
    elif change == "no metadata":
        del body["metadata"]
    receipt_text, signed = sign_body(body, _signer(draw, body))
    name = "none"
    if draw(st.integers(0, 2)) == 0:
        name, _, receipt_text = _receipt_change(draw, receipt_text).partition(":")
    if draw(st.integers(0, 3)) == 0:
        signed = _signed_change(draw, signed)
    outcome = dataclasses.replace(outcome, chio_receipt=receipt_text, chio_signed=signed)
    if draw(st.booleans()):
        field = draw(st.sampled_from(sorted(OUTCOME_FIELDS)))
        outcome = dataclasses.replace(outcome, **{field: draw(OUTCOME_FIELDS[field])})
        name += "/" + field
    trusted = draw(st.sampled_from([TRUSTED, TRUSTED, TRUSTED, frozenset({ROGUE_HEX})]))
    return outcome, trusted, change + "/" + name


@CHECK
@given(carried_outcomes())
def test_outcomes_get_the_oracles_verdict(case: tuple[StepOutcome, frozenset[str], str]) -> None:
    outcome, trusted, changes = case
    assert schemas.outcome_request_id(outcome) == oracle.outcome_request_id(outcome)
    want = oracle.check_chio_outcome(outcome, trusted_keys=trusted)
    event(str(want)[:40])
    assert same(schemas.check_chio_outcome(outcome, trusted_keys=trusted), want), changes
    assert same(schemas.check_chio_outcome(outcome, trusted_keys=trusted, verify=_nacl), want), (
        changes
    )
    record = outcome.to_avro()
    assert same_refusal(
        outcome_refusal(record, trusted), oracle.outcome_refusal(record, trusted)
    ), changes


@CHECK
@given(st.lists(carried_outcomes(), min_size=1, max_size=10))
def test_a_batch_of_outcomes_gets_the_oracles_verdicts(
    cases: list[tuple[StepOutcome, frozenset[str], str]],
) -> None:
    messages = [
        type("M", (), {"plain": Plain("StepOutcome", outcome.to_avro(), b"", True)})()
        for outcome, _, _ in cases
    ]
    got = _outcome_refusals(messages, TRUSTED)  # type: ignore[arg-type]
    want = [oracle.outcome_refusal(m.plain.record, TRUSTED) for m in messages]
    for g, w, (_, _, changes) in zip(got, want, cases, strict=True):
        assert same_refusal(g, w), changes


def test_an_outcome_without_a_receipt() -> None:
    outcome = _outcome()
    assert schemas.check_chio_outcome(outcome) == "the outcome record carries no Chio receipt"
    assert outcome_refusal(outcome.to_avro(), TRUSTED) is None
    assert native.check_outcomes([outcome.to_avro()], {"FAILED"}) == [None]


@pytest.mark.unit
def test_a_float_past_u64_reads_as_the_kernel_reads_it() -> None:
    """Pinned difference. The kernel writes the float 2**64 in a signed body as the integer
    literal 18446744073709552000 (ECMAScript's shortest form). Python's ``json`` reads that back
    as an exact int, which is not equal to the float the receipt's own text holds, so the former
    check called the receipt different from its signed body; the native check reads both as the
    kernel's serde does (the same f64) and goes on to the signature."""
    body = {"capability_id": 2.0**64, "kernel_key": "00" * 32, "tool_name": "t"}
    canonical = native.canonical_json_of(body)
    assert b'"capability_id":18446744073709552000' in canonical
    receipt_id = hashlib.sha256(canonical).hexdigest()
    signed = b'{"body":' + canonical + b',"id":"' + receipt_id.encode() + b'"}'
    text = json.dumps({**body, "id": receipt_id, "signature": "00" * 64})
    assert oracle.check_signed_receipt(text, signed, None) == (
        "chio_receipt differs from the body it claims was signed"
    )
    assert check_signed_receipt(text, signed, None) == schemas.SIGNATURE_REFUSAL
