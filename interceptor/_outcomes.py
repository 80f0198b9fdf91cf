"""Outcome records: how each attempt's body ended, signed and published off the activity's path.

After an allowed attempt's body ends, the interceptor builds a ``StepOutcome`` linked to the
step's decision (its receipt id and the id of its Chio receipt), with the status the worker saw,
the body's duration and a keyed digest of the result (never the result). When the gate refuses
an attempt before its body ran because the sidecar is unreachable or the sink refused the
decision's receipt, it builds a ``GATE_FAILED`` record instead (unsigned: there is no decision).

The activity never waits for either: :meth:`OutcomeRecorder.submit` appends to a bounded
in-memory queue and returns. One background task per interceptor takes batches from the queue,
asks the evaluator to sign them (``Evaluator.record_outcome``, concurrently within a batch) and
hands them to the sink (``publish_outcome``, the same durable path as the step receipts):

- a signature that cannot be had (sidecar down, an answer that does not hold) leaves the record
  unsigned; it is published all the same, and the builder decides what it is worth;
- a full queue drops its oldest record, counted (``outcomes_dropped``) and logged, never blocks;
- a sink that refuses (spool full, streamer stopped) puts records into a small bounded backlog,
  retried every ``retry_interval`` seconds and published once the sink accepts again (oldest
  dropped beyond ``max_backlog``, counted). The backlog is memory only: a worker that dies
  before the sink accepts again loses it, and the builder then has Temporal's record of the
  attempt alone;
- :meth:`OutcomeRecorder.aclose` drains queue and backlog for at most its timeout; what is left
  is counted as lost (``outcomes_lost``) and logged.

The classification of how a body ended (:func:`classify_end`) and the record builders are pure.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import temporalio.exceptions
from temporalio.exceptions import ApplicationError

from chio_receipts.interceptor._model import EvaluationRequest, uuid7
from chio_receipts.schemas import (
    ReceiptSinkError,
    StepOutcome,
    StepReceipt,
    StepStatus,
    chio_step_fields,
)

__all__ = [
    "SIDECAR_ERROR",
    "SIDECAR_UNREACHABLE",
    "SINK_REFUSED",
    "OutcomeCounters",
    "OutcomeRecorder",
    "OutcomeSink",
    "body_outcome",
    "classify_end",
    "gate_outcome",
    "server_timeout",
    "timeout_kind",
]

_log = logging.getLogger(__name__)

SIDECAR_UNREACHABLE = "sidecar_unreachable"
"""``error_type`` of a gate failure: the sidecar could not be reached (or answered 5xx)."""
SIDECAR_ERROR = "sidecar_error"
"""``error_type`` of a gate failure: the sidecar answered, but not with a usable decision."""
SINK_REFUSED = "sink_refused"
"""``error_type`` of a gate failure: the sink refused the decision's receipt (spool full)."""

_CANCELLED = (asyncio.CancelledError, temporalio.exceptions.CancelledError)


@runtime_checkable
class OutcomeSink(Protocol):
    """A receipt sink that also takes outcome records (``ReceiptStreamer``,
    ``InMemoryReceiptSink``). A sink without this method gets no outcome records."""

    async def publish_outcome(self, outcome: StepOutcome) -> None:
        """Accept one outcome record (steps topic, run key); ``ReceiptSinkError`` if it cannot."""
        ...


class OutcomeCounters(Protocol):
    """Where the recorder counts (the interceptor's ``InterceptorStats``)."""

    outcomes_recorded: int
    outcomes_published: int
    outcomes_unsigned: int
    outcomes_dropped: int
    outcomes_backlogged: int
    outcomes_lost: int
    gate_failures: int


# -- pure: how a body ended ---------------------------------------------------------------------


def timeout_kind(
    elapsed_us: int,
    *,
    start_to_close: timedelta | None,
    heartbeat: timedelta | None,
    schedule_to_close: timedelta | None,
    heartbeat_gap_us: int | None = None,
) -> str:
    """Which timeout most likely ended a body that Temporal cancelled as timed out.

    The worker is told *that* the attempt timed out, not which timeout fired: a body that ran
    for (nearly) its start-to-close timeout hit that one; else a heartbeat timeout, when one is
    set (and, when the longest silence between heartbeats is known, it came near it); else the
    schedule-to-close timeout."""
    if start_to_close is not None and elapsed_us * 10 >= _us(start_to_close) * 9:
        return "start_to_close"
    if heartbeat is not None and (
        heartbeat_gap_us is None or heartbeat_gap_us * 10 >= _us(heartbeat) * 9
    ):
        return "heartbeat"
    if schedule_to_close is not None:
        return "schedule_to_close"
    return "start_to_close" if start_to_close is not None else ""


