"""The shared contract: Avro schemas, records, canonical encoding and signatures.

Every other package depends on this one; it depends on none of them.
"""

from __future__ import annotations

from schemas._avro import SCHEMA_FILES, encode_body, parsed_schema, raw_schema
from schemas._codec import (
    SINGLE_OBJECT_MAGIC,
    Decoded,
    decode,
    encode,
    frame,
    read_body,
    schema_fingerprint,
)
from schemas._compat import check_backward, incompatibilities, released_schemas
from schemas._confluent import (
    CONFLUENT_MAGIC,
    Codec,
    WireFormat,
    confluent_frame,
    confluent_schema_id,
    standalone_schema,
)
from schemas._errors import (
    DecodeError,
    EncodeError,
    MalformedBody,
    RegistryError,
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
from schemas._registry import SchemaRegistryClient, SubjectStrategy, subject_name
from schemas._signing import (
    SIGNATURE_SIZE,
    STEP_SCHEMA,
    KeyPair,
    chain_root,
    receipt_hash,
    sign_new_receipt,
    sign_receipt,
    signed_body,
    step_body,
    verify_body,
    verify_receipt,
)
from schemas._sink import ReceiptSink, ReceiptSinkError
from schemas._stepcodec import avro_long

__all__ = [
    "CONFLUENT_MAGIC",
    "ENVELOPE_VERSION",
    "SCHEMA_FILES",
    "SIGNATURE_SIZE",
    "SINGLE_OBJECT_MAGIC",
    "STEP_SCHEMA",
    "Codec",
    "CompletionSource",
    "DecodeError",
    "Decoded",
    "EncodeError",
    "KeyPair",
    "MalformedBody",
    "Outcome",
    "ReceiptSink",
    "ReceiptSinkError",
    "RegistryError",
    "RunCompletion",
    "SchemaError",
    "SchemaRegistryClient",
    "StepReceipt",
    "SubjectStrategy",
    "UnknownFormat",
    "UnknownSchema",
    "Verdict",
    "WireFormat",
    "avro_long",
    "chain_root",
    "check_backward",
    "confluent_frame",
    "confluent_schema_id",
    "decode",
    "encode",
    "encode_body",
    "frame",
    "incompatibilities",
    "parsed_schema",
    "raw_schema",
    "read_body",
    "receipt_hash",
    "released_schemas",
    "run_key",
    "schema_fingerprint",
    "sign_new_receipt",
    "sign_receipt",
    "signed_body",
    "standalone_schema",
    "step_body",
    "subject_name",
    "verify_body",
    "verify_receipt",
]
