"""The demo's tools: small activities whose calls the interceptor gates and receipts.

They are deliberately trivial; what the demo shows is the receipts around them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from chio_receipts.interceptor import current_receipt_id

__all__ = [
    "ALL_ACTIVITIES",
    "Debit",
    "Payment",
    "call_tool",
    "check_balance",
    "credit_account",
    "debit_account",
    "execute_action",
    "flaky_tool",
    "notify_rejection",
    "pay",
    "read_database",
    "refund_account",
    "send_email",
    "summarize",
]


@dataclass
class Debit:
    """What a debit did, and the receipt id of its decision (whose budget charge a saga's
    compensation refunds with ``reverse_budget_charge``)."""

    text: str
    receipt_id: str


@activity.defn
async def debit_account(account: str, amount: int) -> Debit:
    """Take ``amount`` from ``account``."""
    return Debit(text=f"debited {amount} from {account}", receipt_id=current_receipt_id())


@activity.defn
async def credit_account(account: str, amount: int) -> str:
    """Give ``amount`` to ``account`` (denied by the demo's transfer grant)."""
    return f"credited {amount} to {account}"


@activity.defn
async def refund_account(account: str, amount: int) -> str:
    """Compensation: give a debited ``amount`` back."""
    return f"refunded {amount} to {account}"


@activity.defn
async def check_balance(account: str) -> int:
    """Read a balance."""
    return 1000 + len(account)


@activity.defn
async def call_tool(name: str) -> str:
    """A generic agent tool call (the fan-out runs many in parallel)."""
    await asyncio.sleep(0.01)
    return f"tool {name} ok"


@activity.defn
async def read_database(query: str) -> int:
    """Read-only query."""
    return len(query)


@activity.defn
async def summarize(parts: list[str]) -> str:
    """Fold results into one line."""
    return "; ".join(parts)


@activity.defn
async def send_email(to: str) -> str:
    """Outbound email."""
    return f"mail to {to}"


@activity.defn
async def execute_action(action: str) -> str:
    """The action a human approved."""
    return f"executed {action}"


@activity.defn
async def notify_rejection(action: str) -> str:
    """Tell the requester that a human rejected the action."""
    return f"rejected {action}"


@dataclass
class Payment:
    """A payment to ``payee`` of ``amount_usd`` dollars (one keyed argument, so a grant's
    ``max_transaction_amount_usd`` constraint and a Cedar policy can read its fields)."""

    payee: str
    amount_usd: int


@activity.defn
async def pay(payment: Payment) -> str:
    """Pay ``payment.payee`` (the grant caps the amount; a Cedar policy blocks a payee)."""
    return f"paid {payment.amount_usd} USD to {payment.payee}"


@activity.defn
async def flaky_tool(name: str) -> str:
    """Fails on its first two attempts, then succeeds: every attempt gets a receipt."""
    attempt = activity.info().attempt
    if attempt < 3:
        raise ApplicationError(f"{name}: transient failure on attempt {attempt}")
    return f"{name} ok on attempt {attempt}"


ALL_ACTIVITIES: list[Callable[..., Any]] = [
    debit_account,
    credit_account,
    refund_account,
    check_balance,
    call_tool,
    read_database,
    summarize,
    send_email,
    execute_action,
    notify_rejection,
    flaky_tool,
    pay,
]