def server_timeout(
    elapsed_us: int,
    *,
    start_to_close: timedelta | None,
    heartbeat: timedelta | None,
    heartbeat_gap_us: int | None,
) -> str:
    """The timeout the server must have applied to an attempt it no longer knows (a heartbeat
    answered "not found"), or ``""`` when nothing proves one: the body ran past its
    start-to-close timeout, or went longer than its heartbeat timeout without a heartbeat."""
    if start_to_close is not None and elapsed_us >= _us(start_to_close):
        return "start_to_close"
    if (
        heartbeat is not None
        and heartbeat_gap_us is not None
        and heartbeat_gap_us >= _us(heartbeat)
    ):
        return "heartbeat"
    return ""


def _us(value: timedelta) -> int:
    return value // timedelta(microseconds=1)


def classify_end(
    exc: BaseException | None,
    *,
    cancellation: Any = None,
    elapsed_us: int = 0,
    start_to_close: timedelta | None = None,
    heartbeat: timedelta | None = None,
    schedule_to_close: timedelta | None = None,
    heartbeat_gap_us: int | None = None,
) -> tuple[StepStatus, str]:
    """``(status, error_type)`` of a body that returned (``exc`` None) or raised ``exc``.

    ``cancellation`` is ``temporalio.activity.cancellation_details()`` (None when the attempt
    was not cancelled); ``heartbeat_gap_us`` the longest time the body went without a heartbeat
    (None if unknown). Where the worker sees a timeout it is ``TIMED_OUT``: a cancellation whose
    details say timed out (the worker's own timer, for a local activity), with
    :func:`timeout_kind`; or a "not found" cancellation (the server timed the attempt out and
    answered its next heartbeat so) when :func:`server_timeout` proves which timeout. Any other
    cancellation is ``CANCELLED`` (``error_type`` names the reason when it was not a plain
    cancel request: ``worker_shutdown``, ``not_found``, ``paused``, ``reset``); an
    ``ApplicationError`` is ``FAILED`` with its type (its class name when it has none); anything
    else ``FAILED`` with the exception's class name. Never the message.
    """
    if exc is None:
        return StepStatus.COMPLETED, ""
    if isinstance(exc, _CANCELLED):
        if cancellation is not None and getattr(cancellation, "timed_out", False):
            kind = timeout_kind(
                elapsed_us,
                start_to_close=start_to_close,
                heartbeat=heartbeat,
                schedule_to_close=schedule_to_close,
                heartbeat_gap_us=heartbeat_gap_us,
            )
            return StepStatus.TIMED_OUT, kind
        if cancellation is not None and getattr(cancellation, "not_found", False):
            kind = server_timeout(
                elapsed_us,
                start_to_close=start_to_close,
                heartbeat=heartbeat,
                heartbeat_gap_us=heartbeat_gap_us,
            )
            if kind:
                return StepStatus.TIMED_OUT, kind
        return StepStatus.CANCELLED, _cancel_reason(cancellation)
    if isinstance(exc, ApplicationError):
        return StepStatus.FAILED, exc.type or type(exc).__name__
    return StepStatus.FAILED, type(exc).__name__


def _cancel_reason(details: Any) -> str:
    if details is None or getattr(details, "cancel_requested", False):
        return ""
    for reason in ("worker_shutdown", "not_found", "paused", "reset"):
        if getattr(details, reason, False):
            return reason
    return ""


# -- pure: the records --------------------------------------------------------------------------


def body_outcome(
    receipt: StepReceipt,
    *,
    status: StepStatus,
    error_type: str,
    ended_at: int,
    duration_us: int,
    result_digest: str = "",
    result_key_id: str = "",
) -> StepOutcome:
    """The outcome of an allowed attempt whose body ran, linked to its decision ``receipt``
    (``decision_chio_id`` is filled off the activity's path, see :class:`OutcomeRecorder`).
    The attempt's identity, worker and trace context are the decision's."""
    return StepOutcome(
        outcome_id=uuid7(),
        namespace=receipt.namespace,
        workflow_id=receipt.workflow_id,
        run_id=receipt.run_id,
        workflow_type=receipt.workflow_type,
        task_queue=receipt.task_queue,
        activity_id=receipt.activity_id,
        activity_type=receipt.activity_type,
        attempt=receipt.attempt,
        is_local=receipt.is_local,
        tool_server=receipt.tool_server,
        tool=receipt.tool,
        capability_id=receipt.capability_id,
        decision_receipt_id=receipt.receipt_id,
        status=status,
        error_type=error_type,
        started_at=receipt.started_at,
        ended_at=ended_at,
        duration_us=max(duration_us, 0),
        result_digest=result_digest,
        result_key_id=result_key_id if result_digest else "",
        worker_identity=receipt.worker_identity,
        trace_id=receipt.trace_id,
        span_id=receipt.span_id,
    )


