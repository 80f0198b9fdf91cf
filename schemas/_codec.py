"""Avro single-object encoding (the Avro spec's default wire format here; no registry needed).

Frame: ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint (little-endian) + the
schemaless body. The fingerprint is taken over the schema's Parsing Canonical Form as the Avro
spec defines it (named types inlined at first use), so other implementations (Java's
``BinaryMessageDecoder``) find the schema. Decoding resolves the writer schema by fingerprint,
among the current schemas and the released versions kept in ``avro/released/``, and reads it
with the current schema.

A released schema ``avro/released/<name>.v<N>.avsc`` is parsed with the named types of the same
release (``workflow_receipt.v2`` holds ``step_receipt.v2`` steps), so an old envelope is read
with the step schema it was written with.

Legacy fingerprints: before the canonical form inlined named types, ``WorkflowReceipt`` was
fingerprinted with ``StepReceipt`` written as a bare name (then still v1). Messages framed that
way are still on the topics, so each writer schema is also known under that legacy fingerprint;
when two releases share one, the oldest keeps it. Nothing is framed with it any more.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.types import Schema

from chio_receipts.schemas._avro import (
    SCHEMA_FILES,
    encode_body,
    parsed_schema,
    parsing_canonical_form,
    raw_schema,
)
from chio_receipts.schemas._errors import EncodeError, MalformedBody, UnknownFormat, UnknownSchema

__all__ = [
    "SINGLE_OBJECT_MAGIC",
    "Decoded",
    "current_fingerprints",
    "decode",
    "encode",
    "frame",
    "read_body",
    "schema_fingerprint",
]

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
_HEADER = len(SINGLE_OBJECT_MAGIC) + 8


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded event: which schema it is, the record, and the schemaless body."""

    schema_name: str
    record: dict[str, Any]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Writer:
    reader_name: str
    schema: Schema


def schema_fingerprint(schema: Schema) -> bytes:
    """The 8-byte little-endian CRC-64-AVRO fingerprint of a parsed schema's Parsing Canonical
    Form (named types inlined at first use, as the Avro spec and Java Avro compute it)."""
    return _crc64(parsing_canonical_form(schema))


def _legacy_fingerprint(schema: Schema) -> bytes:
    """The fingerprint this package framed with before: fastavro's canonical form of the parsed
    schema, which names (instead of inlining) a type defined by another schema file."""
    return _crc64(to_parsing_canonical_form(schema))


def _crc64(canonical: str) -> bytes:
    return bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


@cache
def _current_fingerprint(name: str) -> bytes:
    return schema_fingerprint(parsed_schema(name))


@cache
def current_fingerprints() -> dict[bytes, str]:
    """Fingerprint -> current schema name, for every fingerprint a message written with a
    current schema may carry: the canonical one and the legacy one (same schema, same bytes)."""
    out = {_legacy_fingerprint(parsed_schema(name)): name for name in SCHEMA_FILES}
    out.update({_current_fingerprint(name): name for name in SCHEMA_FILES})
    return out


@cache
def _writers() -> dict[bytes, _Writer]:
    writers: dict[bytes, _Writer] = {}
    for name in SCHEMA_FILES:
        writers[_current_fingerprint(name)] = _Writer(name, parsed_schema(name))
    released = _released()
    for (full, _version), raw in sorted(released.items(), key=lambda kv: kv[0]):
        schema = _parse_released(full, raw, _version, released)
        writers.setdefault(schema_fingerprint(schema), _Writer(full, schema))
    # Legacy aliases last: a canonical fingerprint always wins, and among released versions
    # the oldest (the one written when legacy framing was in use) keeps the alias.
    for writer in list(writers.values())[len(SCHEMA_FILES) :]:
        writers.setdefault(_legacy_fingerprint(writer.schema), writer)
    for writer in list(writers.values())[: len(SCHEMA_FILES)]:
        writers.setdefault(_legacy_fingerprint(writer.schema), writer)
    return writers


