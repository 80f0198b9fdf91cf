"""``reverse_budget_charge``: the activity saga compensation calls to refund a budget charge.

A decision on a grant with a budget (``max_invocations``, ``max_cost_per_invocation``,
``max_total_cost``) charges it in the sidecar's store, keyed by the decision's receipt id.
When a saga compensates a step, it can give the budget back too::

    from chio_receipts.interceptor import current_receipt_id, reverse_budget_charge

    @activity.defn
    async def debit_account(account: str, amount: int) -> Debit:
        ...
        return Debit(text=..., receipt_id=current_receipt_id())   # this attempt's decision

    # in the workflow's compensation
    await workflow.execute_activity(
        reverse_budget_charge, debit.receipt_id, start_to_close_timeout=timedelta(seconds=30)
    )

The activity asks the sidecar (``POST /v1/budgets/reverse``, as the worker, for its own run:
the run the activity belongs to) to refund that receipt's charge. The sidecar refunds it exactly
once and signs a receipt of the refund (kept in its receipt log); a second call, Temporal's
retry of an attempt whose answer was lost included, refunds nothing and says so
(``refunded=False``, status ``already_reversed``, the first refund's receipt id). Being an
activity, each attempt is gated by the interceptor like any other, so it needs
``reverse_budget_charge`` in the grant's scope, and leaves its step receipt in the run's
envelope.

The sidecar's URL and bearer token come from :class:`BudgetReversal` (or, for the module-level
:data:`reverse_budget_charge`, from ``CHIO_SIDECAR_URL`` and ``CHIO_SIDECAR_TOKEN``). A refusal
(no charge for that receipt, a charge of another run) fails the activity for good
(``ApplicationError`` of type :data:`BUDGET_REFUSED_ERROR_TYPE`, non-retryable); an unreachable
or failing sidecar fails it retryably. Neither the argument nor the answer is logged, and
errors never quote the receipt id.
"""

from __future__ import annotations

import contextvars
import os
import socket
from dataclasses import dataclass
from typing import Any

import httpx
import temporalio.activity
from temporalio.exceptions import ApplicationError

from chio_receipts.interceptor._errors import SIDECAR_ERROR_TYPE
from chio_receipts.schemas import StepReceipt

__all__ = [
    "BUDGET_REFUSED_ERROR_TYPE",
    "BudgetRefund",
    "BudgetReversal",
    "current_receipt_id",
    "reverse_budget_charge",
]

BUDGET_REFUSED_ERROR_TYPE = "ChioBudgetReversalRefused"
"""``ApplicationError.type`` of a refund the sidecar refuses (non-retryable)."""

_DEFAULT_URL = "http://127.0.0.1:9090"

CURRENT_DECISION: contextvars.ContextVar[StepReceipt | None] = contextvars.ContextVar(
    "chio_current_decision", default=None
)
"""The decision of the activity attempt running in this context (set by the interceptor)."""


def current_receipt_id() -> str:
    """The receipt id of the running attempt's decision ("" outside a gated activity): what
    :data:`reverse_budget_charge` refunds."""
    decision = CURRENT_DECISION.get()
    return decision.receipt_id if decision is not None else ""


@dataclass
class BudgetRefund:
    """What a refund did. ``refunded`` is False when the charge had been refunded before
    (``status`` ``already_reversed``); ``refund_receipt_id`` names the refund's signed
    receipt either way."""

    status: str
    refunded: bool
    receipt_id: str
    refund_receipt_id: str
    refunded_units: int
    refunded_invocations: int
    currency: str


class BudgetReversal:
    """The ``reverse_budget_charge`` activity bound to a sidecar: register
    ``BudgetReversal(url, token=...).reverse_budget_charge`` with the worker.

    ``transport`` is for tests; ``timeout`` bounds one request (seconds).
    """

    def __init__(
        self,
        sidecar_url: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = sidecar_url or os.environ.get("CHIO_SIDECAR_URL") or _DEFAULT_URL
        self.sidecar_url = url.rstrip("/")
        self._token = token if token is not None else os.environ.get("CHIO_SIDECAR_TOKEN")
        self._timeout = timeout
        self._transport = transport

    def __repr__(self) -> str:
        return f"BudgetReversal({self.sidecar_url!r})"

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        headers = {"accept": "application/json"}
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        transport = self._transport or httpx.AsyncHTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        async with httpx.AsyncClient(
            base_url=self.sidecar_url, headers=headers, timeout=self._timeout, transport=transport
        ) as client:
            return await client.post("/v1/budgets/reverse", json=body)

    async def refund(self, receipt_id: str, *, workflow_id: str, run_id: str) -> BudgetRefund:
        """Ask the sidecar to refund the charge of ``receipt_id`` made for the given run."""
        try:
            answer = await self._post(
                {"receipt_id": receipt_id, "workflow_id": workflow_id, "run_id": run_id}
            )
        except httpx.HTTPError as exc:
            raise ApplicationError(
                f"policy sidecar unreachable, the refund will be retried ({type(exc).__name__})",
                type=SIDECAR_ERROR_TYPE,
                non_retryable=False,
            ) from None
        if answer.status_code == 200:
            try:
                data = answer.json()
                return BudgetRefund(
                    status=str(data["status"]),
                    refunded=bool(data["refunded"]),
                    receipt_id=str(data["receipt_id"]),
                    refund_receipt_id=str(data["refund_receipt_id"]),
                    refunded_units=int(data["refunded_units"]),
                    refunded_invocations=int(data["refunded_invocations"]),
                    currency=str(data["currency"]),
                )
            except (ValueError, KeyError, TypeError):
                raise ApplicationError(
                    "the sidecar's refund answer does not hold, the refund will be retried",
                    type=SIDECAR_ERROR_TYPE,
                    non_retryable=False,
                ) from None
        error = _error_code(answer)
        if answer.status_code in (400, 401, 403, 404, 409, 413, 422):
            raise ApplicationError(
                f"the sidecar refused the budget refund: {error} (HTTP {answer.status_code})",
                {"error": error, "status": answer.status_code},
                type=BUDGET_REFUSED_ERROR_TYPE,
                non_retryable=True,
            )
        raise ApplicationError(
            f"the sidecar failed the budget refund, it will be retried (HTTP {answer.status_code})",
            type=SIDECAR_ERROR_TYPE,
            non_retryable=False,
        )

    @temporalio.activity.defn(name="reverse_budget_charge")
    async def reverse_budget_charge(self, receipt_id: str) -> BudgetRefund:
        """Refund the budget charge of the decision ``receipt_id`` (of this run) exactly once."""
        info = temporalio.activity.info()
        return await self.refund(
            receipt_id, workflow_id=info.workflow_id or "", run_id=info.workflow_run_id or ""
        )


def _error_code(answer: httpx.Response) -> str:
    try:
        data = answer.json()
    except ValueError:
        return "unreadable_answer"
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and code.isidentifier() else "refused"


@temporalio.activity.defn(name="reverse_budget_charge")
async def reverse_budget_charge(receipt_id: str) -> BudgetRefund:
    """Refund the budget charge of the decision ``receipt_id`` (of this run) exactly once,
    at the sidecar named by ``CHIO_SIDECAR_URL`` (token ``CHIO_SIDECAR_TOKEN``)."""
    info = temporalio.activity.info()
    return await BudgetReversal().refund(
        receipt_id, workflow_id=info.workflow_id or "", run_id=info.workflow_run_id or ""
    )
