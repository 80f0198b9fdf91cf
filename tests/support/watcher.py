"""Workflows, activities and a completion-watcher factory shared by the streamer tests."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer

_OPTS: dict[str, Any] = {"start_to_close_timeout": timedelta(seconds=10)}


@activity.defn
async def flaky(fail_times: int) -> int:
    if activity.info().attempt <= fail_times:
        raise RuntimeError(f"attempt {activity.info().attempt} fails on purpose")
    return activity.info().attempt


@activity.defn
async def quick() -> str:
    return "ok"


@workflow.defn(sandboxed=False)
class Sleeper:
    @workflow.run
    async def run(self) -> None:
        await workflow.sleep(timedelta(minutes=10))


@workflow.defn(sandboxed=False)
class Child:
    @workflow.run
    async def run(self) -> str:
        return await workflow.execute_activity(quick, **_OPTS)


@workflow.defn(sandboxed=False)
class Parent:
    @workflow.run
    async def run(self, child_id: str) -> str:
        return await workflow.execute_child_workflow(Child.run, id=child_id)


@workflow.defn(sandboxed=False)
class Chain:
    @workflow.run
    async def run(self, remaining: int) -> int:
        await workflow.execute_activity(quick, **_OPTS)
        if remaining > 0:
            workflow.continue_as_new(remaining - 1)
        return remaining


@workflow.defn(sandboxed=False)
class Retrying:
    @workflow.run
    async def run(self) -> int:
        policy = RetryPolicy(initial_interval=timedelta(milliseconds=50), backoff_coefficient=1.0)
        a = await workflow.execute_activity(flaky, 2, retry_policy=policy, **_OPTS)
        b = await workflow.execute_activity(flaky, 0, retry_policy=policy, **_OPTS)
        await workflow.execute_local_activity(quick, **_OPTS)
        # The failure is the point: three receipted attempts, then the workflow goes on.
        with contextlib.suppress(ActivityError):
            await workflow.execute_activity(
                flaky,
                99,
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(milliseconds=50),
                    backoff_coefficient=1.0,
                    maximum_attempts=3,
                ),
                **_OPTS,
            )
        return a + b


def watcher_for(
    client: Client, sink: schemas.ReceiptSink, tmp_path: Path, task_queue: str
) -> streamer.CompletionWatcher:
    return streamer.CompletionWatcher(
        client,
        sink,
        streamer.WatcherConfig(
            checkpoint_path=str(tmp_path / "watcher.json"),
            start_from=datetime.now(UTC) - timedelta(minutes=5),
            query_filter=f'TaskQueue = "{task_queue}"',
            lag_window_s=30,
            poll_interval_s=0.2,
        ),
    )