def _released() -> dict[tuple[str, int], dict[str, Any]]:
    """Released schemas by (full name, version), from ``avro/released/<file>.v<N>.avsc``."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    folder = resources.files("chio_receipts.schemas").joinpath("avro", "released")
    if not folder.is_dir():
        return out
    for item in folder.iterdir():
        stem, _, version = item.name.removesuffix(".avsc").rpartition(".v")
        if not item.name.endswith(".avsc") or not stem or not version.isdigit():
            continue
        raw = json.loads(item.read_text("utf-8"))
        full = f"{raw.get('namespace', '')}.{raw['name']}"
        if full in SCHEMA_FILES:
            out[(full, int(version))] = raw
    return out


def _parse_released(
    full: str,
    raw: dict[str, Any],
    version: int,
    released: dict[tuple[str, int], dict[str, Any]],
) -> Schema:
    """Parse a released schema with the named types it was written with: for each schema it
    may refer to (those before it in SCHEMA_FILES), the released file of the same version when
    there is one, else the newest released one older than it, else the current schema. A
    ``workflow_receipt.v2`` envelope thus carries ``step_receipt.v2`` steps."""
    named: dict[str, Any] = {}
    for other in SCHEMA_FILES:
        if other == full:
            break
        older = [v for (name, v) in released if name == other and v <= version]
        dep = released[(other, max(older))] if older else raw_schema(other)
        fastavro.parse_schema(dep, named_schemas=named)
    return fastavro.parse_schema(raw, named_schemas=named)


def encode(name: str, record: dict[str, Any]) -> bytes:
    """Single-object encoding of ``record`` with the current schema ``name``."""
    try:
        body = encode_body(name, record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise EncodeError(f"{name}: {exc}") from exc
    return frame(name, body)


def frame(name: str, body: bytes) -> bytes:
    """Wrap an already encoded body (for example a signed step body) in the frame."""
    return SINGLE_OBJECT_MAGIC + _current_fingerprint(name) + body


def decode(data: bytes) -> Decoded:
    """Decode one framed event; raises a :class:`DecodeError` subclass for bad input."""
    if len(data) < _HEADER or data[:2] != SINGLE_OBJECT_MAGIC:
        raise UnknownFormat(
            f"not an Avro single-object message (first bytes {data[:2].hex() or 'none'})"
        )
    fp = data[2:_HEADER]
    writer = _writers().get(fp)
    if writer is None:
        raise UnknownSchema(f"unknown writer schema fingerprint {fp.hex()}")
    return read_body(writer.reader_name, writer.schema, data[_HEADER:])


def read_body(
    reader_name: str, writer_schema: Schema, body: bytes, *, resolve: bool = True
) -> Decoded:
    """Read a schemaless ``body`` written with ``writer_schema`` as current schema ``reader_name``.

    Shared by every wire format; anything wrong with the bytes becomes a :class:`MalformedBody`.
    ``resolve=False`` reads with ``writer_schema`` alone (a caller that already knows the writer
    is the current schema, e.g. a copy without logical types); the checks are the same.
    """
    buf = io.BytesIO(body)
    try:
        reader = parsed_schema(reader_name) if resolve else None
        record = fastavro.schemaless_reader(buf, writer_schema, reader)
    except Exception as exc:
        raise MalformedBody(f"{reader_name}: {type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(body):
        raise MalformedBody(
            f"{reader_name}: {len(body) - buf.tell()} trailing bytes after the record"
        )
    if not isinstance(record, dict):
        raise MalformedBody(f"{reader_name}: decoded to {type(record).__name__}")
    bad = _int_check(reader_name)(record)
    if bad is not None:
        raise MalformedBody(f"{reader_name}: field {bad} is outside the Avro int range")
    return Decoded(reader_name, record, body)


_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_Check = Callable[[Any], "str | None"]


def _compile_int_check(schema: Any, path: str) -> _Check | None:
    """A function that returns the path of an Avro ``int`` outside int32, or None.

    fastavro reads an ``int`` with its ``long`` decoder, so an overlong varint decodes to a
    value no Avro int can hold; the check walks only the parts of the schema that contain ints.
    """
    if schema == "int" or (isinstance(schema, dict) and schema.get("type") == "int"):
        return lambda v: None if _INT_MIN <= v <= _INT_MAX else path
    if isinstance(schema, list):
        branches = [_compile_int_check(b, path) for b in schema]
        live = [b for b in branches if b is not None]
        if not live:
            return None
        return lambda v: next((r for b in live if isinstance(v, int) and (r := b(v))), None)
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if kind == "record":
        fields = [
            (f["name"], c)
            for f in schema["fields"]
            if (c := _compile_int_check(f["type"], f"{path}.{f['name']}".lstrip(".")))
        ]
        if not fields:
            return None
        return lambda v: next((r for n, c in fields if (r := c(v.get(n)))), None)
    if kind == "array":
        item = _compile_int_check(schema["items"], f"{path}[]")
        if item is None:
            return None
        return lambda v: next((r for x in v if (r := item(x))), None)
    if kind == "map":
        value = _compile_int_check(schema["values"], f"{path}{{}}")
        if value is None:
            return None
        return lambda v: next((r for x in v.values() if (r := value(x))), None)
    return None


@cache
def _int_check(name: str) -> _Check:
    check = _compile_int_check(parsed_schema(name), "")
    return check if check is not None else (lambda _v: None)
