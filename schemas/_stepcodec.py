"""The step event's Avro body, written by the native core: the same bytes as fastavro.

Every attempt encodes its receipt to sign it, and the producer charges that encoding to the
streamer. ``chio_receipts_native.encode_step`` (and ``sign_step``, which also signs) reads the
receipt's attributes in schema order (``avro/step_receipt.avsc``) and writes the body in compiled
code; fastavro, which walks the schema and a record dict, is the tests' oracle (a property test
checks byte equality over generated receipts).

The native writer only takes values of the types the schema expects (``str``, ``int`` within
range, ``bool``, ``bytes``, tuples/lists of ``str``, a ``Verdict``); anything else returns
``None`` and the caller falls back to fastavro, which then encodes or raises exactly as before.

:func:`avro_long` stays in Python: the consumers frame small values with it.
"""

from __future__ import annotations

import chio_receipts_native

from chio_receipts.schemas._records import StepReceipt

__all__ = ["avro_long", "encode_step"]

# Zig-zag varints of 0..63 are one byte: most string lengths and counts.
_ONE_BYTE = tuple(bytes([n << 1]) for n in range(64))


def avro_long(n: int) -> bytes:
    """Avro zig-zag varint of ``n`` (an int or long)."""
    if 0 <= n < 64:
        return _ONE_BYTE[n]
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode_step(r: StepReceipt, key_id: str, signature: bytes) -> bytes | None:
    """The schemaless Avro body of ``r`` with ``key_id`` and ``signature`` in place of its own;
    ``None`` when a value is not of the plain type the native writer takes (use fastavro then)."""
    return chio_receipts_native.encode_step(r, key_id, signature)
