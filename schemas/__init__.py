"""The shared contract: Avro schemas, records, canonical encoding and signatures.

Every other package depends on this one; it depends on none of them.
"""

from __future__ import annotations

from schemas._avro import SCHEMA_FILES, encode_body, parsed_schema, raw_schema
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

__all__ = [
    "ENVELOPE_VERSION",
    "SCHEMA_FILES",
    "SIGNATURE_SIZE",
    "STEP_SCHEMA",
    "CompletionSource",
    "KeyPair",
    "Outcome",
    "RunCompletion",
    "StepReceipt",
    "Verdict",
    "chain_root",
    "encode_body",
    "parsed_schema",
    "raw_schema",
    "receipt_hash",
    "run_key",
    "sign_receipt",
    "signed_body",
    "step_body",
    "verify_body",
    "verify_receipt",
]
