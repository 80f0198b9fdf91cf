"""Temporal's per-attempt facts on the real dev server: the attempts a run's history shows as
started (``history_facts``, and the watcher's ``RunCompletion.expected_attempts``) are exactly
the attempts whose bodies ran, with the ids the receipt interceptor's receipts carry.

Each workflow runs one activity pattern; the bodies count their runs in ``RAN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.interceptor import (
    ChioActivityInterceptor,
    ChioClient,
    InMemoryReceiptSink,
    WorkflowGrant,
)
from chio_receipts.sidecar import LocalSidecar
from tests.support.helpers import eventually
from tests.support.watcher import watcher_for

pytestmark = pytest.mark.e2e

# Body runs per workflow id: what the expected attempts must equal.
RAN: Counter[str] = Counter()

TINY = RetryPolicy(initial_interval=timedelta(milliseconds=50), backoff_coefficient=1.0)


def _ran() -> int:
    info = activity.info()
    RAN[info.workflow_id or ""] += 1
    return info.attempt


@activity.defn
async def fails_twice() -> int:
    if _ran() <= 2:
        raise ApplicationError("fails on purpose", type="Flake")
    return activity.info().attempt


@activity.defn
async def slow_first() -> int:
    """Attempt 1 sends no heartbeat for longer than the heartbeat timeout; attempt 2 returns."""
    if _ran() == 1:
        await asyncio.sleep(2.5)
    return activity.info().attempt


@activity.defn
async def always_fails() -> None:
    _ran()
    raise ApplicationError("fails on purpose", type="Declined")


# sdk-core leaves the start-to-close timer of every failed local attempt running until it fires
# (temporalio/sdk-rust#1454); one that fires after its worker shut down panics a runtime thread.
# The local activities have a short timeout (their bodies return at once) and the test keeps the
# worker until the last timer fired.
LOCAL_TIMEOUT = timedelta(seconds=3)
LOCAL_STARTS: list[float] = []


@activity.defn
async def local_fails(times: int) -> int:
    LOCAL_STARTS.append(time.monotonic())
    if _ran() <= times:
        raise ApplicationError("fails on purpose", type="Flake")
    return activity.info().attempt


@workflow.defn(sandboxed=False)
class RetriedTwice:
    @workflow.run
    async def run(self) -> int:
        return await workflow.execute_activity(
            fails_twice, start_to_close_timeout=timedelta(seconds=10), retry_policy=TINY
        )


@workflow.defn(sandboxed=False)
class HeartbeatTimeout:
    @workflow.run
    async def run(self) -> int:
        return await workflow.execute_activity(
            slow_first,
            start_to_close_timeout=timedelta(seconds=10),
            heartbeat_timeout=timedelta(seconds=1),
            retry_policy=TINY,
        )


@workflow.defn(sandboxed=False)
class GivesUp:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(
            always_fails,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=50),
                backoff_coefficient=1.0,
                maximum_attempts=2,
            ),
        )


@workflow.defn(sandboxed=False)
class LocalRetried:
    """A local activity that fails twice with a short backoff: retried inside the worker."""

    @workflow.run
    async def run(self) -> int:
        return await workflow.execute_local_activity(
            local_fails, 2, start_to_close_timeout=LOCAL_TIMEOUT, retry_policy=TINY
        )


@workflow.defn(sandboxed=False)
class LocalTimerBackoff:
    """A local activity whose backoff grows past the local retry threshold: attempts 1-3 in
    the worker (0.4 s, 0.8 s), then a 1.6 s timer and attempt 4 under a new activity id."""

    @workflow.run
    async def run(self) -> int:
        return await workflow.execute_local_activity(
            local_fails,
            3,
            start_to_close_timeout=LOCAL_TIMEOUT,
            local_retry_threshold=timedelta(seconds=1),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=400), backoff_coefficient=2.0
            ),
        )


@activity.defn
async def fails_first() -> None:
    if _ran() == 1:
        raise ApplicationError("fails on purpose", type="Flake")


@activity.defn
async def blocks() -> None:
    _ran()
    await asyncio.sleep(3)


SLOW_RETRY = RetryPolicy(initial_interval=timedelta(seconds=60))


@workflow.defn(sandboxed=False)
class LeftOpen:
    """Runs one activity the test leaves open when it terminates the run: backing off after
    attempt 1, running attempt 1, or never started (its task queue has no worker)."""

    @workflow.run
    async def run(self, mode: str) -> None:
        if mode == "backing_off":
            await workflow.execute_activity(
                fails_first, start_to_close_timeout=timedelta(seconds=10), retry_policy=SLOW_RETRY
            )
        elif mode == "running":
            await workflow.execute_activity(blocks, start_to_close_timeout=timedelta(seconds=10))
        else:
            await workflow.execute_activity(
                blocks,
                task_queue=workflow.info().task_queue + "-nobody",
                start_to_close_timeout=timedelta(seconds=10),
            )


@workflow.defn(sandboxed=False)
class CancelledWhileBackingOff:
    @workflow.run
    async def run(self) -> None:
        handle = workflow.start_activity(
            fails_first, start_to_close_timeout=timedelta(seconds=10), retry_policy=SLOW_RETRY
        )
        await workflow.sleep(1.5)
        handle.cancel()
        with contextlib.suppress(ActivityError):
            await handle


ACTIVITIES: list[Callable[..., Any]] = [
    fails_twice,
    slow_first,
    always_fails,
    local_fails,
    fails_first,
    blocks,
]
WORKFLOWS = [RetriedTwice, HeartbeatTimeout, GivesUp, LocalRetried, LocalTimerBackoff]


@pytest.fixture
async def interceptor() -> tuple[ChioActivityInterceptor, InMemoryReceiptSink, Any]:
    side = LocalSidecar()
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(chio_client=ChioClient(side), receipt_sink=sink)
    cap = await side.create_capability("agent:test", [a.__name__ for a in ACTIVITIES], 600)
    return icp, sink, cap


def _ends(attempts: tuple[schemas.ExpectedAttempt, ...]) -> list[tuple[str, int, bool, str]]:
    return [(a.activity_type, a.attempt, a.is_local, a.temporal_end) for a in attempts]


def _receipted(
    sink: InMemoryReceiptSink, handle: WorkflowHandle[Any, Any]
) -> list[tuple[str, int, bool]]:
    return sorted(
        (r.activity_id, r.attempt, r.is_local)
        for r in sink.receipts_for(handle.id, handle.result_run_id)
    )


async def test_history_attempts_are_the_attempts_the_bodies_ran(
    temporal_client: Client,
    unique: Callable[[str], str],
    tmp_path: Path,
    interceptor: tuple[ChioActivityInterceptor, InMemoryReceiptSink, Any],
) -> None:
    tq = unique("tq")
    icp, sink, cap = interceptor
    handles: dict[str, WorkflowHandle[Any, Any]] = {}
    async with Worker(
        temporal_client,
        task_queue=tq,
        workflows=WORKFLOWS,
        activities=ACTIVITIES,
        interceptors=[icp],
    ):
        for wf in WORKFLOWS:
            wid = unique(wf.__name__.lower())
            icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
            handles[wf.__name__] = await temporal_client.start_workflow(
                wf.run,  # type: ignore[attr-defined]
                id=wid,
                task_queue=tq,
            )
        for name, handle in handles.items():
            if name == "GivesUp":
                with pytest.raises(WorkflowFailureError):
                    await asyncio.wait_for(handle.result(), 60)
            else:
                await asyncio.wait_for(handle.result(), 60)
        stale = max(LOCAL_STARTS) + LOCAL_TIMEOUT.total_seconds() + 0.5 - time.monotonic()
        await asyncio.sleep(max(0.0, stale))

    facts: dict[str, streamer.HistoryFacts] = {}
    for name, handle in handles.items():
        history = await handle.fetch_history()
        facts[name] = streamer.history_facts(history.events)
        got = facts[name].expected_attempts
        # Exactly the attempts whose bodies ran, with the ids and attempt numbers the
        # interceptor's receipts carry.
        assert len(got) == RAN[handle.id], name
        assert facts[name].expected_steps == len(got)
        assert sorted((a.activity_id, a.attempt, a.is_local) for a in got) == _receipted(
            sink, handle
        ), name

    assert _ends(facts["RetriedTwice"].expected_attempts) == [
        ("fails_twice", 1, False, ""),
        ("fails_twice", 2, False, "failed:Flake"),
        ("fails_twice", 3, False, "completed"),
    ]
    assert _ends(facts["HeartbeatTimeout"].expected_attempts) == [
        ("slow_first", 1, False, "timed_out:heartbeat"),
        ("slow_first", 2, False, "completed"),
    ]
    assert _ends(facts["GivesUp"].expected_attempts) == [
        ("always_fails", 1, False, "failed:Declined"),
        ("always_fails", 2, False, "failed:Declined"),
    ]
    assert _ends(facts["LocalRetried"].expected_attempts) == [
        ("local_fails", 1, True, ""),
        ("local_fails", 2, True, ""),
        ("local_fails", 3, True, "completed"),
    ]
    timer = facts["LocalTimerBackoff"].expected_attempts
    assert _ends(timer) == [
        ("local_fails", 1, True, ""),
        ("local_fails", 2, True, ""),
        ("local_fails", 3, True, "failed:Flake"),
        ("local_fails", 4, True, "completed"),
    ]
    # The attempt after the timer was scheduled again, under another activity id.
    assert len({a.activity_id for a in timer}) == 2
    assert timer[3].activity_id != timer[0].activity_id == timer[2].activity_id

    # The watcher's completions carry the same lists.
    watcher = watcher_for(temporal_client, sink, tmp_path, tq)
    seen = 0

    async def all_emitted() -> bool:
        nonlocal seen
        seen += await watcher.poll_once()
        return seen >= len(handles)

    await eventually(all_emitted, timeout=30)
    by_id = {c.workflow_id: c for c in sink.completions}
    for name, handle in handles.items():
        assert by_id[handle.id].expected_attempts == facts[name].expected_attempts, name
        assert by_id[handle.id].expected_steps == RAN[handle.id], name


async def _pending_state(handle: WorkflowHandle[Any, Any]) -> tuple[int, int] | None:
    """(attempt, state) of the run's one pending activity, once there is one."""
    desc = await handle.describe()
    pending = desc.raw_description.pending_activities
    return (pending[0].attempt, pending[0].state) if pending else None


