"""The native reading of a step row's Chio analytics columns against Python's.

``chio_receipts_native.chio_columns`` reads a batch of receipt texts; the oracle is the Python
reading it replaces on the builder's hot path, ``consumers._rows.chio_columns`` (``json.loads``
then ``schemas.ChioStepFields``), which stays as the fallback for what the native reader leaves
to Python. Where the native reader answers, it answers exactly what Python reads.
"""

from __future__ import annotations

import json
from typing import Any

import chio_receipts_native
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chio_receipts.consumers._rows import (
    CHIO_COLUMNS,
    STEP_FIELDS,
    StepRow,
    chio_columns,
    chio_columns_batch,
    step_row,
)
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.schemas import KeyPair
from tests.support.chio_runs import chio_run, v1_run

pytestmark = pytest.mark.unit

KERNEL = KeyPair.generate("kernel")
SIDECAR = KeyPair.generate("ed25519-00000000000000aa")

_TOP = (
    "id",
    "receipt_kind",
    "boundary_class",
    "trust_level",
    "tool_origin",
    "redaction_mode",
    "policy_hash",
    "content_hash",
    "kernel_key",
)

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# Mostly what a kernel writes (strings), sometimes anything JSON holds.
_column = st.text(max_size=20) | st.none() | _json
_nested = st.dictionaries(
    st.sampled_from(["verdict", "guard", "parameter_hash", "reason", "x"]), _column, max_size=4
)


@st.composite
def receipts(draw: st.DrawFn) -> dict[str, Any]:
    receipt: dict[str, Any] = {}
    for key in _TOP:
        if draw(st.booleans()):
            receipt[key] = draw(_column)
    for key in ("decision", "action"):
        if draw(st.booleans()):
            receipt[key] = draw(_nested | _json)
    receipt.update(draw(st.dictionaries(st.text(max_size=6), _json, max_size=3)))
    return receipt


def _python(text: str) -> tuple[str, ...]:
    return tuple(chio_columns({"chio_receipt": text}).values())


def _is_plain(value: object) -> bool:
    return value is None or isinstance(value, str) or value is False or value == [] or value == {}


@settings(max_examples=400, deadline=None)
@given(receipts(), st.booleans())
def test_native_columns_are_pythons_where_given_and_given_for_string_columns(
    receipt: dict[str, Any], ascii_only: bool
) -> None:
    text = json.dumps(receipt, ensure_ascii=ascii_only)
    [native] = chio_receipts_native.chio_columns([text])
    if native is not None:
        assert native == _python(text)
    values = [receipt.get(k) for k in _TOP]
    for key, inner in (("decision", ("verdict", "guard")), ("action", ("parameter_hash",))):
        nested = receipt.get(key)
        values += [nested.get(n) if isinstance(nested, dict) else None for n in inner]
    if all(_is_plain(v) for v in values):
        assert native is not None


def test_texts_the_native_reader_leaves_to_python() -> None:
    texts = [
        "[1, 2]",  # not an object: ChioStepFields would fail on it, as before
        '"a string"',
        "{",  # not JSON
        '{"id": NaN}',  # Python's json reads NaN, serde_json does not
        '{"id": "\\ud800"}',  # a lone surrogate
        '{"id": 5}',  # a number in a column
        '{"decision": {"verdict": ["deny"]}}',
    ]
    assert chio_receipts_native.chio_columns(texts) == [None] * len(texts)
    assert chio_receipts_native.chio_columns([b"{}", None]) == [None, None]


def test_duplicate_keys_read_as_python_reads_them_and_true_is_True() -> None:
    text = '{"id": "first", "id": "last", "trust_level": true, "decision": {"guard": false}}'
    [native] = chio_receipts_native.chio_columns([text])
    assert native == _python(text)
    assert native[0] == "last"
    assert native[3] == "True"


def test_the_batch_keeps_positions_and_skips_steps_without_a_receipt() -> None:
    run = chio_run("wf-cols", "r1", 3, kernel=KERNEL, sidecar=SIDECAR, deny=(1,))
    [(_, v1_wire)] = v1_run("wf-cols", "r0", 1, SIDECAR)
    wires = [run[0][1], v1_wire, run[1][1], run[2][1]]
    records = [decode_plain(w).record for w in wires]
    columns = chio_columns_batch(records)
    assert columns[1] is None
    assert len(CHIO_COLUMNS) == 12
    for i, (record, wire) in enumerate(zip(records, wires, strict=True)):
        row = step_row(record, wire, 0, i, columns[i])
        assert row == step_row(record, wire, 0, i)
        if record["chio_receipt"]:
            assert columns[i] == _python(record["chio_receipt"])
            assert row.chio_receipt_id != ""
            assert row.kernel_key == KERNEL.public_key.hex()
    assert step_row(records[2], wires[2], 0, 2, columns[2]).decision == "deny"


def _former_step_row(record: dict[str, Any], wire: bytes, partition: int, offset: int) -> StepRow:
    """``step_row`` as it was written before: the row by keyword, the columns read by Python."""
    values = {name: record[name] for name in STEP_FIELDS}
    values["capability_chain"] = tuple(values["capability_chain"])
    values["scope"] = tuple(values["scope"])
    if values["chio_receipt"]:
        values.update(chio_columns(record))
    return StepRow(**values, wire=wire, kafka_partition=partition, kafka_offset=offset)


def test_step_rows_are_the_rows_built_by_keyword() -> None:
    run = chio_run("wf-kw", "r1", 2, kernel=KERNEL, sidecar=None, deny=(0,))
    [(_, v1_wire)] = v1_run("wf-kw", "r0", 1, SIDECAR)
    wires = [w for _, w in run] + [v1_wire]
    records = [decode_plain(w).record for w in wires]
    for i, (record, wire, chio) in enumerate(
        zip(records, wires, chio_columns_batch(records), strict=True)
    ):
        former = _former_step_row(record, wire, i, 100 + i)
        for row in (step_row(record, wire, i, 100 + i), step_row(record, wire, i, 100 + i, chio)):
            assert row == former
            assert row.values() == former.values()
            assert hash(row) == hash(former)
            with pytest.raises(AttributeError):
                row.receipt_id = "x"  # type: ignore[misc]
    with pytest.raises(KeyError):
        step_row({k: v for k, v in records[0].items() if k != "tool"}, wires[0], 0, 0)
