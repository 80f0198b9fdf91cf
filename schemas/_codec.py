"""Avro single-object encoding (the Avro spec's default wire format here; no registry needed).

Frame: ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint (little-endian) + the
schemaless body. Decoding resolves the writer schema by fingerprint, among the current schemas
and the released versions kept in ``avro/released/``, and reads it with the current schema.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.types import Schema

from schemas._avro import SCHEMA_FILES, encode_body, parsed_schema, raw_schema
from schemas._errors import EncodeError, MalformedBody, UnknownFormat, UnknownSchema

__all__ = ["SINGLE_OBJECT_MAGIC", "Decoded", "decode", "encode", "frame", "schema_fingerprint"]

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
    """The 8-byte little-endian CRC-64-AVRO fingerprint of a parsed schema."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@cache
def _current_fingerprint(name: str) -> bytes:
    return schema_fingerprint(parsed_schema(name))


@cache
def _writers() -> dict[bytes, _Writer]:
    writers: dict[bytes, _Writer] = {}
    for name in SCHEMA_FILES:
        writers[_current_fingerprint(name)] = _Writer(name, parsed_schema(name))
    released = resources.files("schemas").joinpath("avro", "released")
    if released.is_dir():
        for item in sorted(released.iterdir(), key=lambda p: p.name):
            if not item.name.endswith(".avsc"):
                continue
            raw = json.loads(item.read_text("utf-8"))
            full = f"{raw.get('namespace', '')}.{raw['name']}"
            if full not in SCHEMA_FILES:
                continue
            named: dict[str, Any] = {}
            # Released schemas may refer to named types of the current schemas parsed before
            # them (SCHEMA_FILES is in dependency order); parse up to the released one.
            for other in SCHEMA_FILES:
                if other == full:
                    break
                fastavro.parse_schema(raw_schema(other), named_schemas=named)
            schema = fastavro.parse_schema(raw, named_schemas=named)
            writers.setdefault(schema_fingerprint(schema), _Writer(full, schema))
    return writers


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
    body = data[_HEADER:]
    buf = io.BytesIO(body)
    try:
        record = fastavro.schemaless_reader(buf, writer.schema, parsed_schema(writer.reader_name))
    except Exception as exc:
        raise MalformedBody(f"{writer.reader_name}: {type(exc).__name__}: {exc}") from exc
    if buf.tell() != len(body):
        raise MalformedBody(
            f"{writer.reader_name}: {len(body) - buf.tell()} trailing bytes after the record"
        )
    if not isinstance(record, dict):
        raise MalformedBody(f"{writer.reader_name}: decoded to {type(record).__name__}")
    return Decoded(writer.reader_name, record, body)
