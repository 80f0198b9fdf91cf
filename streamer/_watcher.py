"""``CompletionWatcher``: one run-completion event for every closed run on a Temporal server.

A poll loop over the visibility API: ``ExecutionStatus != "Running" AND CloseTime >= W - window``,
where W is the persisted watermark (the newest close time emitted) and ``window`` the configured
lag window (``WatcherConfig.lag_window_s``). The listing is read page by page, newest first, and
each new run is emitted as it is read: its history, read page by page, gives every activity
attempt Temporal started (``RunCompletion.expected_attempts``, and their count
``expected_steps``) and the continued-as-new links (see ``_history``); when the run closed with
activities still open, its pending activities (one describe call) give theirs; its visibility
record gives the parent chain. The event is handed to the sink (the streamer, whose write-ahead
spool makes it durable) before the run is recorded as seen. Nothing holds the listing, and a
run's attempt list lives only until its event is handed over; the state is
``_watcher_state.Checkpoint``.

Checkpoint: a JSON file written atomically (temp file, fsync, rename) every ``checkpoint_every``
runs (or every tenth of the dedup set when larger) and at the end of a poll: the watermark, the
ids of the runs emitted inside the lag window, and an unfinished poll's cursor. A crash between
the sink and the checkpoint re-emits at most the runs since the last save, with the same
deterministic event ids; a restart resumes an unfinished poll at its cursor.

Visibility lag: a run that becomes visible late but closed inside the window is emitted by the
next poll, exactly once. One that becomes visible after its close time left the window is not
emitted; when the next poll can count it, the watcher logs a warning with the count (see
``_watcher_state``).

A failed poll (Temporal unreachable, the sink refusing a completion) is retried through
``schemas.retry_async``: backoff from ``poll_interval_s`` up to ``max_retry_backoff_s`` with
full jitter, ended at once by the stop event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowExecution, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

import chio_receipts.schemas as schemas
from chio_receipts.streamer._errors import WatcherError
from chio_receipts.streamer._history import HistoryFold, completion_event, micros
from chio_receipts.streamer._metrics import StreamerMetrics
from chio_receipts.streamer._watcher_state import (
    EPOCH,
    Band,
    Checkpoint,
    Progress,
    ScanSummary,
    drain,
)

__all__ = ["DEFAULT_LAG_WINDOW_S", "Checkpoint", "CompletionWatcher", "WatcherConfig"]

log = logging.getLogger(__name__)

DEFAULT_LAG_WINDOW_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WatcherConfig:
    """How the watcher polls and where it keeps its checkpoint.

    ``lag_window_s`` is how far below its watermark every poll lists again, for runs the
    visibility store shows late: a run visible within that many seconds of close time behind
    the newest run emitted is emitted once; a run later than that is not (a warning counts the
    ones the next poll can see). The dedup set holds the runs that close within one window.
    """

    checkpoint_path: str
    poll_interval_s: float = 2.0
    max_retry_backoff_s: float = 30.0
    lag_window_s: float = DEFAULT_LAG_WINDOW_S
    start_from: datetime | None = None
    query_filter: str = ""
    page_size: int = 500
    rpc_timeout_s: float = 10.0
    checkpoint_every: int = 100
    max_parent_depth: int = 16

    def __post_init__(self) -> None:
        if self.lag_window_s < 0:
            raise ValueError(f"lag_window_s must be >= 0, not {self.lag_window_s}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, not {self.page_size}")


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CompletionWatcher:
    """Emits a :class:`schemas.RunCompletion` for every run that closes on the server.

    ``sink`` is any :class:`schemas.ReceiptSink` (normally a ``ReceiptStreamer``).
    """

    def __init__(
        self,
        client: Client,
        sink: schemas.ReceiptSink,
        config: WatcherConfig,
        *,
        metrics: StreamerMetrics | None = None,
    ) -> None:
        self.client = client
        self.sink = sink
        self.config = config
        self.metrics = metrics if metrics is not None else StreamerMetrics()
        self._path = Path(config.checkpoint_path)
        self._checkpoint: Checkpoint | None = None
        self._parents: dict[tuple[str, str], tuple[str | None, str | None]] = {}

    @property
    def namespace(self) -> str:
        """The namespace the watcher observes (the client's)."""
        return self.client.namespace

    @property
    def window(self) -> timedelta:
        """The lag window: how far below the watermark each poll lists again."""
        return timedelta(seconds=self.config.lag_window_s)

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The state in memory (``None`` before the first poll)."""
        return self._checkpoint

    def _query(self, since: datetime, until: datetime | None = None) -> str:
        q = f'ExecutionStatus != "Running" AND CloseTime >= "{_ts(since)}"'
        if until is not None:
            q += f' AND CloseTime < "{_ts(until)}"'
        if self.config.query_filter:
            q += f" AND ({self.config.query_filter})"
        return q

    async def poll_once(self) -> int:
        """List closed runs from the window's floor, emit the new ones; returns how many."""
        if self._checkpoint is None:
            self._checkpoint = Checkpoint.load(self._path, self.config.start_from or EPOCH)
        cp = self._checkpoint
        if cp.band is not None:
            await self._check_band(cp, cp.band)
        progress = Progress(cp, self.window, checkpoint_every=self.config.checkpoint_every)
        since, until = progress.begin().bounds()
        async with contextlib.aclosing(self._list(self._query(since, until))) as entries:
            emitted, summary = await drain(entries, progress, self._emit, self._save)
        if summary is not None:
            self._report(summary)
        return emitted

    async def _list(self, query: str) -> AsyncGenerator[WorkflowExecution, None]:
        """The visibility listing, one page of ``page_size`` in memory at a time."""
        try:
            async for ex in self.client.list_workflows(
                query,
                page_size=self.config.page_size,
                rpc_timeout=timedelta(seconds=self.config.rpc_timeout_s),
            ):
                yield ex
        except RPCError as exc:
            raise WatcherError(f"cannot list closed workflows: {exc}") from exc

    async def _emit(self, ex: WorkflowExecution) -> None:
        event = await self._completion(ex)
        await self.sink.publish_completion(event)
        self.metrics.completions.labels(event.outcome.value).inc()

    async def _save(self) -> None:
        if self._checkpoint is not None:
            await asyncio.to_thread(self._checkpoint.save, self._path)

    async def _check_band(self, cp: Checkpoint, band: Band) -> None:
        """Count the closed runs of the span that left the window at the last poll; more than
        were emitted there became visible too late (best effort: a failed count is logged)."""
        try:
            found = await self.client.count_workflows(
                self._query(band.since, band.until),
                rpc_timeout=timedelta(seconds=self.config.rpc_timeout_s),
            )
        except RPCError as exc:
            log.info("watcher: cannot count runs behind the lag window: %s", exc)
            cp.band = None
            return
        cp.band = None
        if found.count > band.emitted:
            log.warning(
                "watcher: %d run(s) that closed between %s and %s became visible after they"
                " left the %gs lag window and were not emitted; widen the lag window",
                found.count - band.emitted,
                band.since.isoformat(),
                band.until.isoformat(),
                self.config.lag_window_s,
            )

    def _report(self, summary: ScanSummary) -> None:
        if summary.late:
            log.info(
                "watcher: %d run(s) became visible late (inside the %gs lag window), emitted once",
                summary.late,
                self.config.lag_window_s,
            )
        if not summary.ordered:
            log.warning(
                "watcher: the visibility listing was not newest first; this poll kept every id"
                " it emitted (a restart during such a poll may emit a run twice)"
            )

    async def _completion(self, ex: WorkflowExecution) -> schemas.RunCompletion:
        handle = self.client.get_workflow_handle(ex.id, run_id=ex.run_id)
        fold = HistoryFold()  # one page of the history in memory at a time
        try:
            async for ev in handle.fetch_history_events(
                rpc_timeout=timedelta(seconds=self.config.rpc_timeout_s)
            ):
                fold.add(ev)
        except RPCError as exc:
            raise WatcherError(f"cannot read history of {ex.id}/{ex.run_id}: {exc}") from exc
        if fold.open_activities:
            await self._add_pending(handle, fold)
        facts = fold.facts()
        parents = await self._parent_chain(ex.parent_id, ex.parent_run_id)
        return completion_event(
            namespace=ex.namespace or self.namespace,
            workflow_id=ex.id,
            run_id=ex.run_id,
            workflow_type=ex.workflow_type,
            task_queue=ex.task_queue,
            status=ex.status,
            start_time=ex.start_time,
            close_time=ex.close_time,
            facts=facts,
            parent_workflow_ids=parents,
            emitted_at=micros(datetime.now(UTC)),
        )

    async def _add_pending(self, handle: WorkflowHandle[Any, Any], fold: HistoryFold) -> None:
        """The attempts of activities the run left open (running or backing off when it closed)
        are not in its history; the closed run's pending activities still show them."""
        try:
            desc = await handle.describe(rpc_timeout=timedelta(seconds=self.config.rpc_timeout_s))
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:  # gone since (retention): keep history's
                log.info("watcher: cannot describe %s/%s: %s", handle.id, handle.run_id, exc)
                return
            raise WatcherError(f"cannot describe {handle.id}/{handle.run_id}: {exc}") from exc
        fold.add_pending(desc.raw_description.pending_activities)

    async def _parent_chain(
        self, parent_id: str | None, parent_run_id: str | None
    ) -> tuple[str, ...]:
        """Parent workflow ids, nearest first, following each parent's own parent."""
        chain: list[str] = []
        while parent_id and len(chain) < self.config.max_parent_depth:
            chain.append(parent_id)
            key = (parent_id, parent_run_id or "")
            if key not in self._parents:
                try:
                    desc = await self.client.get_workflow_handle(
                        parent_id, run_id=parent_run_id
                    ).describe(rpc_timeout=timedelta(seconds=self.config.rpc_timeout_s))
                    self._parents[key] = (desc.parent_id, desc.parent_run_id)
                except RPCError as exc:
                    # The parent may be gone (retention); keep what is known.
                    log.info("watcher: cannot describe parent %s: %s", parent_id, exc)
                    self._parents[key] = (None, None)
                if len(self._parents) > 100_000:
                    self._parents.clear()
            parent_id, parent_run_id = self._parents[key]
        return tuple(chain)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; retriable errors (``schemas.is_retriable``) are retried.

        A non-retriable error ends the watcher (it is raised).
        """
        policy = schemas.RetryPolicy(
            initial_seconds=self.config.poll_interval_s,
            maximum_seconds=max(self.config.max_retry_backoff_s, self.config.poll_interval_s),
            describe="completion watcher poll",
        )
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                n = await schemas.retry_async(self.poll_once, policy=policy, stop=stop)
            except Exception as exc:
                if stop.is_set() and schemas.is_retriable(exc):
                    log.info("watcher: stopped while retrying (%s)", exc)
                    return
                raise
            if n:
                log.info("watcher: emitted %d run completions", n)
            wait = max(0.0, self.config.poll_interval_s - (time.monotonic() - t0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
