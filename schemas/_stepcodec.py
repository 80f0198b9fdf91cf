"""A direct Avro writer for ``StepReceipt``: the same bytes as fastavro, without the dict.

Every attempt encodes its receipt to sign it, and the producer charges that encoding to the
streamer. fastavro's ``schemaless_writer`` spends most of its time walking the schema and the
record dict built by ``to_avro``; this writer reads the receipt's attributes in schema order and
writes each with a writer chosen once from the schema file (docs/BENCHMARKS.md, "Architecture
round", has the measured difference that keeps it).

It only takes values of the exact types the schema expects (``str``, ``int`` within range,
``bool``, ``bytes``, tuples/lists of ``str``, a ``Verdict``); anything else returns ``None`` and
the caller falls back to fastavro, which then encodes or raises exactly as before. A property
test checks byte equality with fastavro over random receipts.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from chio_receipts.schemas._avro import raw_schema
from chio_receipts.schemas._contract import STEP_SCHEMA
from chio_receipts.schemas._records import StepReceipt, Verdict

__all__ = ["avro_long", "encode_step"]

_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)

# Appends one value to the buffer; False when the value is not of the type this writer takes.
_Writer = Callable[[bytearray, Any], bool]


def avro_long(n: int) -> bytes:
    """Avro zig-zag varint of ``n`` (an int or long)."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _string(out: bytearray, value: Any) -> bool:
    if type(value) is not str:
        return False
    raw = value.encode("utf-8")  # UnicodeEncodeError (lone surrogate) is caught by encode_step
    out += avro_long(len(raw))
    out += raw
    return True


def _bytes(out: bytearray, value: Any) -> bool:
    if type(value) is not bytes:
        return False
    out += avro_long(len(value))
    out += value
    return True


def _int(out: bytearray, value: Any) -> bool:
    if type(value) is not int or not _INT32[0] <= value <= _INT32[1]:
        return False
    out += avro_long(value)
    return True


def _long(out: bytearray, value: Any) -> bool:
    if type(value) is not int or not _INT64[0] <= value <= _INT64[1]:
        return False
    out += avro_long(value)
    return True


def _boolean(out: bytearray, value: Any) -> bool:
    if type(value) is not bool:
        return False
    out += b"\x01" if value else b"\x00"
    return True


def _strings(out: bytearray, value: Any) -> bool:
    if type(value) is not tuple and type(value) is not list:
        return False
    if value:  # one block of all items, then the empty block that ends the array
        out += avro_long(len(value))
        for item in value:
            if not _string(out, item):
                return False
    out += b"\x00"
    return True


def _verdict_writer(symbols: list[str]) -> _Writer:
    index = {Verdict(symbol): avro_long(i) for i, symbol in enumerate(symbols)}

    def verdict(out: bytearray, value: Any) -> bool:
        if type(value) is not Verdict:
            return False
        out += index[value]
        return True

    return verdict


_PRIMITIVES: dict[str, _Writer] = {
    "string": _string,
    "bytes": _bytes,
    "int": _int,
    "long": _long,
    "boolean": _boolean,
}


def _writer(avro_type: Any) -> _Writer:
    """The writer of a field type of the step schema (logical types write their base type)."""
    if isinstance(avro_type, str):
        return _PRIMITIVES[avro_type]
    if avro_type["type"] == "array" and avro_type["items"] == "string":
        return _strings
    if avro_type["type"] == "enum" and avro_type["name"] == "Verdict":
        return _verdict_writer(avro_type["symbols"])
    return _writer(avro_type["type"])


_FIELDS = raw_schema(STEP_SCHEMA)["fields"]
# key_id and signature are the last two fields; the caller supplies them.
_NAMES = [f["name"] for f in _FIELDS[:-2]]
_WRITERS = [_writer(f["type"]) for f in _FIELDS[:-2]]
_values = operator.attrgetter(*_NAMES)


def encode_step(r: StepReceipt, key_id: str, signature: bytes) -> bytes | None:
    """The schemaless Avro body of ``r`` with ``key_id`` and ``signature`` in place of its own;
    ``None`` when a value is not of the plain type this writer handles (use fastavro then)."""
    out = bytearray()
    try:
        for write, value in zip(_WRITERS, _values(r), strict=True):
            if not write(out, value):
                return None
        if not _string(out, key_id) or not _bytes(out, signature):
            return None
    except UnicodeEncodeError:  # a lone surrogate: fastavro reports it as before
        return None
    return bytes(out)
