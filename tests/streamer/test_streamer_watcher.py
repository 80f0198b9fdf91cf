"""CompletionWatcher against the session's real Temporal dev server and Kafka broker."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
    Worker,
)

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from tests.support.helpers import eventually
from tests.support.streamer_kafka import config, consume
from tests.support.watcher import (
    Chain,
    Child,
    Parent,
    Retrying,
    Sleeper,
    flaky,
    quick,
    watcher_for,
)

pytestmark = pytest.mark.integration


class _Counting(Interceptor):
    """Counts activity attempts per run the way the receipt interceptor receipts them."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        outer = self

        class _In(ActivityInboundInterceptor):
            async def execute_activity(self, input: ExecuteActivityInput) -> Any:
                outer.attempts[activity.info().workflow_run_id or ""] += 1
                return await super().execute_activity(input)

        return _In(next)


async def test_watcher_emits_every_closed_run_once_with_links(
    temporal_client: Client, kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    tq = unique("tq")
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("w") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    async with Worker(
        temporal_client,
        task_queue=tq,
        workflows=[Sleeper, Parent, Child, Chain],
        activities=[quick],
    ):
        term = await temporal_client.start_workflow(Sleeper.run, id=unique("term"), task_queue=tq)
        timed = await temporal_client.start_workflow(
            Sleeper.run,
            id=unique("timeout"),
            task_queue=tq,
            execution_timeout=timedelta(seconds=1),
        )
        parent_id, child_id, chain_id = unique("parent"), unique("child"), unique("chain")
        await temporal_client.execute_workflow(Parent.run, child_id, id=parent_id, task_queue=tq)
        await temporal_client.execute_workflow(Chain.run, 2, id=chain_id, task_queue=tq)
        await term.terminate("test")
        with pytest.raises(WorkflowFailureError):
            await timed.result()

    async with streamer.ReceiptStreamer(cfg) as sink:
        watcher = watcher_for(temporal_client, sink, tmp_path, tq)
        total = 0

        async def all_seen() -> bool:
            nonlocal total
            total += await watcher.poll_once()
            return total >= 7  # term, timeout, parent, child, 3 chain runs

        await eventually(all_seen, timeout=30)
        assert total == 7
        # A restarted watcher (same checkpoint) emits nothing again.
        restarted = watcher_for(temporal_client, sink, tmp_path, tq)
        assert await restarted.poll_once() == 0
        assert await sink.flush(30)

    got = await consume(kafka_bootstrap, [cfg.topics.runs], 7, timeout=30)
    events = [schemas.RunCompletion.from_avro(schemas.decode(r.value).record) for r in got]
    assert len(events) == 7
    assert len({e.run_id for e in events}) == 7
    by_wf: dict[str, list[schemas.RunCompletion]] = {}
    for e in events:
        by_wf.setdefault(e.workflow_id, []).append(e)
        assert e.source is schemas.CompletionSource.WATCHER
        assert e.closed_at >= e.started_at > 0
        assert e.task_queue == tq
    assert by_wf[term.id][0].outcome is schemas.Outcome.TERMINATED
    assert by_wf[timed.id][0].outcome is schemas.Outcome.TIMED_OUT
    child = by_wf[child_id][0]
    assert child.parent_workflow_ids == (parent_id,)
    assert child.parent_run_id
    assert child.expected_steps == 1
    assert by_wf[parent_id][0].parent_workflow_ids == ()
    chain = sorted(by_wf[chain_id], key=lambda e: e.started_at)
    assert [e.outcome for e in chain] == [
        schemas.Outcome.CONTINUED_AS_NEW,
        schemas.Outcome.CONTINUED_AS_NEW,
        schemas.Outcome.SUCCESS,
    ]
    assert chain[0].continued_from_run_id is None
    for prev, nxt in itertools.pairwise(chain):
        assert prev.continued_as_new_run_id == nxt.run_id
        assert nxt.continued_from_run_id == prev.run_id
    assert all(e.expected_steps == 1 for e in chain)


class _ListSink:
    def __init__(self) -> None:
        self.events: list[schemas.RunCompletion] = []

    async def publish_step(self, receipt: schemas.StepReceipt, body: bytes) -> None:
        raise AssertionError("the watcher publishes completions only")

    async def publish_completion(self, event: schemas.RunCompletion) -> None:
        self.events.append(event)

    async def publish_envelope(self, envelope: Any) -> None:
        raise AssertionError("the watcher publishes completions only")


async def test_expected_steps_equals_receipted_attempts_with_retries(
    temporal_client: Client, unique: Callable[[str], str], tmp_path: Path
) -> None:
    tq = unique("tq")
    counting = _Counting()
    async with Worker(
        temporal_client,
        task_queue=tq,
        workflows=[Retrying],
        activities=[flaky, quick],
        interceptors=[counting],
    ):
        handle = await temporal_client.start_workflow(
            Retrying.run, id=unique("retry"), task_queue=tq
        )
        assert await asyncio.wait_for(handle.result(), 60) == 4
    sink = _ListSink()
    watcher = watcher_for(temporal_client, sink, tmp_path, tq)
    await eventually(watcher.poll_once, timeout=30)
    (event,) = sink.events
    # 3 attempts + 1 attempt + 1 local activity + 3 attempts of the one that gives up.
    assert counting.attempts[handle.result_run_id or ""] == 8
    assert event.expected_steps == 8
    assert event.outcome is schemas.Outcome.SUCCESS