def gate_outcome(request: EvaluationRequest, reason: str, *, ended_at: int) -> StepOutcome:
    """The unsigned ``GATE_FAILED`` record of an attempt refused before its body ran: no
    decision, no capability, no duration; ``error_type`` is ``reason``."""
    return StepOutcome(
        outcome_id=uuid7(),
        namespace=request.namespace,
        workflow_id=request.workflow_id,
        run_id=request.run_id,
        workflow_type=request.workflow_type,
        task_queue=request.task_queue,
        activity_id=request.activity_id,
        activity_type=request.activity_type,
        attempt=request.attempt,
        is_local=request.is_local,
        tool_server=request.tool_server,
        tool=request.tool,
        capability_id="",
        decision_receipt_id="",
        status=StepStatus.GATE_FAILED,
        error_type=reason,
        started_at=request.started_at,
        ended_at=ended_at,
        duration_us=0,
        worker_identity=request.worker_identity,
        trace_id=request.trace_id,
        span_id=request.span_id,
    )


# -- the background path ------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Pending:
    outcome: StepOutcome | Callable[[], StepOutcome]
    """The record, or how to build it (off the activity's path)."""
    decision: StepReceipt | None
    """The decision whose Chio receipt id the record links to (parsed off the activity path)."""
    sign: bool


Signer = Callable[[StepOutcome], Awaitable[StepOutcome]]


