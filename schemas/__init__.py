"""The shared contract: Avro schemas, records, canonical encoding and signatures.

Every other package depends on this one; it depends on none of them.
"""

from __future__ import annotations

from schemas._avro import SCHEMA_FILES, encode_body, parsed_schema, raw_schema
from schemas._codec import SINGLE_OBJECT_MAGIC, Decoded, decode, encode, frame, schema_fingerprint
from schemas._errors import (
    DecodeError,
    EncodeError,
    MalformedBody,
    SchemaError,
    UnknownFormat,
    UnknownSchema,
)
from schemas._records import (
    ENVELOPE_VERSION,
    CompletionSource,
    Outcome,
    RunCompletion,
    StepReceipt,
    Verdict,
    run_key,
)
from schemas._signing import (
    SIGNATURE_SIZE,
    STEP_SCHEMA,
    KeyPair,
    chain_root,
    receipt_hash,
    sign_receipt,
    signed_body,
    step_body,
    verify_body,
    verify_receipt,
)
from schemas._sink import ReceiptSink, ReceiptSinkError

__all__ = [
    "ENVELOPE_VERSION",
    "SCHEMA_FILES",
    "SIGNATURE_SIZE",
    "SINGLE_OBJECT_MAGIC",
    "STEP_SCHEMA",
    "CompletionSource",
    "DecodeError",
    "Decoded",
    "EncodeError",
    "KeyPair",
    "MalformedBody",
    "Outcome",
    "ReceiptSink",
    "ReceiptSinkError",
    "RunCompletion",
    "SchemaError",
    "StepReceipt",
    "UnknownFormat",
    "UnknownSchema",
    "Verdict",
    "chain_root",
    "decode",
    "encode",
    "encode_body",
    "frame",
    "parsed_schema",
    "raw_schema",
    "receipt_hash",
    "run_key",
    "schema_fingerprint",
    "sign_receipt",
    "signed_body",
    "step_body",
    "verify_body",
    "verify_receipt",
]
