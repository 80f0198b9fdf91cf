"""The native batch decoder (``PlainDecoder``) against fastavro, the independent oracle.

fastavro is the consumer's library reader (``consumers._wire.decode_plain``): for every message
the native decoder either gives the same record (same values, same Python types) and body, or
the same ``schemas.DecodeError`` class, or leaves the message to fastavro (``DEFER``). Messages
are generated from the schemas themselves (every field), then spoiled byte by byte.
"""

from __future__ import annotations

import io
import json
from typing import Any

import fastavro
import pytest
from chio_receipts_native import PlainDecoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chio_receipts.schemas as schemas
from chio_receipts.consumers._wire import (
    RUN_SCHEMA,
    STEP_OUTCOME_SCHEMA,
    STEP_SCHEMA,
    Plain,
    _native,
    _strip,
    decode_plain,
    decode_plain_batch,
    encode_plain,
)
from chio_receipts.schemas._codec import _writers
from tests.fuzz import fuzz_decode
from tests.support.avro_strategies import sample_run, sample_step, strategy

pytestmark = pytest.mark.unit

NATIVE = (STEP_SCHEMA, STEP_OUTCOME_SCHEMA, RUN_SCHEMA)
_CLASS = {
    PlainDecoder.UNKNOWN_FORMAT: schemas.UnknownFormat,
    PlainDecoder.UNKNOWN_SCHEMA: schemas.UnknownSchema,
    PlainDecoder.MALFORMED: schemas.MalformedBody,
}


def _strict_decoder() -> PlainDecoder:
    """The consumer's schemas, with every fingerprint the library knows: any other one is
    refused natively as ``UNKNOWN_SCHEMA`` instead of being left to the library."""
    fingerprints = schemas.current_fingerprints()
    return PlainDecoder(
        [
            (
                name,
                json.dumps(_strip(schemas.raw_schema(name))),
                [fp for fp, of in fingerprints.items() if of == name],
            )
            for name in schemas.SCHEMA_FILES
            if name in NATIVE
        ],
        known=[*fingerprints, *_writers()],
    )


STRICT = _strict_decoder()


def typed(value: Any) -> Any:
    """``value`` with the type of every part kept (``True == 1`` but ``bool`` is not ``int``)."""
    if isinstance(value, dict):
        return ("dict", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, value)


def library(value: bytes) -> Plain | schemas.DecodeError:
    try:
        return decode_plain(value)
    except schemas.DecodeError as exc:
        return exc


def assert_agrees(value: bytes, decoder: PlainDecoder = STRICT) -> int:
    """The native outcome of ``value`` agrees with fastavro's; returns the native code."""
    ((code, name, record, body),) = decoder.decode_batch([value])
    expected = library(value)
    if code == PlainDecoder.DEFER:
        return code
    if code == PlainDecoder.OK:
        assert isinstance(expected, Plain), f"native decoded what fastavro refuses: {expected!r}"
        assert (name, body) == (expected.schema_name, expected.body)
        assert expected.current
        assert typed(record) == typed(expected.record)
        return code
    assert isinstance(expected, schemas.DecodeError), f"fastavro decoded it, native: {name}"
    assert type(expected) is _CLASS[code], (code, name, expected)
    return code


def message_of(name: str) -> st.SearchStrategy[bytes]:
    """Framed messages of schema ``name``: records drawn for every field, encoded by
    ``schemas.encode`` (the schema with its logical types)."""
    return strategy(schemas.raw_schema(name)).map(lambda record: schemas.encode(name, record))


messages = st.one_of([message_of(name) for name in NATIVE])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_generated_messages_decode_as_fastavro_decodes_them(value: bytes) -> None:
    assert assert_agrees(value) == PlainDecoder.OK


