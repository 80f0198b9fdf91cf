"""The native step encode and sign (``encode_step``, ``sign_step``) against independent oracles.

fastavro (the schema's reference writer here) gives the bytes; PyNaCl (libsodium) gives the
signatures. For hypothesis-generated step receipts: the native body is fastavro's, the native
signature is PyNaCl's over the same signed bytes, and each verifies with the other's verifier.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import chio_receipts_native as native
import fastavro
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chio_receipts.schemas as schemas
from chio_receipts.schemas._avro import parsed_schema
from chio_receipts.schemas._signing import seal_receipt
from tests.support.avro_strategies import normalize, sample_step, strategy

pytestmark = pytest.mark.unit

STEP = schemas.STEP_SCHEMA
_SIG_PREFIX = b"\x80\x01"


def _fastavro(receipt: schemas.StepReceipt, key_id: str, signature: bytes) -> bytes:
    record = receipt.to_avro()
    record["key_id"] = key_id
    record["signature"] = signature
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema(STEP), record)
    return buf.getvalue()


receipts = strategy(schemas.raw_schema(STEP)).map(
    lambda record: schemas.StepReceipt.from_avro(normalize(record))
)
seeds = st.binary(min_size=32, max_size=32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(receipts, st.text(max_size=20), st.binary(max_size=80))
def test_encode_is_byte_identical_to_fastavro(
    receipt: schemas.StepReceipt, key_id: str, signature: bytes
) -> None:
    try:
        expected = _fastavro(receipt, key_id, signature)
    except (ValueError, UnicodeEncodeError):  # a lone surrogate: fastavro refuses it
        assert native.encode_step(receipt, key_id, signature) is None
        return
    assert native.encode_step(receipt, key_id, signature) == expected
    framed = schemas.frame(STEP, expected)
    assert framed == schemas.SINGLE_OBJECT_MAGIC + framed[2:10] + expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(receipts, seeds, st.text(max_size=20))
def test_sign_step_is_pynacls_signature_over_fastavros_signed_bytes(
    receipt: schemas.StepReceipt, seed: bytes, key_id: str
) -> None:
    try:
        to_sign = _fastavro(receipt, key_id, b"")
    except (ValueError, UnicodeEncodeError):
        return
    nacl_key = nacl.signing.SigningKey(seed)
    signed = native.sign_step(receipt, key_id, native.Signer(seed))
    assert signed is not None
    signature, body = signed
    assert signature == nacl_key.sign(to_sign).signature
    assert body == to_sign[:-1] + _SIG_PREFIX + signature
    assert body == _fastavro(receipt, key_id, signature)
    # Verifies both ways: PyNaCl checks the native signature, the native core PyNaCl's.
    nacl_key.verify_key.verify(to_sign, signature)
    assert native.verify(bytes(nacl_key.verify_key), to_sign, nacl_key.sign(to_sign).signature)
    assert schemas.verify_body(body, bytes(nacl_key.verify_key))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(receipts, seeds)
def test_keypair_signatures_are_pynacls(receipt: schemas.StepReceipt, seed: bytes) -> None:
    key = schemas.KeyPair.from_seed("k1", seed)
    nacl_key = nacl.signing.SigningKey(seed)
    message = schemas.step_body(receipt)
    assert key.sign(message) == nacl_key.sign(message).signature
    assert key.public_key == bytes(nacl_key.verify_key)
    signed, body = schemas.sign_receipt(receipt, key)
    nacl_key.verify_key.verify(*schemas.signed_body(body) or (b"", b""))
    assert schemas.verify_receipt(signed, {"k1": key.public_key})


def test_a_changed_body_verifies_neither_way() -> None:
    seed = bytes(range(32))
    receipt = sample_step()
    signature, body = native.sign_step(receipt, "k1", native.Signer(seed)) or (b"", b"")
    message, _ = schemas.signed_body(body) or (b"", b"")
    tampered = message.replace(b"charge_card", b"charge_carD", 1)
    assert tampered != message
    with pytest.raises(nacl.exceptions.BadSignatureError):
        nacl.signing.VerifyKey(native.Signer(seed).public_key).verify(tampered, signature)
    assert not native.verify(native.Signer(seed).public_key, tampered, signature)


def test_seal_signs_in_place_as_sign_receipt_signs_a_copy() -> None:
    key = schemas.KeyPair.from_seed("k1", bytes(range(32)))
    unsigned = sample_step()
    copy_signed, copy_body = schemas.sign_receipt(
        dataclasses.replace(unsigned, chio_receipt="{}", latency_us=7), key
    )
    body = seal_receipt(unsigned, key, chio_receipt="{}", latency_us=7)
    assert body == copy_body
    assert unsigned == copy_signed
    assert unsigned.signature == copy_signed.signature
    assert unsigned.key_id == "k1"
    with pytest.raises(TypeError, match="not fields"):
        seal_receipt(sample_step(), key, signature=b"x")


@pytest.mark.parametrize(
    "overrides",
    [
        {"attempt": True},
        {"attempt": 2**31},
        {"verdict": "ALLOW"},
        {"scope": frozenset({"a"})},
        {"latency_us": 1.5},
        {"latency_us": 2**63},
        {"prev_hash": bytearray(b"x")},
        {"is_local": 1},
        {"reason": "lone \ud800 surrogate"},
        {"capability_chain": ("ok", 3)},
    ],
)
def test_values_of_other_types_are_left_to_fastavro(overrides: dict[str, Any]) -> None:
    receipt = sample_step(**overrides)
    assert native.encode_step(receipt, "k", b"") is None
    assert native.sign_step(receipt, "k", native.Signer(bytes(32))) is None


def test_the_fastavro_fallback_still_signs_what_fastavro_encodes() -> None:
    key = schemas.KeyPair.from_seed("k1", bytes(range(32)))
    receipt = sample_step(is_local=1)  # not a bool: fastavro writes it as true
    signed, body = schemas.sign_receipt(receipt, key)
    assert body == _fastavro(receipt, "k1", signed.signature)
    assert schemas.verify_body(body, key.public_key)


def test_the_sidecars_one_pass_kernel_receipt_is_the_two_pass_one() -> None:
    from chio_receipts.schemas._chio_wire import sign_kernel_receipt_text
    from chio_receipts.sidecar import _chio

    key = schemas.KeyPair.from_seed("k1", bytes(range(32)))
    body = _chio.receipt_body(
        timestamp=1_763_000_000,
        token=None,
        capability_id="cap-1",
        tool_server="payments",
        tool_name="charge_card",
        parameters={"args": [{"amount": 1.5, "note": "ünï\x85"}]},
        request_id="chio-temporal-v1:00",
        allowed=False,
        reason="out of scope",
        guard="scope",
        grant_index=None,
    )
    receipt = schemas.sign_kernel_receipt(body, key, nonce="rcpt-fixed")
    receipt_id, text, signed = sign_kernel_receipt_text(body, key, nonce="rcpt-fixed")
    assert (text, signed) == schemas.chio_step_payload(receipt)
    assert receipt_id == receipt["id"]
    assert schemas.verify_kernel_receipt(receipt).valid
    ok, reason = native.verify_kernel_receipt(text, [key.public_key.hex()])
    assert ok, reason
    nacl.signing.VerifyKey(key.public_key).verify(signed, bytes.fromhex(receipt["signature"]))
