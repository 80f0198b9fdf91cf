"""The kernel's own verifier (chio-core-types, bound natively) against the project's Python one.

Receipts come from the sidecar in-process (``LocalSidecar``: allow and deny, redacted or not,
hypothesis-generated parameters), from the kernel crates' vectors, and tampered copies of each.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import chio_receipts_native as native
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chio_receipts import schemas
from chio_receipts.schemas import EvaluationRequest, Verdict
from chio_receipts.sidecar import LocalSidecar

pytestmark = pytest.mark.unit

VECTORS = Path(__file__).resolve().parent.parent / "schemas" / "vectors"
SIDE = LocalSidecar()
CAP = SIDE.mint("agent:native", ["charge"], 3600)
TRUSTED = sorted(SIDE.trusted_keys())

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)
)
parameters = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        json_leaves,
        lambda i: st.lists(i, max_size=3) | st.dictionaries(st.text(max_size=4), i, max_size=3),
        max_leaves=8,
    ),
    max_size=4,
)


def _receipt(tool: str, params: dict[str, Any], redact: bool, attempt: int) -> dict[str, Any]:
    request = EvaluationRequest(
        capability_id=CAP.id,
        tool_server="payments",
        tool=tool,
        namespace="ns",
        workflow_id="wf-native",
        run_id="run-1",
        workflow_type="Pay",
        task_queue="q",
        activity_id="1",
        activity_type=tool,
        attempt=attempt,
        argument_digest="d" * 64,
        argument_key_id="args-1",
        scheduled_at=1_700_000_000_000_000,
        started_at=1_700_000_000_000_100,
        worker_identity="w@h",
        prev_hash=bytes(32),
        parameters={"args": [params]},
        redact_parameters=redact,
    )
    step = SIDE.evaluate_now(request).receipt
    assert step.verdict is (Verdict.ALLOW if tool == "charge" else Verdict.DENY)
    receipt: dict[str, Any] = json.loads(step.chio_receipt)
    return receipt


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))]
    return [path]


def _tampered(receipt: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    out = copy.deepcopy(receipt)
    target = out
    for step in path[:-1]:
        target = target[step]
    old = target[path[-1]]
    if isinstance(old, bool):
        new: Any = not old
    elif isinstance(old, (int, float)):
        new = old + 1 if old + 1 != old else -old - 1  # a float past 2^53 absorbs the +1
    elif (
        isinstance(old, str) and len(old) in (64, 128) and all(c in "0123456789abcdef" for c in old)
    ):
        new = ("1" if old[0] != "1" else "2") + old[1:]  # still hex: a different key or signature
    else:
        new = f"{old}x"
    target[path[-1]] = new
    return out


def _agree(receipt: dict[str, Any], trusted: list[str] | None) -> bool:
    ours = schemas.verify_kernel_receipt(receipt, trusted_keys=trusted)
    valid, reason = native.verify_kernel_receipt(json.dumps(receipt), trusted)
    assert valid is ours.valid, (reason, ours.reason)
    assert (reason is None) is valid
    return valid


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["charge", "refund"]),
    parameters,
    st.booleans(),
    st.integers(1, 5),
    st.data(),
)
def test_sidecar_receipts_and_their_tampered_copies_get_the_same_verdict(
    tool: str, params: dict[str, Any], redact: bool, attempt: int, data: st.DataObject
) -> None:
    receipt = _receipt(tool, params, redact, attempt)
    assert _agree(receipt, None)
    assert _agree(receipt, TRUSTED)
    assert not _agree(receipt, ["ab" * 32])
    # Re-ordered fields and whitespace are the same receipt.
    assert _agree(dict(reversed(list(receipt.items()))), TRUSTED)
    paths = _leaves(receipt)
    for path in data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=6, unique=True)):
        assert not _agree(_tampered(receipt, path), None), path


def _vectors() -> list[dict[str, Any]]:
    bundle = json.loads((VECTORS / "v318_receipt_bundle.json").read_text("utf-8"))
    loopback = json.loads((VECTORS / "loopback_tool_receipts.json").read_text("utf-8"))
    return [bundle, *loopback["toolReceipts"]]


@pytest.mark.parametrize("index", range(4))
def test_the_kernel_crates_vectors_and_every_tampered_leaf(index: int) -> None:
    receipt = _vectors()[index]
    assert _agree(receipt, None)
    paths = _leaves(receipt)
    assert len(paths) > 10
    for path in paths:
        assert not _agree(_tampered(receipt, path), None), path


def test_unreadable_input_is_invalid_with_a_reason() -> None:
    for text in ["", "{", "[]", '{"id": 1}']:
        valid, reason = native.verify_kernel_receipt(text)
        assert not valid
        assert reason
    receipt = _receipt("charge", {"a": 1}, False, 1)
    valid, reason = native.verify_kernel_receipt(json.dumps(receipt), ["0x" + TRUSTED[0].upper()])
    assert valid, reason
    receipt["signature"] = "00" * 64
    assert native.verify_kernel_receipt(json.dumps(receipt)) == (False, "verify_signature: invalid")
