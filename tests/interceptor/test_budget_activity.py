"""How ``BudgetReversal`` turns the sidecar's answers into a refund or an ``ApplicationError``
(the sidecar's HTTP answers stubbed; the real sidecar and worker are in
``tests/e2e/test_budget_reversal.py``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError

from chio_receipts.interceptor import (
    BUDGET_REFUSED_ERROR_TYPE,
    SIDECAR_ERROR_TYPE,
    BudgetReversal,
    current_receipt_id,
)

pytestmark = pytest.mark.unit

RECEIPT = "01a2-secret-receipt-id"
OK = {
    "status": "already_reversed",
    "refunded": False,
    "receipt_id": RECEIPT,
    "hold_id": "budget-hold:r:cap:0",
    "capability_id": "cap",
    "refunded_units": 0,
    "refunded_invocations": 0,
    "currency": "EUR",
    "refund_receipt_id": "abc",
    "receipt": None,
}


def _reversal(status: int, body: Any, seen: list[dict[str, Any]]) -> BudgetReversal:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append({"path": request.url.path, **json.loads(request.content)})
        return httpx.Response(status, json=body)

    return BudgetReversal("http://sidecar", token="t0k", transport=httpx.MockTransport(answer))


async def test_a_refund_answer_and_the_run_it_names() -> None:
    seen: list[dict[str, Any]] = []
    refund = await _reversal(200, OK, seen).refund(RECEIPT, workflow_id="wf", run_id="r1")
    assert (refund.status, refund.refunded, refund.refund_receipt_id) == (
        "already_reversed",
        False,
        "abc",
    )
    assert seen == [
        {"path": "/v1/budgets/reverse", "receipt_id": RECEIPT, "workflow_id": "wf", "run_id": "r1"}
    ]


@pytest.mark.parametrize(
    ("status", "body", "kind", "retryable"),
    [
        (
            404,
            {"error": "no_charge", "reason": f"no budget charge for receipt {RECEIPT}"},
            BUDGET_REFUSED_ERROR_TYPE,
            False,
        ),
        (403, {"error": "other_run", "reason": RECEIPT}, BUDGET_REFUSED_ERROR_TYPE, False),
        (503, {"error": "store_unavailable", "reason": "x"}, SIDECAR_ERROR_TYPE, True),
        (200, {"status": "reversed"}, SIDECAR_ERROR_TYPE, True),
    ],
)
async def test_refusals_and_failures_never_quote_the_receipt(
    status: int, body: dict[str, Any], kind: str, retryable: bool
) -> None:
    with pytest.raises(ApplicationError) as caught:
        await _reversal(status, body, []).refund(RECEIPT, workflow_id="wf", run_id="r1")
    assert caught.value.type == kind
    assert caught.value.non_retryable is not retryable
    assert RECEIPT not in str(caught.value)
    assert RECEIPT not in repr(caught.value.details)


async def test_an_unreachable_sidecar_is_retryable() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    reversal = BudgetReversal("http://sidecar", transport=httpx.MockTransport(down))
    with pytest.raises(ApplicationError) as caught:
        await reversal.refund(RECEIPT, workflow_id="wf", run_id="r1")
    assert (caught.value.type, caught.value.non_retryable) == (SIDECAR_ERROR_TYPE, False)


def test_outside_an_activity_there_is_no_current_receipt() -> None:
    assert current_receipt_id() == ""