class OutcomeRecorder:
    """The bounded queue and the one background task that sign and publish outcome records.

    ``signer`` is the evaluator's ``record_outcome`` (None: records stay unsigned); ``sink``
    returns the current sink (the interceptor's sink may be set after construction). Used from
    the event loop only.
    """

    def __init__(
        self,
        *,
        signer: Signer | None,
        sink: Callable[[], object | None],
        stats: OutcomeCounters,
        max_queue: int = 10_000,
        max_backlog: int = 1_000,
        batch: int = 64,
        retry_interval: float = 0.5,
        linger: float = 1.0,
    ) -> None:
        if max_queue < 1 or max_backlog < 1 or batch < 1:
            raise ValueError("max_queue, max_backlog and batch must be at least 1")
        self._signer = signer
        self._sink = sink
        self._stats = stats
        self._max_queue = max_queue
        self._max_backlog = max_backlog
        self._batch = batch
        self._retry_interval = retry_interval
        self._linger = linger
        self._queue: collections.deque[_Pending] = collections.deque()
        self._backlog: collections.deque[StepOutcome] = collections.deque()
        self._busy = 0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._warned_sink = False
        self._sink_seen: object | None = None
        self._sink_ok: OutcomeSink | None = None

    def __repr__(self) -> str:
        return f"OutcomeRecorder(queued={len(self._queue)}, backlog={len(self._backlog)})"

    @property
    def pending(self) -> int:
        """Records not yet accepted by the sink (queued, being signed, or in the backlog)."""
        return len(self._queue) + self._busy + len(self._backlog)

    def _publisher(self) -> OutcomeSink | None:
        sink = self._sink()
        if sink is self._sink_seen:  # the protocol check costs microseconds: once per sink
            return self._sink_ok
        self._sink_seen, self._sink_ok = sink, None
        if sink is None:
            return None
        if isinstance(sink, OutcomeSink):
            self._sink_ok = sink
            return sink
        if not self._warned_sink:
            self._warned_sink = True
            _log.info("the receipt sink %r takes no outcome records; none are kept", sink)
        return None

    # -- the activity's side: never waits ----------------------------------------------------------

    def submit(
        self,
        outcome: StepOutcome | Callable[[], StepOutcome],
        *,
        decision: StepReceipt | None,
        sign: bool,
    ) -> None:
        """Queue one record (or a function that builds it, called by the background task) for
        signing (``sign``) and publishing; returns at once."""
        if self._publisher() is None:
            return
        if self._closed:
            self._count_lost(1, "the interceptor is closed")
            return
        self._stats.outcomes_recorded += 1
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._stats.outcomes_dropped += 1
            dropped = self._stats.outcomes_dropped
            if dropped == 1 or dropped % 1000 == 0:
                _log.warning(
                    "outcome queue full (%d records): dropped the oldest (%d dropped so far)",
                    self._max_queue,
                    dropped,
                )
        self._queue.append(_Pending(outcome, decision, sign))
        self._start()

    def _start(self) -> None:
        if self._task is None or self._task.done() or self._wake is None or self._idle is None:
            # New events with each task: they bind to the loop the task runs on.
            self._wake, self._idle = asyncio.Event(), asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._wake, self._idle), name="chio-outcome-recorder"
            )
        else:
            self._idle.clear()
            self._wake.set()

    # -- the background task -----------------------------------------------------------------------

    async def _run(self, wake: asyncio.Event, idle: asyncio.Event) -> None:
        """Work until queue and backlog are empty, then linger a little for the next record
        (a task per attempt would cost every attempt its creation)."""
        while True:
            if not self._queue and not self._backlog:
                idle.set()
                if self._closed:
                    return
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), self._linger)
                except TimeoutError:
                    if not self._queue and not self._backlog:
                        return
                continue
            if self._backlog:
                await self._publish_backlog()
            if self._queue:
                take = min(self._batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                self._busy = len(batch)
                try:
                    for outcome in await self._sign_all(batch):
                        await self._publish(outcome)
                        self._busy -= 1
                finally:
                    self._busy = 0
            elif self._backlog:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self._retry_interval)

    async def _sign_all(self, batch: list[_Pending]) -> list[StepOutcome]:
        return list(await asyncio.gather(*(self._signed(p) for p in batch)))

    async def _signed(self, pending: _Pending) -> StepOutcome:
        made = pending.outcome
        outcome = made if isinstance(made, StepOutcome) else made()
        if pending.decision is not None and pending.decision.chio_receipt:
            try:
                chio_id = chio_step_fields(pending.decision).receipt_id
            except ValueError:
                chio_id = ""
            outcome = dataclasses.replace(outcome, decision_chio_id=chio_id)
        if not pending.sign or self._signer is None:
            return outcome
        try:
            return await self._signer(outcome)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the record unsigned
            self._stats.outcomes_unsigned += 1
            unsigned = self._stats.outcomes_unsigned
            if unsigned == 1 or unsigned % 1000 == 0:
                _log.warning(
                    "outcome record not signed (%s); published unsigned (%d so far)",
                    type(exc).__name__,
                    unsigned,
                )
            return outcome

    async def _publish(self, outcome: StepOutcome) -> None:
        if self._backlog:  # the sink is refusing: keep the order, do not ask again now
            self._keep(outcome)
            return
        sink = self._publisher()
        if sink is None:
            return
        try:
            await sink.publish_outcome(outcome)
        except ReceiptSinkError:
            self._keep(outcome)
            return
        except Exception:  # noqa: BLE001 - logged; retrying cannot help
            # Not a refusal (a record that cannot be encoded): retrying cannot help.
            _log.exception("outcome record could not be published; dropped")
            self._stats.outcomes_dropped += 1
            return
        self._stats.outcomes_published += 1

    async def _publish_backlog(self) -> None:
        sink = self._publisher()
        while self._backlog and sink is not None:
            outcome = self._backlog[0]
            try:
                await sink.publish_outcome(outcome)
            except ReceiptSinkError:
                return
            except Exception:  # noqa: BLE001 - logged; retrying cannot help
                _log.exception("outcome record could not be published; dropped")
                self._stats.outcomes_dropped += 1
            else:
                self._stats.outcomes_published += 1
            self._backlog.popleft()

    def _keep(self, outcome: StepOutcome) -> None:
        if not self._backlog:
            _log.warning("the receipt sink refuses outcome records; keeping them until it accepts")
        if len(self._backlog) >= self._max_backlog:
            self._backlog.popleft()
            self._stats.outcomes_dropped += 1
        self._backlog.append(outcome)
        self._stats.outcomes_backlogged += 1

    # -- shutdown ----------------------------------------------------------------------------------

    async def flush(self, wait_s: float) -> bool:
        """Wait until every record submitted so far is accepted by the sink; False after
        ``wait_s`` seconds."""
        task, idle = self._task, self._idle
        if task is None or task.done() or idle is None:
            return self.pending == 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle.wait(), wait_s)
        return self.pending == 0

    async def aclose(self, wait_s: float) -> None:
        """Stop taking records; drain queue and backlog for at most ``wait_s`` seconds."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            if self._wake is not None:
                self._wake.set()
            done, _ = await asyncio.wait({task}, timeout=wait_s)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task}, timeout=1.0)
        left = len(self._queue) + self._busy + len(self._backlog)
        self._queue.clear()
        self._backlog.clear()
        self._busy = 0
        if left:
            self._count_lost(left, f"not accepted by the sink within {wait_s:g} s")

    def _count_lost(self, n: int, why: str) -> None:
        self._stats.outcomes_lost += n
        _log.warning("%d outcome records lost: %s", n, why)
