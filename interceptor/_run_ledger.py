"""The run ledger: per-run receipt state on this worker, from the first attempt to the flush.

Each run holds its in-process ``WorkflowReceipt`` (the steps, folded into the ``chio-temporal/v1``
envelope at the flush), the hash of its last receipt (the next attempt's ``prev_hash``) and a
pending ``RunCompletion`` once finalized. A run lives until ``flush``; runs never flushed are
evicted least-recently-used beyond ``max_runs``: their receipts already went to the sink, only
the in-process envelope is lost, and a later flush raises ``UnknownRunError``.

The table is thread-safe (``finalize`` may be called from a sync activity's thread); a run's
``lock`` serialises the attempts of that run on the event loop, so receipts chain in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from chio_receipts.interceptor._errors import ChioTemporalError, UnknownRunError
from chio_receipts.interceptor._model import SignedReceipt, now_us, uuid7
from chio_receipts.interceptor._receipt import WorkflowReceipt, WorkflowStepReceipt, parse_outcome
from chio_receipts.schemas import (
    CompletionSource,
    ReceiptSink,
    ReceiptSinkError,
    RunCompletion,
    receipt_hash,
)

__all__ = ["RunLedger", "RunState"]

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunState:
    """What this worker holds for one run."""

    receipt: WorkflowReceipt
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_hash: bytes = b""
    completion: RunCompletion | None = None
    completion_task: asyncio.Task[None] | None = None


class RunLedger:
    """Runs by (workflow_id, run_id), bounded by ``max_runs`` (LRU), publishing to ``sink``.

    ``on_evict`` is called once per evicted run (the interceptor counts them).
    """

    def __init__(
        self,
        *,
        max_runs: int,
        sink: ReceiptSink | None,
        on_evict: Callable[[], None] = lambda: None,
    ) -> None:
        self.max_runs = max_runs
        self.sink = sink
        self._on_evict = on_evict
        self._runs: OrderedDict[tuple[str, str], RunState] = OrderedDict()
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._runs)

    # -- lookup ----------------------------------------------------------------------------------

    def open(self, namespace: str, workflow_id: str, run_id: str) -> RunState:
        """The run's state, made on first use; marks it most recently used."""
        with self._lock:
            run = self._touch(workflow_id, run_id)
            if run is None:
                run = RunState(
                    WorkflowReceipt(
                        workflow_id=workflow_id, run_id=run_id, namespace=namespace, started_at=0
                    )
                )
                self._runs[workflow_id, run_id] = run
                self._evict_beyond_bound()
            return run

    def _touch(self, workflow_id: str, run_id: str) -> RunState | None:
        # Call with ``self._lock`` held: the run's state, marked most recently used, or None.
        run = self._runs.get((workflow_id, run_id))
        if run is not None:
            self._runs.move_to_end((workflow_id, run_id))
        return run

    def _evict_beyond_bound(self) -> None:
        while len(self._runs) > self.max_runs:
            (workflow_id, run_id), _ = self._runs.popitem(last=False)
            self._on_evict()
            _log.warning(
                "evicted in-process receipt state of run %s/%s (max_runs=%d); its receipts "
                "already went to the sink",
                workflow_id,
                run_id,
                self.max_runs,
            )

    def get(self, workflow_id: str, run_id: str) -> RunState:
        """The run's state; :class:`UnknownRunError` if this worker holds none."""
        with self._lock:
            run = self._touch(workflow_id, run_id)
        if run is not None:
            return run
        raise UnknownRunError(
            f"no workflow receipt held for workflow_id={workflow_id!r} run_id={run_id!r}: this "
            "worker never executed an activity of that run, it was already flushed, or it was "
            f"evicted (more than max_runs={self.max_runs} unflushed runs)"
        )

    # -- steps -----------------------------------------------------------------------------------

    async def record(self, run: RunState, signed: SignedReceipt) -> None:
        """Publish a signed step to the sink, then chain it and add it to the run's receipt.

        Call with ``run.lock`` held. The sink's ``ReceiptSinkError`` propagates before anything
        is recorded, so a refused step leaves the run as it was.
        """
        if self.sink is not None:
            await self.sink.publish_step(signed.receipt, signed.body)
        run.last_hash = receipt_hash(signed.body)
        run.receipt.add_step(WorkflowStepReceipt(receipt=signed.receipt, body=signed.body))

    # -- completion and flush --------------------------------------------------------------------

    def finalize(
        self,
        workflow_id: str,
        run_id: str,
        outcome: str,
        parent_workflow_ids: Sequence[str] = (),
    ) -> None:
        """Mark a run completed and emit its ``RunCompletion`` (see
        ``ChioActivityInterceptor.finalize_workflow``)."""
        kind = parse_outcome(outcome)
        run = self.open("", workflow_id, run_id)
        with self._lock:
            wr = run.receipt
            if wr.completed:
                if wr.outcome is not kind:
                    raise ChioTemporalError(
                        f"run {workflow_id}/{run_id} was already finalized as "
                        f"{wr.outcome.value.lower()}, not {outcome}"
                    )
                return
            now = now_us()
            wr.finalize(kind, now)
            if parent_workflow_ids:
                wr.parent_workflow_ids = tuple(parent_workflow_ids)
            run.completion = RunCompletion(
                event_id=uuid7(),
                namespace=wr.namespace,
                workflow_id=workflow_id,
                run_id=run_id,
                workflow_type=wr.workflow_type,
                task_queue=wr.task_queue,
                outcome=kind,
                started_at=wr.started_at,
                closed_at=now,
                parent_workflow_ids=wr.parent_workflow_ids,
                expected_steps=None,
                source=CompletionSource.FINALIZE,
                emitted_at=now,
            )
        if self.sink is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop: published by flush
        task = asyncio.create_task(self._publish_completion(run))
        run.completion_task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("publishing a run completion failed", exc_info=task.exception())

    async def _publish_completion(self, run: RunState) -> None:
        event, run.completion = run.completion, None
        if event is not None and self.sink is not None:
            published = False
            try:
                await self.sink.publish_completion(event)
                published = True
            finally:
                if not published:
                    run.completion = event  # kept for the flush to retry

    async def flush(self, workflow_id: str, run_id: str) -> dict[str, Any]:
        """Publish the run's pending completion and its envelope, then forget the run.

        Raises :class:`UnknownRunError` for a run not held, and the sink's ``ReceiptSinkError``
        if it refuses (the run is then kept, so the flush can be retried).
        """
        run = self.get(workflow_id, run_id)
        async with run.lock:
            await self._settle_completion(run, workflow_id, run_id)
            envelope = run.receipt.to_envelope()
            if self.sink is not None:
                await self.sink.publish_envelope(envelope)
            with self._lock:
                if self._runs.get((workflow_id, run_id)) is run:
                    del self._runs[(workflow_id, run_id)]
        return envelope

    async def _settle_completion(self, run: RunState, workflow_id: str, run_id: str) -> None:
        task, run.completion_task = run.completion_task, None
        if task is not None:
            try:
                await task
            except ReceiptSinkError:
                _log.warning("retrying the completion of %s/%s at flush", workflow_id, run_id)
        if run.completion is not None:
            await self._publish_completion(run)

    async def aclose(self) -> None:
        """Wait for the completion publishes still in flight."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
