"""What the interceptor sends as a call's parameters, and what it accepts back."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from chio_receipts.interceptor import (
    SIDECAR_ERROR_TYPE,
    ChioActivityInterceptor,
    EvaluationRequest,
    InMemoryReceiptSink,
    SignedReceipt,
    WorkflowGrant,
)
from chio_receipts.interceptor._parameters import MAX_PARAMETER_BYTES, activity_parameters
from chio_receipts.schemas import check_chio_step, parameter_hash, sign_receipt
from chio_receipts.sidecar import LocalSidecar

pytestmark = pytest.mark.unit


@dataclasses.dataclass
class Order:
    sku: str
    qty: int


def _info(**kw: object) -> Any:
    base = ActivityEnvironment.default_info()
    defaults: dict[str, object] = {
        "workflow_id": "wf-1",
        "workflow_run_id": "run-1",
        "workflow_type": "Wf",
        "activity_type": "charge",
        "namespace": "default",
        "current_attempt_scheduled_time": datetime(2026, 1, 1, tzinfo=UTC),
    }
    defaults.update(kw)
    return dataclasses.replace(base, **defaults)  # type: ignore[arg-type]


def test_arguments_become_json_as_temporal_converts_them() -> None:
    args = ["x", 3, None, {"k": (1, 2)}, Order("sku-1", 2), datetime(2026, 1, 2, tzinfo=UTC)]
    assert activity_parameters(args, "dg") == {
        "args": [
            "x",
            3,
            None,
            {"k": [1, 2]},
            {"sku": "sku-1", "qty": 2},
            "2026-01-02T00:00:00+00:00",
        ]
    }
    assert activity_parameters([], "dg") == {"args": []}


@pytest.mark.parametrize(
    "args",
    [
        [b"raw bytes"],
        [float("nan")],
        [2**60],
        [object()],
        ["x" * (MAX_PARAMETER_BYTES + 1)],
    ],
    ids=["binary", "nan", "unsafe-int", "unconvertible", "too-large"],
)
def test_arguments_without_a_json_form_travel_as_their_digest(args: list[Any]) -> None:
    assert activity_parameters(args, "digest-hex") == {"args_digest": "digest-hex"}


async def _interceptor(
    side: Any, *, redact: bool = False
) -> tuple[ChioActivityInterceptor, InMemoryReceiptSink]:
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(evaluator=side, receipt_sink=sink, redact_parameters=redact)
    cap = await side.create_capability("agent:a", ["charge"], 60)
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-1", token=cap))
    return icp, sink


@pytest.mark.parametrize("redact", [False, True])
async def test_the_published_step_signs_the_arguments_unless_redacted(redact: bool) -> None:
    side = LocalSidecar()
    icp, sink = await _interceptor(side, redact=redact)
    args = [Order("secret-sku", 7), "note"]
    await icp.before_attempt(_info(), args)
    ((step, body),) = sink.steps
    assert check_chio_step(step, trusted_keys=side.trusted_keys()) is None
    chio = json.loads(step.chio_receipt)
    expected = {"args": [{"sku": "secret-sku", "qty": 7}, "note"]}
    assert chio["action"]["parameter_hash"] == parameter_hash(expected)
    if redact:
        assert chio["action"]["parameters"] == {}
        assert b"secret-sku" not in body
    else:
        assert chio["action"]["parameters"] == expected
        assert b"secret-sku" in body


async def test_an_unconvertible_argument_never_fails_the_attempt() -> None:
    side = LocalSidecar()
    icp, sink = await _interceptor(side)
    await icp.before_attempt(_info(), [object()])
    ((step, _),) = sink.steps
    chio = json.loads(step.chio_receipt)
    assert chio["action"]["parameters"] == {"args_digest": step.argument_digest}


class _Lying:
    """An evaluator that signs other parameters than those sent, or ignores redaction."""

    def __init__(self, change: str) -> None:
        self.inner = LocalSidecar()
        self.change = change

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def evaluate(self, request: EvaluationRequest) -> SignedReceipt:
        if self.change == "parameters":
            request = dataclasses.replace(request, parameters={"args": ["other"]})
        else:
            request = dataclasses.replace(request, redact_parameters=False)
        signed = self.inner.evaluate_now(request)
        step, body = sign_receipt(signed.receipt, self.inner._key)
        return SignedReceipt(receipt=step, body=body)


@pytest.mark.parametrize("change", ["parameters", "redaction"])
async def test_a_receipt_of_other_parameters_is_refused_and_never_published(change: str) -> None:
    icp, sink = await _interceptor(_Lying(change), redact=change == "redaction")
    with pytest.raises(ApplicationError) as caught:
        await icp.before_attempt(_info(), ["secret-argument"])
    assert caught.value.type == SIDECAR_ERROR_TYPE
    assert not caught.value.non_retryable
    assert "secret-argument" not in str(caught.value)
    assert "secret-argument" not in repr(caught.value.details)
    assert not sink.steps
