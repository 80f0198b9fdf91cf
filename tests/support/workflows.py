"""Workflows and activities for the interceptor's Temporal tests (importable by the sandbox).

``TransferWorkflow`` is the seed's saga, as written. ``PlanWorkflow`` runs a list of activities
by name (``local:`` prefix for a local activity) with a short retry interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from chio_receipts.interceptor import DENIED_ERROR_TYPE

FAST_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=100),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(milliseconds=400),
    maximum_attempts=40,
)

# Side effects of the activity bodies, per workflow id: proves a body ran (or did not).
EXECUTED: dict[str, list[str]] = {}


def _ran(name: str, detail: str) -> str:
    info = activity.info()
    EXECUTED.setdefault(info.workflow_id or "", []).append(f"{name}:{detail}")
    return f"{name}:{detail}"


@activity.defn
async def call_tool(arg: str) -> str:
    return _ran("call_tool", arg)


@activity.defn
async def read_database(arg: str) -> str:
    return _ran("read_database", arg)


@activity.defn
async def send_email(arg: str) -> str:
    return _ran("send_email", arg)


@activity.defn
async def local_tool(arg: str) -> str:
    return _ran("local_tool", arg)


@activity.defn
async def debit_account(account: str, amount: int) -> str:
    return _ran("debit_account", f"{account}:{amount}")


@activity.defn
async def credit_account(account: str, amount: int) -> str:
    return _ran("credit_account", f"{account}:{amount}")


ALL_ACTIVITIES = [call_tool, read_database, send_email, local_tool, debit_account, credit_account]


@dataclass
class Plan:
    steps: list[str]
    arg: str = "x"
    max_attempts: int = 40


@workflow.defn
class PlanWorkflow:
    @workflow.run
    async def run(self, plan: Plan) -> list[str]:
        results: list[str] = []
        retry = RetryPolicy(
            initial_interval=FAST_RETRY.initial_interval,
            backoff_coefficient=FAST_RETRY.backoff_coefficient,
            maximum_interval=FAST_RETRY.maximum_interval,
            maximum_attempts=plan.max_attempts,
        )
        for step in plan.steps:
            if step.startswith("local:"):
                results.append(
                    await workflow.execute_local_activity(
                        step.removeprefix("local:"),
                        args=[plan.arg],
                        start_to_close_timeout=timedelta(seconds=10),
                        retry_policy=retry,
                    )
                )
            else:
                results.append(
                    await workflow.execute_activity(
                        step,
                        args=[plan.arg],
                        start_to_close_timeout=timedelta(seconds=10),
                        retry_policy=retry,
                    )
                )
        return results


@dataclass
class Transfer:
    source: str
    destination: str
    amount: int


@dataclass
class TransferResult:
    debit: str
    credit: str
    compensations: list[str] = field(default_factory=list)


@workflow.defn
class TransferWorkflow:
    """The seed's saga: a denied credit runs the compensations, then re-raises."""

    @workflow.run
    async def run(self, transfer: Transfer) -> TransferResult:
        compensations: list[tuple[str, list[object]]] = []
        debit = await workflow.execute_activity(
            debit_account,
            args=[transfer.source, transfer.amount],
            start_to_close_timeout=timedelta(seconds=30),
        )
        compensations.append(("credit_account", [transfer.source, transfer.amount]))
        try:
            credit = await workflow.execute_activity(
                credit_account,
                args=[transfer.destination, transfer.amount],
                start_to_close_timeout=timedelta(seconds=30),
            )
        except ApplicationError as exc:
            if exc.type == DENIED_ERROR_TYPE:
                for name, args in reversed(compensations):
                    await workflow.execute_activity(
                        name,
                        args=args,
                        start_to_close_timeout=timedelta(seconds=30),
                    )
            raise
        return TransferResult(debit=debit, credit=credit)
