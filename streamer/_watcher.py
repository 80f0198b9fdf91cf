"""``CompletionWatcher``: one run-completion event for every closed run on a Temporal server.

A poll loop over the visibility API (``ExecutionStatus != "Running" AND CloseTime >= W``), where
W is the persisted watermark minus an overlap that covers visibility lag. Runs are processed in
close-time order; each one's history gives the expected step count and the continued-as-new
links (see ``_history``), its visibility record the parent chain. The event is handed to the sink
(the streamer, whose write-ahead spool makes it durable) before the run is recorded as seen.

Checkpoint: a JSON file written atomically (temp file, fsync, rename) after every
``checkpoint_every`` runs and at the end of a poll: the watermark (close time of the last run
processed in order) and the run ids seen at or after ``watermark - overlap``, so the overlap
window never emits a run twice. A crash between the sink and the checkpoint re-emits at most
the runs since the last checkpoint, with the same deterministic event ids.

A failed poll (Temporal unreachable, the sink refusing a completion) is retried through
``schemas.retry_async``: backoff from ``poll_interval_s`` up to ``max_retry_backoff_s`` with
full jitter, ended at once by the stop event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError

import chio_receipts.schemas as schemas
from chio_receipts.streamer._errors import WatcherError
from chio_receipts.streamer._history import completion_event, history_facts, micros
from chio_receipts.streamer._metrics import StreamerMetrics

__all__ = ["Checkpoint", "CompletionWatcher", "WatcherConfig"]

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class WatcherConfig:
    """How the watcher polls and where it keeps its checkpoint."""

    checkpoint_path: str
    poll_interval_s: float = 2.0
    max_retry_backoff_s: float = 30.0
    overlap_s: float = 30.0
    start_from: datetime | None = None
    query_filter: str = ""
    page_size: int = 500
    rpc_timeout_s: float = 10.0
    checkpoint_every: int = 100
    max_parent_depth: int = 16


@dataclass(slots=True)
class Checkpoint:
    """Close-time watermark and the run ids seen inside the overlap window."""

    watermark: datetime
    seen: dict[str, datetime]

    @classmethod
    def load(cls, path: Path, default: datetime) -> Checkpoint:
        """Read ``path``; a missing file starts at ``default``."""
        try:
            raw = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return cls(watermark=default, seen={})
        except (OSError, ValueError) as exc:
            raise WatcherError(f"unreadable watcher checkpoint {path}: {exc}") from exc
        try:
            return cls(
                watermark=datetime.fromisoformat(raw["watermark"]),
                seen={k: datetime.fromisoformat(v) for k, v in raw["seen"].items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WatcherError(f"malformed watcher checkpoint {path}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Atomically replace ``path`` with this checkpoint."""
        data = json.dumps(
            {
                "watermark": self.watermark.isoformat(),
                "seen": {k: v.isoformat() for k, v in sorted(self.seen.items())},
            }
        )
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise WatcherError(f"cannot write watcher checkpoint {path}: {exc}") from exc

    def prune(self, overlap: timedelta) -> None:
        """Forget run ids that closed before the overlap window."""
        floor = self.watermark - overlap
        self.seen = {k: v for k, v in self.seen.items() if v >= floor}


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

    def _query(self, since: datetime) -> str:
        ts = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        q = f'ExecutionStatus != "Running" AND CloseTime >= "{ts}"'
        if self.config.query_filter:
            q += f" AND ({self.config.query_filter})"
        return q

    async def poll_once(self) -> int:
        """List closed runs since the watermark, emit the new ones; returns how many."""
        if self._checkpoint is None:
            self._checkpoint = Checkpoint.load(self._path, self.config.start_from or _EPOCH)
        cp = self._checkpoint
        overlap = timedelta(seconds=self.config.overlap_s)
        since = max(cp.watermark - overlap, _EPOCH)
        executions: list[WorkflowExecution] = []
        try:
            async for ex in self.client.list_workflows(
                self._query(since),
                page_size=self.config.page_size,
                rpc_timeout=timedelta(seconds=self.config.rpc_timeout_s),
            ):
                if ex.close_time is not None and ex.run_id not in cp.seen:
                    executions.append(ex)
        except RPCError as exc:
            raise WatcherError(f"cannot list closed workflows: {exc}") from exc
        executions.sort(key=lambda e: (e.close_time or _EPOCH, e.run_id))
        emitted = 0
        try:
            for ex in executions:
                if ex.close_time is None:  # filtered above; keeps the type checker informed
                    continue
                event = await self._completion(ex)
                await self.sink.publish_completion(event)
                self.metrics.completions.labels(event.outcome.value).inc()
                cp.seen[ex.run_id] = ex.close_time
                cp.watermark = max(cp.watermark, ex.close_time)
                emitted += 1
                if emitted % self.config.checkpoint_every == 0:
                    cp.prune(overlap)
                    await asyncio.to_thread(cp.save, self._path)
        finally:
            # Also after a failure part-way: what was handed to the sink is not emitted again.
            cp.prune(overlap)
            await asyncio.to_thread(cp.save, self._path)
        return emitted

    async def _completion(self, ex: WorkflowExecution) -> schemas.RunCompletion:
        handle = self.client.get_workflow_handle(ex.id, run_id=ex.run_id)
        try:
            history = await handle.fetch_history(
                rpc_timeout=timedelta(seconds=self.config.rpc_timeout_s)
            )
        except RPCError as exc:
            raise WatcherError(f"cannot read history of {ex.id}/{ex.run_id}: {exc}") from exc
        facts = history_facts(history.events)
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
