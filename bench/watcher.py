"""The completion watcher at scale.

1. Rate on the real dev server: ``runs`` runs are closed on it (started without a worker, then
   terminated, 32 at a time); the time that takes is the server's own close rate, the baseline.
   Once all are visible, one ``CompletionWatcher.poll_once`` emits them (history fetched per run,
   completions into the real broker through ``ReceiptStreamer``, ``before_execute`` as the CLI
   runs it) and the sink is flushed: closed runs emitted per second, and the ratio.
2. Memory at ``synthetic`` closed runs (100,000 at full size). The dev server closes about 20
   runs/s on this machine, so 100,000 real runs would take over an hour: the watcher reads them
   instead from a visibility source that makes the same ``WorkflowExecution`` objects the real
   client makes (from ``WorkflowExecutionInfo`` protobufs), lazily, one page of 500 at a time,
   newest first, with an empty history per run; the sink only counts. Everything else is the
   watcher's own ``poll_once`` (paging, dedup, checkpoint saves, completion events).
   tracemalloc peak during the poll, for close times 10 ms apart (3,000 runs in the 30 s window)
   and 1 ms apart (30,000 in the window). Baseline in the same run: the peak of holding the same
   listing in a list, which is what the watcher did before it streamed.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.client import Client, WorkflowExecution, WorkflowHistory
from temporalio.converter import DataConverter

from bench._common import Size, rss_bytes
from bench._env import Env
from chio_receipts import schemas
from chio_receipts.streamer import (
    CompletionWatcher,
    ReceiptStreamer,
    StreamerConfig,
    TopicsConfig,
    WatcherConfig,
    ensure_topics,
)

__all__ = ["bench_memory", "bench_rate", "run"]

# (real runs, synthetic runs) per size
_SIZES = {"small": (30, 5_000), "full": (1_000, 100_000)}
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


class _CountingSink:
    def __init__(self) -> None:
        self.completions = 0

    async def publish_step(self, receipt: Any, body: bytes) -> None:
        raise AssertionError("the watcher publishes completions only")

    async def publish_completion(self, event: schemas.RunCompletion) -> None:
        self.completions += 1

    async def publish_envelope(self, envelope: Any) -> None:
        raise AssertionError("the watcher publishes completions only")


def _execution(i: int, close: datetime) -> WorkflowExecution:
    info = WorkflowExecutionInfo(status=WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED)
    info.execution.workflow_id = f"bench-wf-{i:07d}"
    info.execution.run_id = f"0198c0de-0000-7000-8000-{i:012d}"
    info.type.name = "BenchWorkflow"
    info.task_queue = "bench"
    ts = Timestamp()
    ts.FromDatetime(close - timedelta(seconds=1))
    info.start_time.CopyFrom(ts)
    ts.FromDatetime(close)
    info.close_time.CopyFrom(ts)
    return WorkflowExecution._from_raw_info(info, "default", DataConverter.default)


class _Handle:
    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id

    async def fetch_history(self, **_: Any) -> WorkflowHistory:
        return WorkflowHistory(self.workflow_id, [])

    async def fetch_history_events(self, **_: Any) -> AsyncIterator[HistoryEvent]:
        events: tuple[HistoryEvent, ...] = ()  # an empty history
        for ev in events:
            yield ev


class _SyntheticVisibility:
    """``n`` closed runs, ``spacing`` apart, listed newest first one page at a time; nothing is
    kept: each page is made when it is asked for (so the peak is the watcher's)."""

    namespace = "default"

    def __init__(self, n: int, spacing: timedelta) -> None:
        self.n = n
        self.spacing = spacing
        self.pages = 0

    async def list_workflows(
        self, query: str, *, page_size: int = 1000, **_: Any
    ) -> AsyncIterator[WorkflowExecution]:
        for start in range(self.n - 1, -1, -page_size):
            page = [
                _execution(i, _T0 + i * self.spacing)
                for i in range(start, max(start - page_size, -1), -1)
            ]
            self.pages += 1
            await asyncio.sleep(0)  # a page is an RPC
            for ex in page:
                yield ex

    async def count_workflows(self, query: str, **_: Any) -> Any:
        raise AssertionError("no band to check on a first poll")

    def get_workflow_handle(self, workflow_id: str, **_: Any) -> _Handle:
        return _Handle(workflow_id)


async def _peak(coro: Any) -> tuple[Any, int, float]:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        result = await coro
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak, time.perf_counter() - t0


async def bench_memory(n: int, spacing: timedelta, scratch: Path) -> dict[str, Any]:
    """tracemalloc peak of one poll over ``n`` synthetic runs, and of holding the listing."""

    async def hold_listing() -> int:
        held = [
            ex async for ex in _SyntheticVisibility(n, spacing).list_workflows("", page_size=500)
        ]
        return len(held)

    source = _SyntheticVisibility(n, spacing)
    sink = _CountingSink()
    watcher = CompletionWatcher(
        source,  # type: ignore[arg-type]
        sink,
        WatcherConfig(
            checkpoint_path=str(scratch / f"watcher-{n}-{spacing.total_seconds()}.json"),
            start_from=_T0,
            page_size=500,
        ),
    )
    rss0 = rss_bytes()
    emitted, peak, seconds = await _peak(watcher.poll_once())
    rss1 = rss_bytes()
    held, held_peak, _ = await _peak(hold_listing())
    assert emitted == held == n == sink.completions
    cp = watcher.checkpoint
    assert cp is not None
    window = timedelta(seconds=watcher.config.lag_window_s)
    in_window = min(n, int(window / spacing) + 1)
    return {
        "runs": n,
        "close_spacing_ms": spacing.total_seconds() * 1000,
        "runs_in_window": in_window,
        "pages": source.pages,
        "peak_bytes": peak,
        "peak_bytes_holding_listing": held_peak,
        "ratio_vs_holding_listing": peak / held_peak,
        "dedup_ids_after": len(cp.seen),
        "rss_delta_bytes": rss1 - rss0,
        "runs_per_s_traced": n / seconds,
    }


async def _close_runs(client: Client, tq: str, n: int) -> float:
    """Close ``n`` runs on the server; returns the seconds it took."""
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            handle = await client.start_workflow("BenchWatched", id=f"{tq}-{i}", task_queue=tq)
            await handle.terminate("closed for the watcher benchmark")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0


async def bench_rate(n: int, env: Env) -> dict[str, Any]:
    """Closed runs emitted per second by the watcher, against the server's close rate."""
    client = env.temporal_client
    tq = env.unique("bench-watch")
    started = datetime.now(UTC) - timedelta(seconds=5)
    close_s = await _close_runs(client, tq, n)
    query = f'TaskQueue = "{tq}" AND ExecutionStatus != "Running"'
    deadline = time.monotonic() + 120
    while (await client.count_workflows(query)).count < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {n} closed runs did not all become visible")
        await asyncio.sleep(0.2)
    directory = env.directory("watcher")
    config = StreamerConfig(
        kafka=env.kafka,
        spool_dir=str(directory / "spool"),
        topics=TopicsConfig(prefix=env.unique("bw") + "."),
        client_id="bench-watcher",
        durability="before_execute",
    )
    await ensure_topics(config.kafka, config.topics)
    async with ReceiptStreamer(config) as sink:
        watcher = CompletionWatcher(
            client,
            sink,
            WatcherConfig(
                checkpoint_path=str(directory / "checkpoint.json"),
                start_from=started,
                query_filter=f'TaskQueue = "{tq}"',
            ),
        )
        t0 = time.perf_counter()
        emitted = await watcher.poll_once()
        if not await sink.flush(60):
            raise RuntimeError("the completions were not all acknowledged")
        watch_s = time.perf_counter() - t0
    if emitted != n:
        raise RuntimeError(f"the watcher emitted {emitted} of {n} runs")
    return {
        "runs": n,
        "server_closes_per_s": n / close_s,
        "watcher_runs_per_s": n / watch_s,
        "ratio_vs_server": (n / watch_s) / (n / close_s),
    }


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """Both parts at ``size``."""
    if env is None:
        raise RuntimeError("the watcher benchmark needs the local stack")
    real, synthetic = _SIZES.get(size.name, _SIZES["small"])
    rate = await bench_rate(real, env)
    scratch = env.directory("watcher-memory")
    memory = [
        await bench_memory(synthetic, timedelta(milliseconds=10), scratch),
        await bench_memory(synthetic, timedelta(milliseconds=1), scratch),
    ]
    return {
        "rate": rate,
        "memory": memory,
        "note": (
            "memory: synthetic visibility entries through CompletionWatcher.poll_once (the dev"
            " server closes ~20 runs/s here, too slow for 100,000 real runs); rate: real runs"
        ),
    }
