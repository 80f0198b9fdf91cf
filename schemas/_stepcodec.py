"""A direct Avro writer for ``StepReceipt``: the same bytes as fastavro, without the dict.

Every attempt encodes its receipt to sign it, and the producer charges that encoding to the
streamer. fastavro's ``schemaless_writer`` spends most of its time walking the schema and the
record dict built by ``to_avro``; :func:`encode_step` writes the receipt's attributes in schema
order (``avro/step_receipt.avsc``), which takes about half the time (docs/BENCHMARKS.md,
"Architecture round", has the measurements that keep it).

It only takes values of the exact types the schema expects (``str``, ``int`` within range,
``bool``, ``bytes``, tuples/lists of ``str``, a ``Verdict``); anything else returns ``None`` and
the caller falls back to fastavro, which then encodes or raises exactly as before. A property
test checks byte equality with fastavro over random receipts.
"""

from __future__ import annotations

from chio_receipts.schemas._records import StepReceipt, Verdict

__all__ = ["avro_long", "encode_step"]

_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)
# Zig-zag varints of 0..63 are one byte: most string lengths and counts.
_ONE_BYTE = tuple(bytes([n << 1]) for n in range(64))
_VERDICT = {
    Verdict.UNKNOWN: b"\x00",
    Verdict.ALLOW: b"\x02",
    Verdict.DENY: b"\x04",
    Verdict.PENDING_APPROVAL: b"\x06",
}


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
    ``None`` when a value is not of the plain type this writer handles (use fastavro then)."""
    out = bytearray()
    try:
        written = (
            _strings(out, r.receipt_id, r.namespace, r.workflow_id, r.run_id, r.workflow_type)
            and _strings(out, r.task_queue, r.activity_id, r.activity_type)
            and _int(out, r.attempt)
            and _boolean(out, r.is_local)
            and _strings(out, r.tool_server, r.tool, r.action, r.resource, r.subject)
            and _strings(out, r.capability_id)
            and _string_array(out, r.capability_chain)
            and _string_array(out, r.scope)
            and _verdict(out, r.verdict)
            and _strings(out, r.reason, r.argument_digest, r.argument_key_id)
            and _longs(out, r.scheduled_at, r.started_at, r.evaluated_at, r.latency_us)
            and _strings(out, r.worker_identity)
            and _bytes(out, r.prev_hash)
            and _strings(out, r.chio_receipt)
            and _bytes(out, r.chio_signed)
            and _strings(out, r.trace_id, r.span_id, key_id)
            and _bytes(out, signature)
        )
    except UnicodeEncodeError:  # a lone surrogate: fastavro reports it as before
        return None
    return bytes(out) if written else None


def _strings(out: bytearray, *values: object) -> bool:
    for value in values:
        if type(value) is not str:
            return False
        raw = value.encode("utf-8")
        out += avro_long(len(raw))
        out += raw
    return True


def _string_array(out: bytearray, values: object) -> bool:
    if type(values) is not tuple and type(values) is not list:
        return False
    if values:  # one block holding every item, then the empty block that ends the array
        out += avro_long(len(values))
        if not _strings(out, *values):
            return False
    out += b"\x00"
    return True


def _int(out: bytearray, value: object) -> bool:
    if type(value) is not int or not _INT32[0] <= value <= _INT32[1]:
        return False
    out += avro_long(value)
    return True


def _longs(out: bytearray, *values: object) -> bool:
    for value in values:
        if type(value) is not int or not _INT64[0] <= value <= _INT64[1]:
            return False
        out += avro_long(value)
    return True


def _boolean(out: bytearray, value: object) -> bool:
    if type(value) is not bool:
        return False
    out += b"\x01" if value else b"\x00"
    return True


def _verdict(out: bytearray, value: object) -> bool:
    if type(value) is not Verdict:
        return False
    out += _VERDICT[value]
    return True


def _bytes(out: bytearray, value: object) -> bool:
    if type(value) is not bytes:
        return False
    out += avro_long(len(value))
    out += value
    return True
