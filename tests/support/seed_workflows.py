"""The seed's workflows, written against its import path (``chio_temporal``).

``AgentWorkflow`` calls the seed's three tool activities in order; ``TransferWorkflow`` is the
seed's saga, as written, matching denials on ``chio_temporal.DENIED_ERROR_TYPE``. The
activities are those of :mod:`tests.support.workflows` (their bodies record what ran).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from chio_temporal import DENIED_ERROR_TYPE
    from tests.support.workflows import (
        Transfer,
        TransferResult,
        call_tool,
        credit_account,
        debit_account,
        read_database,
        send_email,
    )


@workflow.defn
class AgentWorkflow:
    @workflow.run
    async def run(self, arg: str) -> list[str]:
        results = []
        for step in (call_tool, read_database, send_email):
            results.append(
                await workflow.execute_activity(
                    step, args=[arg], start_to_close_timeout=timedelta(seconds=30)
                )
            )
        return results


@workflow.defn
class TransferWorkflow:
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
