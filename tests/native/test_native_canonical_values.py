"""The native canonical JSON of Python values (``canonical_json_of``, which
``schemas.canonical_json`` calls) against the former pure-Python canonicalizer, chio-sdk and the
native text path.

The native function turns the value into a ``serde_json::Value`` and lets chio-core-types write
it, so it is the kernel's canonicalizer; the Python oracle was checked against the kernel in
tests/kernel. Floats and U+007F-U+009F (where chio-sdk departs from the kernel) are included.
"""

from __future__ import annotations

import json
from types import MappingProxyType

import chio_receipts_native as native
import pytest
from chio.invariants.json import canonicalize_json
from hypothesis import given, settings
from hypothesis import strategies as st

from chio_receipts import schemas
from tests.native._canonical_oracle import OracleError
from tests.native._canonical_oracle import canonical_json as oracle

pytestmark = pytest.mark.unit

any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
sdk_text = st.text(
    st.characters(
        blacklist_categories=("Cs",), blacklist_characters=[chr(c) for c in range(0x7F, 0xA0)]
    ),
    max_size=12,
)
ints = st.integers(-(2**63), 2**64 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)


def _json(
    leaves: st.SearchStrategy[object], keys: st.SearchStrategy[str], *, tuples: bool = True
) -> st.SearchStrategy[object]:
    def inner(items: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
        lists = st.lists(items, max_size=5)
        if tuples:  # tuples count as lists (chio-sdk takes lists only)
            lists |= st.lists(items, max_size=3).map(tuple)
        return lists | st.dictionaries(keys, items, max_size=5)

    return st.recursive(leaves, inner, max_leaves=25)


values = _json(st.none() | st.booleans() | ints | floats | any_text, any_text)
sdk_values = _json(st.none() | st.booleans() | ints | sdk_text, sdk_text, tuples=False)


@settings(max_examples=400, deadline=None)
@given(values)
def test_values_byte_identical_to_the_python_oracle(value: object) -> None:
    expected = oracle(value)
    assert native.canonical_json_of(value) == expected
    assert schemas.canonical_json(value) == expected
    # The text path (json.dumps first) gives the same bytes.
    assert native.canonical_json(json.dumps(value, ensure_ascii=False)) == expected


@settings(max_examples=300, deadline=None)
@given(sdk_values)
def test_values_byte_identical_to_chio_sdk(value: object) -> None:
    assert native.canonical_json_of(value) == canonicalize_json(value).encode()


@settings(max_examples=200, deadline=None)
@given(_json(st.none() | st.booleans() | st.integers(-(2**60), 2**60) | any_text, any_text))
def test_safe_integers_refuses_what_the_oracle_refuses(value: object) -> None:
    try:
        expected: bytes | None = oracle(value, safe_integers=True)
    except OracleError:
        expected = None
    if expected is None:
        with pytest.raises(schemas.ChioWireError, match="I-JSON"):
            schemas.canonical_json(value, safe_integers=True)
    else:
        assert schemas.canonical_json(value, safe_integers=True) == expected


@pytest.mark.parametrize(
    ("value", "kernel"),
    [
        (1e16, b"10000000000000000"),
        (0.1 + 0.2, b"0.30000000000000004"),
        (5e-324, b"5e-324"),
        (-0.0, b"0"),
        ("\x7f\x85", b'"\\u007f\\u0085"'),
        (2**64 - 1, b"18446744073709551615"),
        (-(2**63), b"-9223372036854775808"),
        (MappingProxyType({"b": 1, "a": (2,)}), b'{"a":[2],"b":1}'),
    ],
)
def test_the_kernels_forms(value: object, kernel: bytes) -> None:
    assert schemas.canonical_json(value) == kernel


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (float("nan"), "no JSON form"),
        ({"x": [float("inf")]}, "no JSON form"),
        (2**64, "64-bit"),
        (-(2**63) - 1, "64-bit"),
        ({1: "x"}, "keys must be strings"),
        ({"\ud800": 1}, "surrogate"),
        (["\udfff"], "surrogate"),
        ({"x": b"bytes"}, "bytes has no JSON form"),
        ({"x": {1, 2}}, "set has no JSON form"),
    ],
)
def test_values_without_a_canonical_form(value: object, match: str) -> None:
    with pytest.raises(OracleError):
        oracle(value)
    with pytest.raises(schemas.ChioWireError, match=match):
        schemas.canonical_json(value)


def test_no_value_is_quoted_in_an_error() -> None:
    with pytest.raises(schemas.ChioWireError) as info:
        schemas.canonical_json({"secret": 2**70}, safe_integers=True)
    assert str(2**70) not in str(info.value)
    with pytest.raises(schemas.ChioWireError) as info:
        schemas.canonical_json({"secret": 2**60}, safe_integers=True)
    assert str(2**60) not in str(info.value)


def test_nesting_is_bounded() -> None:
    shallow: object = 1
    for _ in range(800):
        shallow = [shallow]
    assert schemas.canonical_json(shallow) == b"[" * 800 + b"1" + b"]" * 800
    deep: object = 1
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(schemas.ChioWireError, match="nested too deeply"):
        schemas.canonical_json(deep)
