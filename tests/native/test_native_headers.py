"""``chio_header_values`` (the streamer's Chio headers) against ``json.loads``, the oracle.

The native scan reads a receipt's top-level ``id`` and ``decision.verdict`` without building the
document. Wherever it answers, the answer must be what ``schemas.chio_step_fields`` (Python's
``json.loads``) gives; where it cannot settle the text exactly it answers ``None`` and the caller
parses in Python. Text that is not JSON must never get an answer.
"""

from __future__ import annotations

import json
from typing import Any

import chio_receipts_native
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chio_receipts.schemas import ChioStepFields

pytestmark = pytest.mark.unit


def _oracle(text: str) -> tuple[str, str] | None:
    """What the Python path makes of ``text``; ``None`` when it raises."""
    try:
        fields = ChioStepFields(json.loads(text))
    except (ValueError, AttributeError, TypeError):
        return None
    return fields.receipt_id, fields.decision


def _agrees(text: str) -> tuple[str, str] | None:
    native = chio_receipts_native.chio_header_values(text)
    if native is not None:
        assert native == _oracle(text), text
    return native


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["id", "verdict", "decision", "x", "é"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)
_verdicts = st.sampled_from(["allow", "deny", "incomplete", "", "ünï"]) | _scalars
_decisions = st.fixed_dictionaries({"verdict": _verdicts}, optional={"reason": _values}) | _values
_receipts = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=20) | _scalars,
        "decision": _decisions,
        "body": _values,
        "kernel_key": st.text(max_size=8),
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(receipt=_receipts, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_agrees_with_json_loads(
    receipt: dict[str, Any], ascii_only: bool, indent: int | None
) -> None:
    compact = json.dumps(receipt, separators=(",", ":"), ensure_ascii=False)
    _agrees(compact)
    _agrees(json.dumps(receipt, ensure_ascii=ascii_only, indent=indent))


@settings(max_examples=300)
@given(text=st.text(alphabet='{}[]":,. \\tnulrefasidcv0123456789-+eE', max_size=40))
def test_never_answers_for_text_that_is_not_json(text: str) -> None:
    native = chio_receipts_native.chio_header_values(text)
    if native is not None:
        assert _oracle(text) == native, text


def test_the_sidecars_shape_is_read_natively() -> None:
    text = json.dumps(
        {"id": "ab" * 32, "body": {"id": "nested"}, "decision": {"verdict": "allow", "x": [1, {}]}},
        separators=(",", ":"),
    )
    assert chio_receipts_native.chio_header_values(text) == ("ab" * 32, "allow")
    assert chio_receipts_native.chio_header_values('{"decision":{"verdict":"deny"}}') == (
        "",
        "deny",
    )
    assert chio_receipts_native.chio_header_values('{"id":null,"decision":null}') == ("", "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The last of duplicate keys, as json.loads.
        ('{"id":"a","id":"b"}', ("b", "")),
        ('{"decision":{"verdict":"allow"},"decision":{"verdict":"deny"}}', ("", "deny")),
        ('{"decision":{"verdict":"allow"},"decision":3}', ("", "")),
        ('{"decision":{"verdict":"allow","verdict":null}}', ("", "")),
        (' \n{"id" : "x" , "decision" : { "verdict" : "allow" } }\t', ("x", "allow")),
    ],
)
def test_edge_cases_it_settles(text: str, expected: tuple[str, str]) -> None:
    assert chio_receipts_native.chio_header_values(text) == expected == _oracle(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"id":"a\\u0062"}',  # an escape in a value
        '{"\\u0069d":"a"}',  # an escaped key (it could be "id")
        '{"id":1}',  # not a string: str() of it
        '{"decision":{"verdict":true}}',
        '{"id":NaN}',  # json.loads takes NaN
        "[]",
        '{"id":"a"} x',
        '{"id":"a",}',
        '{"id":"\x01"}',
        '{"id":01}',
        "",
        "\ud800",  # a lone surrogate is not UTF-8
    ],
)
def test_what_only_python_settles_is_left_to_it(text: str) -> None:
    assert chio_receipts_native.chio_header_values(text) is None
