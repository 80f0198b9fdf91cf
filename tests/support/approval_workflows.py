"""A workflow whose payments need a person's approval (importable by the workflow sandbox)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

PAID: dict[str, list[str]] = {}
"""Bodies that ran, per workflow id."""

RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=5)


@activity.defn
async def pay(amount: str) -> str:
    info = activity.info()
    PAID.setdefault(info.workflow_id or "", []).append(amount)
    return f"paid {amount}"


@activity.defn
async def look_up(what: str) -> str:
    return f"found {what}"


@dataclass
class Payments:
    amounts: list[str]
    local: bool = False


@workflow.defn
class PaymentsWorkflow:
    """Look something up, then pay each amount (each payment needs an approval)."""

    @workflow.run
    async def run(self, plan: Payments) -> list[str]:
        out = [
            await workflow.execute_activity(
                look_up, "invoice", start_to_close_timeout=timedelta(seconds=10)
            )
        ]
        for amount in plan.amounts:
            if plan.local:
                out.append(
                    await workflow.execute_local_activity(
                        pay,
                        amount,
                        start_to_close_timeout=timedelta(seconds=10),
                        retry_policy=RETRY,
                    )
                )
            else:
                out.append(
                    await workflow.execute_activity(
                        pay,
                        amount,
                        start_to_close_timeout=timedelta(seconds=10),
                        retry_policy=RETRY,
                    )
                )
        return out
