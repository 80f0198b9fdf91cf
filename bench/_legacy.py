"""The schemas hot path as it was before the optimisations, for same-run before/after figures.

Byte-for-byte the behaviour of the first release of ``schemas._records`` / ``schemas._signing``
/ ``schemas._avro`` (dataclasses.fields per call, two record copies per signature, the
logical-type schema for every body, a new VerifyKey per verification).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import fastavro
import nacl.exceptions
import nacl.signing

from chio_receipts.schemas import STEP_SCHEMA, KeyPair, StepReceipt, parsed_schema, signed_body

__all__ = ["encode_body", "sign_receipt", "step_body", "to_avro", "verify_body", "with_signature"]

_SIG_PREFIX = b"\x80\x01"


def to_avro(r: StepReceipt) -> dict[str, Any]:
    """Old ``StepReceipt.to_avro``."""
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r)}
    d["verdict"] = r.verdict.value
    d["capability_chain"] = list(r.capability_chain)
    d["scope"] = list(r.scope)
    return d


def with_signature(r: StepReceipt, *, key_id: str, signature: bytes) -> StepReceipt:
    """Old ``StepReceipt.with_signature``."""
    return dataclasses.replace(r, key_id=key_id, signature=signature)


def encode_body(name: str, record: dict[str, Any]) -> bytes:
    """Old ``encode_body`` (logical-type schema)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema(name), record, strict=True)
    return buf.getvalue()


def step_body(r: StepReceipt) -> bytes:
    """Old ``step_body``."""
    return encode_body(STEP_SCHEMA, to_avro(r))


def sign_receipt(r: StepReceipt, key: KeyPair) -> tuple[StepReceipt, bytes]:
    """Old ``sign_receipt``."""
    unsigned = with_signature(r, key_id=key.key_id, signature=b"")
    to_sign = step_body(unsigned)
    signature = key.sign(to_sign)
    return with_signature(unsigned, key_id=key.key_id, signature=signature), (
        to_sign[:-1] + _SIG_PREFIX + signature
    )


def verify_body(body: bytes, public_key: bytes) -> bool:
    """Old ``verify_body``."""
    parts = signed_body(body)
    if parts is None:
        return False
    message, signature = parts
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True
