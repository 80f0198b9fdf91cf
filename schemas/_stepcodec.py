"""A direct Avro writer for ``StepReceipt``: the same bytes as fastavro, without the dict.

Every attempt encodes one receipt (to sign it) and the producer benchmark charges that encoding
to the streamer: fastavro's ``schemaless_writer`` spends most of its time walking the schema and
the record dict (25 µs for a 546-byte receipt on a 2-core machine), the bytes themselves are a
few string copies. This writer reads the dataclass's attributes in schema order and writes the
fields directly.

It only takes values of the exact types the schema expects (``str``, ``int`` within range,
``bool``, ``bytes``, tuples/lists of ``str``, a ``Verdict``); anything else returns ``None`` and
the caller falls back to fastavro, which then encodes or raises exactly as before. A property
test checks byte equality with fastavro over random receipts.

Most fields repeat from one attempt to the next: the run's identity (namespace .. task queue),
the tool and capability (tool server .. scope), the key ids and the worker. Those spans are
encoded once and kept by value in a small bounded table; a span is only cached after every value
in it passed the type checks, and equal strings have equal UTF-8 bytes.
"""

from __future__ import annotations

import operator
from functools import lru_cache

from chio_receipts.schemas._records import _STEP_NAMES, StepReceipt, Verdict

__all__ = ["avro_long", "encode_step"]

_SMALL = tuple(bytes([n << 1]) for n in range(64))  # zig-zag varints of 0..63: one byte
_INT32 = (-(1 << 31), (1 << 31) - 1)
_INT64 = (-(1 << 63), (1 << 63) - 1)
_VERDICT = {Verdict.UNKNOWN: b"\x00", Verdict.ALLOW: b"\x02", Verdict.DENY: b"\x04"}


_INDEX = {name: i for i, name in enumerate(_STEP_NAMES)}


def _span(first: str, last: str) -> slice:
    """The fields from ``first`` to ``last`` in schema order (the record's field order)."""
    return slice(_INDEX[first], _INDEX[last] + 1)


# Every field before key_id and signature (those two are the caller's), in schema order.
_VALUES = operator.attrgetter(*_STEP_NAMES[: _INDEX["key_id"]])
_RUN = _span("namespace", "task_queue")  # strings, the same for every step of a run
_ACTIVITY = _span("activity_id", "activity_type")  # strings
_TOOL = _span("tool_server", "scope")  # strings, then two arrays: same per tool and capability
_ATTEMPT, _IS_LOCAL, _VERDICT_AT = _INDEX["attempt"], _INDEX["is_local"], _INDEX["verdict"]
_DIGEST = _span("reason", "argument_digest")  # strings, new per attempt
_ARG_KEY = _span("argument_key_id", "argument_key_id")
_TIMES = _span("scheduled_at", "latency_us")  # longs
_IDENTITY = _span("worker_identity", "worker_identity")
_PREV = _INDEX["prev_hash"]

# Encoded spans by value (a tuple of the span's values). Bounded: cleared when full, which a
# worker with thousands of concurrently active runs reaches now and then; it only costs a miss.
_SPANS: dict[tuple[object, ...], bytes] = {}
_SPANS_LIMIT = 4096


def avro_long(n: int) -> bytes:
    """Avro zig-zag varint of ``n``."""
    if 0 <= n < 64:
        return _SMALL[n]
    z = (n << 1) ^ (n >> 63)
    if z < _BIG:
        return _varint(z)
    # Timestamps (µs since 1970) take eight bytes; their upper bits change about once a second,
    # so the upper groups come from a small cache and only the lowest three are computed.
    low = z & 0x7F | (z & 0x3F80) << 1 | (z & 0x1FC000) << 2 | 0x808080  # 3 groups, continued
    return low.to_bytes(3, "little") + _upper(z >> 21)


_BIG = 1 << 28


def _varint(z: int) -> bytes:
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


@lru_cache(maxsize=1024)
def _upper(z: int) -> bytes:
    return _varint(z)


def _strings(out: bytearray, values: tuple[object, ...]) -> bool:
    for v in values:
        if type(v) is not str:
            return False
        raw = v.encode("utf-8")  # UnicodeEncodeError (lone surrogate) is caught by the caller
        n = len(raw)
        out += _SMALL[n] if n < 64 else avro_long(n)
        out += raw
    return True


def _array(out: bytearray, values: object) -> bool:
    if type(values) is not tuple and type(values) is not list:
        return False
    if values:
        out += avro_long(len(values))
        if not _strings(out, tuple(values)):
            return False
    out += b"\x00"
    return True


def _span_bytes(out: bytearray, values: tuple[object, ...]) -> bool:
    """Append a span of strings and string arrays, from the table when seen before."""
    try:
        cached = _SPANS.get(values)
    except TypeError:  # an unhashable value (a list): encode it, do not keep it
        cached = None
        hashable = False
    else:
        hashable = True
    if cached is not None:
        out += cached
        return True
    part = bytearray()
    for v in values:
        if type(v) is str:
            if not _strings(part, (v,)):
                return False
        elif not _array(part, v):
            return False
    if hashable:
        if len(_SPANS) >= _SPANS_LIMIT:
            _SPANS.clear()
        _SPANS[values] = bytes(part)
    out += part
    return True


def encode_step(r: StepReceipt, key_id: str, signature: bytes) -> bytes | None:
    """The schemaless Avro body of ``r`` with ``key_id`` and ``signature`` in place of its own;
    ``None`` when a value is not of the plain type this writer handles (use fastavro then)."""
    try:
        return _encode(_VALUES(r), key_id, signature)
    except UnicodeEncodeError:  # a lone surrogate: fastavro reports it as before
        return None


def _encode(v: tuple[object, ...], key_id: str, signature: bytes) -> bytes | None:
    out = bytearray()
    if not _strings(out, v[:1]) or not _span_bytes(out, v[_RUN]):
        return None
    if not _strings(out, v[_ACTIVITY]):
        return None
    attempt = v[_ATTEMPT]
    if type(attempt) is not int or not _INT32[0] <= attempt <= _INT32[1]:
        return None
    out += avro_long(attempt)
    is_local = v[_IS_LOCAL]
    if type(is_local) is not bool:
        return None
    out += b"\x01" if is_local else b"\x00"
    if not _span_bytes(out, v[_TOOL]):
        return None
    verdict = v[_VERDICT_AT]
    encoded_verdict = _VERDICT.get(verdict) if type(verdict) is Verdict else None
    if encoded_verdict is None:
        return None
    out += encoded_verdict
    if not _strings(out, v[_DIGEST]) or not _span_bytes(out, v[_ARG_KEY]):
        return None
    for t in v[_TIMES]:
        if type(t) is not int or not _INT64[0] <= t <= _INT64[1]:
            return None
        out += avro_long(t)
    prev = v[_PREV]
    if type(prev) is not bytes or type(signature) is not bytes:
        return None
    if not _span_bytes(out, v[_IDENTITY]):
        return None
    out += avro_long(len(prev))
    out += prev
    if not _span_bytes(out, (key_id,)):
        return None
    out += avro_long(len(signature))
    out += signature
    return bytes(out)
