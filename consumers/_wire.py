"""Decoding of the input topics on the hot path, and the Avro primitives the envelope needs.

``schemas.decode`` converts logical types (uuid, timestamp-micros) into Python objects, which
doubles the codec's cost. Messages written with the *current* schema are therefore read here with
a copy of the schema stripped of logical types (ids stay strings, timestamps stay int
microseconds, exactly what the ClickHouse rows need); any other writer schema goes through
``schemas.decode`` (schema resolution) and is normalized to the same plain form.

A consumer's poll batch is decoded with :func:`decode_plain_batch`: the native module
(``chio_receipts_native.PlainDecoder``, GIL released) reads the single-object messages of the
steps and runs topics' current schemas; whatever it does not settle (Confluent frames, older
writer versions, and every message it refuses) is read by :func:`decode_plain`, so a refused
message raises exactly the error (class and text) it always did.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import fastavro
from chio_receipts_native import PlainDecoder
from fastavro.types import Schema

from chio_receipts.schemas import (
    SCHEMA_FILES,
    SINGLE_OBJECT_MAGIC,
    Codec,
    Decoded,
    DecodeError,
    MalformedBody,
    RunCompletion,
    StepOutcome,
    StepReceipt,
    UnknownFormat,
    avro_long,
    current_fingerprints,
    decode,
    raw_schema,
    read_body,
)

__all__ = [
    "ENVELOPE_SCHEMA",
    "RUN_SCHEMA",
    "STEP_OUTCOME_SCHEMA",
    "STEP_SCHEMA",
    "Plain",
    "avro_long",
    "avro_string",
    "decode_plain",
    "decode_plain_batch",
    "encode_plain",
    "envelope_step_body",
    "read_plain",
]

STEP_SCHEMA = "dev.chio.receipts.v1.StepReceipt"
STEP_OUTCOME_SCHEMA = "dev.chio.receipts.v1.StepOutcome"
RUN_SCHEMA = "dev.chio.receipts.v1.RunCompletion"
ENVELOPE_SCHEMA = "dev.chio.receipts.v1.WorkflowReceipt"
_HEADER = len(SINGLE_OBJECT_MAGIC) + 8


@dataclass(frozen=True, slots=True)
class Plain:
    """A decoded input event: schema name, plain record (no logical types), body as sent, and
    whether the body was written with the current schema."""

    schema_name: str
    record: dict[str, Any]
    body: bytes
    current: bool


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


@cache
def _plain_schemas() -> dict[str, Schema]:
    named: dict[str, Any] = {}
    out: dict[str, Schema] = {}
    for name in SCHEMA_FILES:
        out[name] = fastavro.parse_schema(_strip(raw_schema(name)), named_schemas=named)
    return out


def decode_plain(value: bytes, codec: Codec | None = None) -> Plain:
    """Decode a framed event; raises the ``schemas.DecodeError`` subclasses for bad input.

    Confluent-framed messages (first byte 00) need ``codec`` with their writer schema id already
    fetched (``Codec.decode_async``)."""
    if value[:1] == b"\x00" and codec is not None:
        decoded = codec.decode(value)
        return Plain(decoded.schema_name, _normalize(decoded), decoded.body, False)
    if len(value) < _HEADER or value[:2] != SINGLE_OBJECT_MAGIC:
        raise UnknownFormat(
            f"not an Avro single-object message (first bytes {value[:2].hex() or 'none'})"
        )
    name = current_fingerprints().get(value[2:_HEADER])
    if name is None:
        # Another writer version (resolution) or an unknown fingerprint (UnknownSchema).
        decoded = decode(value)
        return Plain(decoded.schema_name, _normalize(decoded), decoded.body, False)
    # Same checks as schemas.decode (trailing bytes, Avro int range), no logical-type conversion.
    decoded = read_body(name, _plain_schemas()[name], value[_HEADER:], resolve=False)
    return Plain(name, decoded.record, decoded.body, True)


# The schemas a consumer's input topics carry, decoded natively when written with the current
# schema (SCHEMA_FILES order: a schema may refer to the named types of those before it).
_NATIVE_SCHEMAS = (STEP_SCHEMA, STEP_OUTCOME_SCHEMA, RUN_SCHEMA)


@cache
def _native() -> PlainDecoder:
    fingerprints = current_fingerprints()
    return PlainDecoder(
        [
            (
                name,
                json.dumps(_strip(raw_schema(name))),
                [fp for fp, of in fingerprints.items() if of == name],
            )
            for name in SCHEMA_FILES
            if name in _NATIVE_SCHEMAS
        ]
    )


def decode_plain_batch(
    values: Sequence[bytes], codec: Codec | None = None
) -> list[Plain | DecodeError]:
    """:func:`decode_plain` of each of ``values``: its :class:`Plain`, or the ``DecodeError`` it
    raises (returned, not raised). The messages of the current step, outcome and completion
    schemas are read natively in one call; any other, and any the native reader refuses, are
    read by :func:`decode_plain`, which gives the same result or raises the same error (the
    oracle tests hold the two readers to that)."""
    out: list[Plain | DecodeError] = []
    ok = PlainDecoder.OK
    for value, (code, name, record, body) in zip(
        values, _native().decode_batch(values), strict=True
    ):
        if code == ok:
            out.append(Plain(name, record, body, True))
            continue
        try:
            out.append(decode_plain(value, codec))
        except DecodeError as exc:
            out.append(exc)
    return out


def _normalize(decoded: Decoded) -> dict[str, Any]:
    record = decoded.record
    try:
        if decoded.schema_name == STEP_SCHEMA:
            plain = StepReceipt.from_avro(record).to_avro()
            # A v1 writer has no chio_signed: schema resolution fills in the default, which
            # fastavro reads as "" (str) for a bytes field. Bytes, as a v2 writer's record.
            signed = plain["chio_signed"]
            if isinstance(signed, str):
                plain["chio_signed"] = signed.encode("latin-1")
            return plain
        if decoded.schema_name == RUN_SCHEMA:
            return RunCompletion.from_avro(record).to_avro()
        if decoded.schema_name == STEP_OUTCOME_SCHEMA:
            return StepOutcome.from_avro(record).to_avro()
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedBody(f"{decoded.schema_name}: {exc}") from exc
    # Any other record (the envelope): logical types back to their plain values.
    plain_record: dict[str, Any] = _plain_value(decoded.schema_name, record)
    return plain_record


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@cache
def _named_raw() -> dict[str, Any]:
    """Every named type of the shipped schemas, by full and by short name."""
    named: dict[str, Any] = {}

    def walk(node: Any, ns: str) -> None:
        if isinstance(node, list):
            for branch in node:
                walk(branch, ns)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "enum", "fixed"):
                space = node.get("namespace", ns)
                named[f"{space}.{node['name']}"] = named[node["name"]] = node
                for f in node.get("fields", ()):
                    walk(f["type"], space)
            elif kind == "array":
                walk(node["items"], ns)
            elif kind == "map":
                walk(node["values"], ns)
            elif isinstance(kind, (dict, list)):
                walk(kind, ns)

    for name in SCHEMA_FILES:
        walk(raw_schema(name), name.rpartition(".")[0])
    return named


def _plain_value(schema: Any, value: Any) -> Any:
    """``value`` read with ``schema``'s logical types, as the plain form (timestamps as int
    microseconds, uuids as strings) the rest of the consumer works with."""
    if isinstance(schema, str):
        target = _named_raw().get(schema)
        return value if target is None else _plain_value(target, value)
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        if value is None or len(branches) != 1:
            return value
        return _plain_value(branches[0], value)
    kind = schema.get("type")
    logical = schema.get("logicalType")
    if isinstance(value, datetime) and logical in ("timestamp-micros", "timestamp-millis"):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        unit = timedelta(microseconds=1 if logical == "timestamp-micros" else 1000)
        return (aware - _EPOCH) // unit
    if isinstance(value, uuid.UUID):
        return str(value)
    if kind == "record" and isinstance(value, dict):
        types = {f["name"]: f["type"] for f in schema["fields"]}
        return {k: _plain_value(types[k], v) if k in types else v for k, v in value.items()}
    if kind == "array" and isinstance(value, list):
        return [_plain_value(schema["items"], v) for v in value]
    if kind == "map" and isinstance(value, dict):
        return {k: _plain_value(schema["values"], v) for k, v in value.items()}
    if isinstance(kind, (dict, list)):
        return _plain_value(kind, value)
    return value


def encode_plain(name: str, record: dict[str, Any]) -> bytes:
    """Schemaless body of a plain record (ids as strings, timestamps as int microseconds)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _plain_schemas()[name], record, strict_allow_default=True)
    return buf.getvalue()


def read_plain(name: str, body: bytes) -> dict[str, Any]:
    """Read a current-schema body known to be valid (e.g. one this process encoded)."""
    record: object = fastavro.schemaless_reader(io.BytesIO(body), _plain_schemas()[name], None)
    if not isinstance(record, dict):
        raise MalformedBody(f"{name}: decoded to {type(record).__name__}")
    return record


def envelope_step_body(plain: Plain) -> bytes:
    """The bytes of a step inside an envelope: its current-schema body. That is the wire body
    itself for the current writer schema, a re-encoding otherwise."""
    return plain.body if plain.current else encode_plain(STEP_SCHEMA, plain.record)


def avro_string(s: str) -> bytes:
    """Avro encoding of a string."""
    raw = s.encode("utf-8")
    return avro_long(len(raw)) + raw