@st.composite
def spoiled(draw: st.DrawFn) -> bytes:
    """A generated message cut, flipped, extended, or with bytes replaced or removed."""
    value = bytearray(draw(messages))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["cut", "flip", "set", "insert", "delete", "append"]))
        at = draw(st.integers(0, max(len(value) - 1, 0)))
        if how == "cut":
            del value[at:]
        elif how == "flip" and value:
            value[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "set" and value:
            value[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC3, 0xED]))
        elif how == "insert":
            value[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif how == "delete" and value:
            del value[at : at + draw(st.integers(1, 4))]
        else:
            value += draw(st.binary(min_size=1, max_size=4))
    return bytes(value)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spoiled())
def test_spoiled_messages_get_the_same_error_class_or_record(value: bytes) -> None:
    assert_agrees(value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_get_the_same_error_class(value: bytes) -> None:
    assert_agrees(value)


def test_every_cut_of_a_step_agrees() -> None:
    value = schemas.frame(STEP_SCHEMA, schemas.step_body(sample_step()))
    codes = [assert_agrees(value[:cut]) for cut in range(len(value) + 1)]
    assert codes[-1] == PlainDecoder.OK
    assert codes[0] == PlainDecoder.UNKNOWN_FORMAT
    assert PlainDecoder.MALFORMED in codes
    assert PlainDecoder.DEFER not in codes


def test_the_fuzz_seeds_and_their_cuts_agree() -> None:
    for seed in fuzz_decode.seed_inputs():
        for cut in range(len(seed) + 1):
            assert_agrees(seed[:cut])


def _plain_step() -> dict[str, Any]:
    return decode_plain(schemas.frame(STEP_SCHEMA, schemas.step_body(sample_step()))).record


def _body(**overrides: Any) -> bytes:
    return encode_plain(STEP_SCHEMA, {**_plain_step(), **overrides})


def _frame(body: bytes) -> bytes:
    return schemas.frame(STEP_SCHEMA, body)


@pytest.mark.parametrize(
    ("spoil", "code"),
    [
        # trailing bytes
        (lambda b: b + b"\x00", PlainDecoder.MALFORMED),
        # the last field (bytes) cut short
        (lambda b: b[:-3], PlainDecoder.MALFORMED),
    ],
)
def test_edges_of_the_encoding(spoil: Any, code: int) -> None:
    body = _body(signature=b"s" * 64)
    assert assert_agrees(_frame(spoil(body))) == code


def _field_body(name: str, raw: bytes) -> bytes:
    """A step body whose field ``name`` is written as ``raw`` (the rest as encoded)."""
    schema = _strip(schemas.raw_schema(STEP_SCHEMA))
    record = _plain_step()
    out = b""
    for field in schema["fields"]:
        single = {"type": "record", "name": "One", "fields": [field]}
        buf = io.BytesIO()
        value = {field["name"]: record[field["name"]]}
        fastavro.schemaless_writer(buf, fastavro.parse_schema(single), value)
        out += raw if field["name"] == name else buf.getvalue()
    return out


@pytest.mark.parametrize(
    ("field", "raw", "code"),
    [
        ("attempt", schemas.avro_long(2**31), PlainDecoder.MALFORMED),  # outside int32
        ("attempt", schemas.avro_long(-(2**31)), PlainDecoder.OK),
        ("attempt", b"\xff" * 10 + b"\x01", PlainDecoder.DEFER),  # an 11-byte varint
        ("attempt", b"\x80" * 9 + b"\x01", PlainDecoder.MALFORMED),  # 10 bytes: 2^63 ...
        ("verdict", schemas.avro_long(4), PlainDecoder.MALFORMED),  # bad enum index
        ("verdict", schemas.avro_long(-1), PlainDecoder.OK),  # a Python index: the last one
        ("verdict", schemas.avro_long(-5), PlainDecoder.MALFORMED),
        ("is_local", b"\x02", PlainDecoder.OK),  # any non-zero byte is True
        ("namespace", b"\x04\xff\xfe", PlainDecoder.MALFORMED),  # invalid UTF-8
        ("namespace", b"\x06\xed\xa0\x80", PlainDecoder.MALFORMED),  # a UTF-16 surrogate
        ("namespace", b"\x06\xe2\x82\xac", PlainDecoder.OK),  # a euro sign
        ("scope", b"\x01\x04\x02a\x00", PlainDecoder.OK),  # a block with its byte size
        ("scope", b"\x02\x02a\x02\x02b\x00", PlainDecoder.OK),  # two blocks
        ("prev_hash", b"\x01", PlainDecoder.MALFORMED),  # a negative length
    ],
)
def test_fields_written_oddly(field: str, raw: bytes, code: int) -> None:
    assert assert_agrees(_frame(_field_body(field, raw))) == code


def test_other_framings_and_writers_are_left_to_the_library() -> None:
    step = sample_step()
    confluent = schemas.confluent_frame(1, schemas.step_body(step))
    released = sorted(set(_writers()) - set(schemas.current_fingerprints()))
    assert released
    older = schemas.SINGLE_OBJECT_MAGIC + released[0] + b"\x00" * 8
    unknown = schemas.SINGLE_OBJECT_MAGIC + b"\x01" * 8 + b"\x00"
    codes = [c for c, *_ in STRICT.decode_batch([confluent, older, unknown])]
    assert codes == [PlainDecoder.DEFER, PlainDecoder.DEFER, PlainDecoder.UNKNOWN_SCHEMA]
    # The consumer's decoder leaves every fingerprint it does not decode to the library.
    assert [c for c, *_ in _native().decode_batch([unknown])] == [PlainDecoder.DEFER]
    assert assert_agrees(unknown) == PlainDecoder.UNKNOWN_SCHEMA


def test_the_batch_is_decode_plain_of_each_message() -> None:
    """What the consumer runs: every message's Plain, or the very error decode_plain raises
    (same class, same text: the dead letters keep their detail)."""
    seeds = fuzz_decode.seed_inputs()
    values = [cut for seed in seeds for cut in (seed, seed[:-1], seed[: len(seed) // 2], seed[:3])]
    values += [b"", b"\x00", b"\xc3\x01" + b"\x02" * 8 + b"\x00"]
    for value, got in zip(values, decode_plain_batch(values), strict=True):
        expected = library(value)
        if isinstance(expected, Plain):
            assert isinstance(got, Plain)
            assert (got.schema_name, got.body, got.current) == (
                expected.schema_name,
                expected.body,
                expected.current,
            )
            assert typed(got.record) == typed(expected.record)
        else:
            assert type(got) is type(expected)
            assert str(got) == str(expected)


def test_schemas_the_decoder_cannot_read_are_refused() -> None:
    dangling = '{"type": "record", "name": "X", "fields": [{"name": "a", "type": "Y"}]}'
    with pytest.raises(ValueError, match="unknown type"):
        PlainDecoder([("x", dangling, [])])
    with pytest.raises(ValueError, match="8 bytes"):
        PlainDecoder([("x", '"int"', [b"short"])])


@pytest.mark.parametrize(
    ("branch", "code"),
    [
        (b"\x02", PlainDecoder.OK),  # the int branch, as written
        (b"\x00", PlainDecoder.MALFORMED),  # null: the int's byte is then left over
        (b"\x04", PlainDecoder.MALFORMED),  # no third branch
        (b"\x01", PlainDecoder.OK),  # -1, a Python index: the last branch (int)
        (b"\x05", PlainDecoder.MALFORMED),  # -3: out of range
    ],
)
def test_union_indices_as_fastavro_reads_them(branch: bytes, code: int) -> None:
    """``expected_steps`` of a completion is the union ``["null", "int"]``."""
    body = schemas.encode_body(RUN_SCHEMA, sample_run(expected_steps=4).to_avro())
    marker = b"\x02" + schemas.avro_long(4)
    at = body.rindex(marker)
    spoiled = body[:at] + branch + body[at + 1 :]
    assert assert_agrees(schemas.frame(RUN_SCHEMA, spoiled)) == code