async def test_runs_closed_with_activities_open_take_them_from_the_pending_activities(
    temporal_client: Client,
    unique: Callable[[str], str],
    tmp_path: Path,
    interceptor: tuple[ChioActivityInterceptor, InMemoryReceiptSink, Any],
) -> None:
    tq = unique("tq")
    icp, sink, cap = interceptor
    handles: dict[str, WorkflowHandle[Any, Any]] = {}
    async with Worker(
        temporal_client,
        task_queue=tq,
        workflows=[LeftOpen, CancelledWhileBackingOff],
        activities=ACTIVITIES,
        interceptors=[icp],
    ):
        for mode in ("backing_off", "running", "never_started"):
            wid = unique(mode)
            icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
            handles[mode] = await temporal_client.start_workflow(
                LeftOpen.run, mode, id=wid, task_queue=tq
            )
        wid = unique("cancelled")
        icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
        cancelled = await temporal_client.start_workflow(
            CancelledWhileBackingOff.run, id=wid, task_queue=tq
        )

        scheduled, started = (
            PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED,
            PendingActivityState.PENDING_ACTIVITY_STATE_STARTED,
        )
        waits = {
            "backing_off": (2, scheduled),
            "running": (1, started),
            "never_started": (1, scheduled),
        }
        for mode, state in waits.items():
            handle = handles[mode]

            async def reached(
                h: WorkflowHandle[Any, Any] = handle, s: tuple[int, int] = state
            ) -> bool:
                return await _pending_state(h) == s

            await eventually(reached, timeout=30)
            await handle.terminate("closed with an activity open")
        await asyncio.wait_for(cancelled.result(), 30)

    watcher = watcher_for(temporal_client, sink, tmp_path, tq)
    seen = 0

    async def all_emitted() -> bool:
        nonlocal seen
        seen += await watcher.poll_once()
        return seen >= 4

    await eventually(all_emitted, timeout=30)
    by_id = {c.workflow_id: c for c in sink.completions}
    got = {mode: by_id[h.id].expected_attempts for mode, h in handles.items()}
    assert _ends(got["backing_off"]) == [("fails_first", 1, False, "failed:Flake")]
    assert _ends(got["running"]) == [("blocks", 1, False, "")]
    assert got["never_started"] == ()
    for mode, handle in handles.items():
        assert len(got[mode]) == RAN[handle.id], mode
        assert [(a.activity_id, a.attempt, a.is_local) for a in got[mode]] == _receipted(
            sink, handle
        ), mode
        # History alone does not show them.
        assert streamer.history_facts((await handle.fetch_history()).events).expected_steps == 0
    # Cancelled while backing off: Temporal keeps nothing of attempt 1 (the documented lower
    # bound); its receipt is one the list does not name.
    assert RAN[cancelled.id] == len(_receipted(sink, cancelled)) == 1
    assert by_id[cancelled.id].expected_attempts == ()
