"""``call_parameters`` (digest, parameters and their hash in one pass) is the three separate
computations it replaces, for any JSON arguments and for arguments with no JSON form."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import temporalio.converter
from hypothesis import given, settings
from hypothesis import strategies as st

from chio_receipts.interceptor import ArgumentKey, argument_digest
from chio_receipts.interceptor._parameters import activity_parameters, call_parameters
from chio_receipts.schemas import parameter_hash

pytestmark = pytest.mark.unit

KEY = ArgumentKey("k1", bytes(range(32)))
text = st.text(max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats() | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def _separately(args: list[Any], converter: Any = None) -> tuple[str, dict[str, Any], str]:
    digest = argument_digest(KEY, args, converter)
    parameters = activity_parameters(args, digest, converter)
    return digest, parameters, parameter_hash(parameters)


@settings(max_examples=300, deadline=None)
@given(st.lists(json_values, max_size=3))
def test_the_same_as_digest_parameters_and_hash_apart(args: list[Any]) -> None:
    assert call_parameters(KEY, args) == _separately(args)
    default = temporalio.converter.default().payload_converter
    assert call_parameters(KEY, args, default) == _separately(args, default)


@dataclasses.dataclass
class _Order:
    order_id: str


@pytest.mark.parametrize(
    "args",
    [
        [b"raw bytes"],
        [_Order("o-1")],
        [None, {"n": 2**60}],
        [float("nan")],
        ["x" * 40_000],
    ],
)
def test_arguments_without_plain_json_parameters(args: list[Any]) -> None:
    digest, parameters, hashed = call_parameters(KEY, args)
    assert (digest, parameters, hashed) == _separately(args)
