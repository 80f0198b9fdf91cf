"""The native canonical JSON (chio-core-types' canonicalizer) against chio-sdk's and ours.

chio-sdk 0.1.0's ``chio.invariants`` canonicalizer is the oracle where it follows RFC 8785; it
departs from the kernel on floats (``.15g``) and leaves U+007F-U+009F raw (docs/CHIO_PROTOCOL.md,
row 10). There the project's former kernel-checked Python canonicalizer (``_canonical_oracle``)
is the oracle, and the departure of chio-sdk is pinned so a fixed chio-sdk shows up.
"""

from __future__ import annotations

import json
import math

import chio_receipts_native as native
import pytest
from chio.invariants.json import canonicalize_json
from hypothesis import given, settings
from hypothesis import strategies as st

from chio_receipts import schemas
from tests.native._canonical_oracle import canonical_json as oracle

pytestmark = pytest.mark.unit

# Strings without U+007F-U+009F (where chio-sdk departs from the kernel) and without surrogates.
sdk_text = st.text(
    st.characters(
        blacklist_categories=("Cs",), blacklist_characters=[chr(c) for c in range(0x7F, 0xA0)]
    ),
    max_size=12,
)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
ints = st.integers(-(2**63), 2**64 - 1)


def _json(
    leaves: st.SearchStrategy[object], keys: st.SearchStrategy[str]
) -> st.SearchStrategy[object]:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
        max_leaves=25,
    )


sdk_values = _json(st.none() | st.booleans() | ints | sdk_text, sdk_text)
floats = st.floats(allow_nan=False, allow_infinity=False)
kernel_values = _json(st.none() | st.booleans() | ints | floats | any_text, any_text)


@settings(max_examples=300, deadline=None)
@given(sdk_values)
def test_byte_identical_to_chio_sdk(value: object) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert native.canonical_json(text) == canonicalize_json(value).encode()


@settings(max_examples=300, deadline=None)
@given(kernel_values)
def test_byte_identical_to_the_projects_kernel_canonicalizer(value: object) -> None:
    # Floats and U+007F-U+009F included; key order and whitespace of the input do not matter.
    expected = oracle(value)
    assert schemas.canonical_json(value) == expected
    assert native.canonical_json(json.dumps(value, ensure_ascii=False)) == expected
    assert native.canonical_json(json.dumps(value, indent=2, ensure_ascii=True)) == expected


@pytest.mark.parametrize(
    ("value", "kernel", "sdk"),
    [
        (1e16, b"10000000000000000", "1e+16"),
        (0.1 + 0.2, b"0.30000000000000004", "0.3"),
        (5e-324, b"5e-324", "4.94065645841247e-324"),
        ("\x7f\x85", b'"\\u007f\\u0085"', '"\x7f\x85"'),
    ],
)
def test_where_chio_sdk_departs_from_the_kernel(value: object, kernel: bytes, sdk: str) -> None:
    assert native.canonical_json(json.dumps(value)) == kernel == oracle(value)
    assert schemas.canonical_json(value) == kernel
    assert canonicalize_json(value) == sdk


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # RFC 8785 Appendix B and the §3.2.2 example's number forms.
        (
            "[333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001]",
            b"[333333333.3333333,1e+30,4.5,0.002,1e-27]",
        ),
        (
            '{"\\u20ac":1,"\\r":2,"\\ud83d\\ude00":3,"1":4,"\\u00f6":5}',
            '{"\\r":2,"1":4,"ö":5,"€":1,"😀":3}'.encode(),
        ),
        ("-0.0", b"0"),
    ],
)
def test_rfc_8785_examples(text: str, expected: bytes) -> None:
    assert native.canonical_json(text) == expected


@pytest.mark.parametrize("text", ["{", "NaN", "[1,]", '"\\ud800"', "1e400"])
def test_text_without_a_canonical_form_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="no canonical JSON"):
        native.canonical_json(text)


def test_the_strict_text_path_refuses_what_the_kernel_refuses() -> None:
    assert native.canonical_json('{"a":1,"a":2}') == b'{"a":2}'
    assert native.canonical_json("2.0") == b"2"
    for text in ['{"a":1,"a":2}', "2.0", str(2**53), "0.123456789012345678901"]:
        with pytest.raises(ValueError, match="no canonical JSON"):
            native.canonical_json(text, strict=True)
    assert native.canonical_json('{"b":[1,2.5],"a":null}', strict=True) == b'{"a":null,"b":[1,2.5]}'
    assert math.isclose(json.loads(native.canonical_json("1e21")), 1e21)
