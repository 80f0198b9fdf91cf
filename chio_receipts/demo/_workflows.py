"""The demo's workflows: the Temporal patterns real workflows use (saga, fan-out, child,
continue-as-new, human approval through the sidecar and a signal, schedules, retries, two
worker processes)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from chio_receipts.demo import _activities as acts
    from chio_receipts.demo._activities import Payment

__all__ = [
    "ALL_WORKFLOWS",
    "DENIED_ERROR_TYPE",
    "ApprovalWorkflow",
    "BudgetedToolWorkflow",
    "ChildWorkflow",
    "ContinueAsNewWorkflow",
    "DeniedFirstStepWorkflow",
    "FanOutWorkflow",
    "FlakyToolWorkflow",
    "GuardedTaskWorkflow",
    "ParentWorkflow",
    "Payment",
    "PaymentWorkflow",
    "ScheduledReportWorkflow",
    "SplitWorkersWorkflow",
    "Transfer",
    "TransferWorkflow",
]

# The interceptor's deny type (interceptor.DENIED_ERROR_TYPE); a literal here keeps the workflow
# sandbox free of the interceptor's imports.
DENIED_ERROR_TYPE = "ChioCapabilityDenied"
_T = timedelta(seconds=30)


@dataclass
class Transfer:
    """A money transfer between two accounts."""

    source: str
    destination: str
    amount: int


@workflow.defn
class TransferWorkflow:
    """The seed's saga: debit, credit; a denied credit runs the compensation and re-raises.

    The compensation gives the money back (``refund_account``) and the debit's budget too:
    ``reverse_budget_charge`` refunds the charge of the debit's decision (its receipt id, which
    the debit returns), exactly once, with a signed receipt of the refund."""

    @workflow.run
    async def run(self, transfer: Transfer) -> str:
        """Debit then credit; compensate on a policy deny."""
        compensations: list[tuple[str, list[object]]] = []
        debit = await workflow.execute_activity(
            acts.debit_account,
            args=[transfer.source, transfer.amount],
            start_to_close_timeout=_T,
        )
        compensations.append(("refund_account", [transfer.source, transfer.amount]))
        compensations.append(("reverse_budget_charge", [debit.receipt_id]))
        try:
            credit = await workflow.execute_activity(
                acts.credit_account,
                args=[transfer.destination, transfer.amount],
                start_to_close_timeout=_T,
            )
        except ApplicationError as exc:
            # The interceptor hands a deny to workflow code as the ApplicationError itself.
            if exc.type == DENIED_ERROR_TYPE:
                for name, args in compensations:  # the money first, then its budget
                    await workflow.execute_activity(name, args=args, start_to_close_timeout=_T)
            raise
        return f"{debit.text}; {credit}"


@workflow.defn
class BudgetedToolWorkflow:
    """Tool calls under a grant with ``max_invocations``: the call past the budget is denied
    (guard ``budget``) and the run fails with that deny."""

    @workflow.run
    async def run(self, calls: int) -> str:
        """Call the tool ``calls`` times, one after the other."""
        for i in range(calls):
            await workflow.execute_activity(
                acts.call_tool, f"budgeted-{i}", start_to_close_timeout=_T
            )
        return f"{calls} calls"


@workflow.defn
class FanOutWorkflow:
    """Parallel tool calls gathered, then summarized."""

    @workflow.run
    async def run(self, width: int) -> str:
        """Run ``width`` tool calls at once."""
        results = await asyncio.gather(
            *(
                workflow.execute_activity(acts.call_tool, f"t{i}", start_to_close_timeout=_T)
                for i in range(width)
            )
        )
        return await workflow.execute_activity(
            acts.summarize, list(results), start_to_close_timeout=_T
        )


@workflow.defn
class ChildWorkflow:
    """A child run with its own receipts."""

    @workflow.run
    async def run(self, account: str) -> int:
        """Read a balance and query the database."""
        balance = await workflow.execute_activity(
            acts.check_balance, account, start_to_close_timeout=_T
        )
        await workflow.execute_activity(
            acts.read_database, f"select {account}", start_to_close_timeout=_T
        )
        return balance


@workflow.defn
class ParentWorkflow:
    """A parent that calls a tool and starts a child workflow."""

    @workflow.run
    async def run(self, account: str) -> str:
        """Tool call, child workflow, email."""
        await workflow.execute_activity(acts.call_tool, "plan", start_to_close_timeout=_T)
        balance = await workflow.execute_child_workflow(
            ChildWorkflow.run, account, id=f"{workflow.info().workflow_id}-child"
        )
        await workflow.execute_activity(acts.send_email, account, start_to_close_timeout=_T)
        return f"{account}: {balance}"


@workflow.defn
class ContinueAsNewWorkflow:
    """A loop that continues as new until its counter runs out: one run per iteration."""

    @workflow.run
    async def run(self, remaining: int) -> str:
        """One tool call per run."""
        await workflow.execute_activity(
            acts.call_tool, f"iteration-{remaining}", start_to_close_timeout=_T
        )
        if remaining > 1:
            workflow.continue_as_new(remaining - 1)
        return "loop done"


@workflow.defn
class ApprovalWorkflow:
    """Human in the loop: the action needs a person's approval (a guard in the sidecar asks for
    it). The worker holds the attempt, the run waits for the decision signal without burning a
    retry, and the action runs once approved; a rejection is a ``ChioCapabilityDenied`` naming
    the approver, and the requester is notified."""

    @workflow.run
    async def run(self, action: str) -> str:
        """Check, then execute (held until a person decides), or notify a rejection."""
        await workflow.execute_activity(
            acts.read_database, f"context for {action}", start_to_close_timeout=_T
        )
        try:
            return await workflow.execute_activity(
                acts.execute_action, action, start_to_close_timeout=_T
            )
        except ApplicationError as exc:
            if exc.type != DENIED_ERROR_TYPE:
                raise
        return await workflow.execute_activity(
            acts.notify_rejection, action, start_to_close_timeout=_T
        )


@workflow.defn
class DeniedFirstStepWorkflow:
    """A request the policy denies at its first step: the run fails with the deny."""

    @workflow.run
    async def run(self, to: str) -> str:
        """Send an email (outside the grant's scope)."""
        return await workflow.execute_activity(acts.send_email, to, start_to_close_timeout=_T)


@workflow.defn
class GuardedTaskWorkflow:
    """Seed 003's task: its input is checked by the grant's constraint, not by a mock policy
    activity (an input starting with ``forbidden`` is denied before the tool runs)."""

    @workflow.run
    async def run(self, task: str) -> str:
        """Run the task as an action."""
        return await workflow.execute_activity(acts.execute_action, task, start_to_close_timeout=_T)


@workflow.defn
class PaymentWorkflow:
    """One payment, inside the grant's ceiling and the policy's blocked payees."""

    @workflow.run
    async def run(self, payment: Payment) -> str:
        """Pay."""
        return await workflow.execute_activity(acts.pay, payment, start_to_close_timeout=_T)


@workflow.defn
class ScheduledReportWorkflow:
    """Started by a Temporal schedule; its grant comes from the task-queue resolver."""

    @workflow.run
    async def run(self) -> int:
        """A read-only report."""
        return await workflow.execute_activity(
            acts.read_database, "daily report", start_to_close_timeout=_T
        )


@workflow.defn
class FlakyToolWorkflow:
    """A tool that fails twice before it works: three attempts, three receipts."""

    @workflow.run
    async def run(self, name: str) -> str:
        """Retry quickly until the tool succeeds."""
        return await workflow.execute_activity(
            acts.flaky_tool,
            name,
            start_to_close_timeout=_T,
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=100),
                backoff_coefficient=1.0,
                maximum_attempts=5,
            ),
        )


@workflow.defn
class SplitWorkersWorkflow:
    """Activities of one run on two task queues served by two worker processes."""

    @workflow.run
    async def run(self, other_queue: str, width: int) -> str:
        """Half the calls on this worker's queue, half on the other process's queue."""
        calls = []
        for i in range(width):
            queue = other_queue if i % 2 else workflow.info().task_queue
            calls.append(
                workflow.execute_activity(
                    acts.call_tool, f"split-{i}", task_queue=queue, start_to_close_timeout=_T
                )
            )
        results = await asyncio.gather(*calls)
        return f"{len(results)} calls on two workers"


ALL_WORKFLOWS = [
    TransferWorkflow,
    FanOutWorkflow,
    ChildWorkflow,
    ParentWorkflow,
    ContinueAsNewWorkflow,
    ApprovalWorkflow,
    DeniedFirstStepWorkflow,
    ScheduledReportWorkflow,
    FlakyToolWorkflow,
    SplitWorkersWorkflow,
    GuardedTaskWorkflow,
    PaymentWorkflow,
    BudgetedToolWorkflow,
]
