"""The fault suite's workflow and activities.

``FaultWorkflow`` runs ``steps`` activities one after another (optionally one denied step,
which it catches, like a saga) with a retry policy short enough for kill -9 rows: a killed
worker's attempt times out after ``start_to_close_s`` and Temporal retries it on a live worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from tests.support.faults.failpoints import failpoint

__all__ = ["ACTIVITIES", "SCOPE", "FaultInput", "FaultWorkflow", "fault_step", "forbidden_step"]

SCOPE = ("fault_step",)


@dataclass
class FaultInput:
    """What one run does. ``payload`` travels as the activity argument (hashed, never copied)."""

    steps: int = 4
    payload: str = ""
    deny_at: int = -1
    start_to_close_s: float = 5.0
    step_sleep_s: float = 0.0
    catch_denial: bool = True


@activity.defn
async def fault_step(payload: str, index: int, sleep_s: float) -> str:
    """An allowed step: its body may hit the ``activity.body`` failpoint."""
    failpoint("activity.body")
    if sleep_s:
        await asyncio.sleep(sleep_s)
    return f"ok-{index}-{len(payload)}"


@activity.defn
async def forbidden_step(payload: str) -> str:
    """Not in the grant's scope: always denied, the body never runs."""
    raise AssertionError("a denied activity body ran")


ACTIVITIES = [fault_step, forbidden_step]


@workflow.defn
class FaultWorkflow:
    """``steps`` sequential activities; a denial at ``deny_at`` is caught."""

    @workflow.run
    async def run(self, params: FaultInput) -> int:
        retry = RetryPolicy(
            initial_interval=timedelta(milliseconds=300),
            backoff_coefficient=1.5,
            maximum_interval=timedelta(seconds=2),
            maximum_attempts=50,
        )
        timeout = timedelta(seconds=params.start_to_close_s)
        done = 0
        for i in range(params.steps):
            if i == params.deny_at:
                denied = workflow.execute_activity(
                    forbidden_step,
                    params.payload,
                    start_to_close_timeout=timeout,
                    retry_policy=retry,
                )
                if not params.catch_denial:
                    await denied
                with contextlib.suppress(ActivityError, ApplicationError):
                    await denied
                continue
            await workflow.execute_activity(
                fault_step,
                args=[params.payload, i, params.step_sleep_s],
                start_to_close_timeout=timeout,
                retry_policy=retry,
            )
            done += 1
        return done
