"""CompletionWatcher against the session's real Temporal dev server and Kafka broker."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
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


class _LaggingVisibility:
    """The real client, except that its visibility listing does not show ``hidden`` runs yet
    (visibility lag, which the dev server does not have on its own)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.hidden: set[str] = set()
        self.namespace = client.namespace

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def list_workflows(self, query: str, **kwargs: Any) -> AsyncIterator[Any]:
        async for ex in self._client.list_workflows(query, **kwargs):
            if ex.run_id not in self.hidden:
                yield ex


async def _closed_runs(client: Client, tq: str, prefix: str, n: int) -> list[str]:
    """``n`` runs closed on the server (started without a worker, then terminated)."""
    run_ids: list[str] = []
    for i in range(n):
        handle = await client.start_workflow("Sleeper", id=f"{prefix}-{i}", task_queue=tq)
        await handle.terminate("closed for the watcher")
        assert handle.result_run_id is not None
        run_ids.append(handle.result_run_id)

    # The dev server has visibility lag of its own (its visibility tasks run after the close):
    # wait until all are listed, so that only the lag a test adds is in play.
    async def all_visible() -> bool:
        found = await client.count_workflows(f'TaskQueue = "{tq}" AND ExecutionStatus != "Running"')
        return found.count == n

    await eventually(all_visible, timeout=30)
    return run_ids


def _lagging_watcher(
    client: _LaggingVisibility,
    sink: schemas.ReceiptSink,
    tmp_path: Path,
    tq: str,
    *,
    window_s: float,
    page_size: int = 500,
) -> streamer.CompletionWatcher:
    return streamer.CompletionWatcher(
        client,  # type: ignore[arg-type]
        sink,
        streamer.WatcherConfig(
            checkpoint_path=str(tmp_path / "lagging.json"),
            start_from=datetime.now(UTC) - timedelta(minutes=5),
            query_filter=f'TaskQueue = "{tq}"',
            lag_window_s=window_s,
            page_size=page_size,
        ),
    )


async def test_a_run_visible_late_inside_the_window_reaches_kafka_exactly_once(
    temporal_client: Client, kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    tq = unique("tq")
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("w") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    run_ids = await _closed_runs(temporal_client, tq, unique("lag"), 5)
    lagging = _LaggingVisibility(temporal_client)
    lagging.hidden = {run_ids[1]}
    async with streamer.ReceiptStreamer(cfg) as sink:
        watcher = _lagging_watcher(lagging, sink, tmp_path, tq, window_s=300, page_size=2)
        assert await watcher.poll_once() == 4
        lagging.hidden.clear()
        assert await watcher.poll_once() == 1
        assert await watcher.poll_once() == 0
        restarted = _lagging_watcher(lagging, sink, tmp_path, tq, window_s=300, page_size=2)
        assert await restarted.poll_once() == 0
        assert await sink.flush(30)
    got = await consume(kafka_bootstrap, [cfg.topics.runs], 5, timeout=30)
    events = [schemas.RunCompletion.from_avro(schemas.decode(r.value).record) for r in got]
    assert sorted(e.run_id for e in events) == sorted(run_ids)


async def test_a_run_visible_after_the_window_is_not_emitted_and_is_counted(
    temporal_client: Client,
    unique: Callable[[str], str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tq = unique("tq")
    run_ids = await _closed_runs(temporal_client, tq, unique("lost"), 4)
    lagging = _LaggingVisibility(temporal_client)
    lagging.hidden = {run_ids[1]}
    sink = _ListSink()
    watcher = _lagging_watcher(lagging, sink, tmp_path, tq, window_s=0)
    assert await watcher.poll_once() == 3
    lagging.hidden.clear()
    with caplog.at_level(logging.WARNING, logger="chio_receipts.streamer._watcher"):
        assert await watcher.poll_once() == 0
    assert run_ids[1] not in {e.run_id for e in sink.events}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("watcher: 1 run(s) that closed between")


class _FailingSink(_ListSink):
    """Refuses the ``fail_at``-th completion once (a sink outage part-way through a poll), and
    records the size of the watcher's dedup set at every completion."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.watcher: streamer.CompletionWatcher | None = None
        self.max_seen = 0

    async def publish_completion(self, event: schemas.RunCompletion) -> None:
        if len(self.events) + 1 == self.fail_at:
            self.fail_at = 0
            raise streamer.StreamerClosed("the sink is down")
        await super().publish_completion(event)
        cp = self.watcher.checkpoint if self.watcher is not None else None
        if cp is not None:
            self.max_seen = max(self.max_seen, len(cp.seen))


async def test_a_poll_pages_through_many_runs_with_a_bounded_dedup_set_and_resumes(
    temporal_client: Client, unique: Callable[[str], str], tmp_path: Path
) -> None:
    tq = unique("tq")
    run_ids = await _closed_runs(temporal_client, tq, unique("many"), 120)
    sink = _FailingSink(fail_at=50)
    lagging = _LaggingVisibility(temporal_client)
    watcher = _lagging_watcher(lagging, sink, tmp_path, tq, window_s=0.5, page_size=10)
    sink.watcher = watcher
    with pytest.raises(streamer.StreamerClosed):
        await watcher.poll_once()
    assert len(sink.events) == 49
    # A new process, from the checkpoint saved when the sink failed: it resumes at the cursor.
    restarted = _lagging_watcher(lagging, sink, tmp_path, tq, window_s=0.5, page_size=10)
    sink.watcher = restarted
    assert await restarted.poll_once() == 71
    assert sorted(e.run_id for e in sink.events) == sorted(run_ids)
    # Bounded by the runs that closed within half a second of each other (twice, while a poll
    # replaces one window by the next), not by the 120 listed.
    closes = sorted(e.closed_at for e in sink.events)
    per_window = max(sum(1 for c in closes if t - 500_000 <= c <= t) for t in closes)
    assert sink.max_seen <= 2 * per_window + 1
    assert sink.max_seen < 120
