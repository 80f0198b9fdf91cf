"""Start the local stack and run a sample workflow through a worker."""

from __future__ import annotations

import uuid
from datetime import timedelta

from rich.console import Console
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

from chio_receipts._config import AppConfig
from chio_receipts.stack import LocalStack, StackConfig

__all__ = ["run_demo"]


@activity.defn
async def lookup_account(account: str) -> str:
    """Sample tool: look an account up."""
    return f"account:{account}"


@activity.defn
async def check_balance(account: str) -> int:
    """Sample tool: read a balance."""
    return 100 + len(account)


@activity.defn
async def send_receipt_email(summary: str) -> str:
    """Sample tool: send an email."""
    return f"sent({summary})"


@workflow.defn(sandboxed=False)
class SampleWorkflow:
    """Three tool calls in sequence."""

    @workflow.run
    async def run(self, account: str) -> str:
        """Look up, read the balance, send an email."""
        timeout = timedelta(seconds=10)
        found = await workflow.execute_activity(
            lookup_account, account, start_to_close_timeout=timeout
        )
        balance = await workflow.execute_activity(
            check_balance, found, start_to_close_timeout=timeout
        )
        return await workflow.execute_activity(
            send_receipt_email, f"{found} balance={balance}", start_to_close_timeout=timeout
        )


async def run_demo(cfg: AppConfig, *, keep: bool, console: Console) -> None:
    """Start the stack, run the sample workflow, print what happened, stop (unless ``keep``)."""
    stack = LocalStack(
        StackConfig(
            data_dir=cfg.data_dir / "demo",
            cache_dir=cfg.cache_dir,
            clickhouse_dsn=cfg.clickhouse_dsn,
        )
    )
    with console.status("starting Kafka and the Temporal dev server"):
        await stack.start()
    try:
        console.print(f"temporal {stack.temporal_address}, kafka {stack.kafka_bootstrap}")
        client = await Client.connect(stack.temporal_address)
        queue = f"demo-{uuid.uuid4().hex[:8]}"
        async with Worker(
            client,
            task_queue=queue,
            workflows=[SampleWorkflow],
            activities=[lookup_account, check_balance, send_receipt_email],
        ):
            handle = await client.start_workflow(
                SampleWorkflow.run, "alice", id=f"sample-{uuid.uuid4().hex[:8]}", task_queue=queue
            )
            result = await handle.result()
        console.print(f"workflow {handle.id} completed: {result}")
    finally:
        if keep:
            stack.write_state()
            console.print("stack left running; stop it with: chio-receipts dev down")
        else:
            stack.stop()
