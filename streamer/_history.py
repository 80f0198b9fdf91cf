"""Facts about one closed run, read from its Temporal history and visibility record (pure).

``HistoryFacts.expected_attempts`` lists every activity attempt the history shows as started,
one :class:`schemas.ExpectedAttempt` per attempt, in ``(activity_id, attempt)`` order, with the
ids the receipt interceptor reads from ``activity.info()``. ``expected_steps`` is its length.

- Regular activities: Temporal writes an activity's ``ActivityTaskStarted`` event once, for its
  last attempt N, when the activity closes; every earlier attempt also started on a worker (a
  retry follows a failure or timeout of a started attempt), so attempt N means attempts 1..N.
  The activity id and type come from the ``ActivityTaskScheduled`` event. ``temporal_end`` of
  attempt N comes from the closing event (``completed``, ``failed:<type>``,
  ``timed_out:<kind>``, ``cancelled``), that of attempt N-1 from the started event's
  ``last_failure``; history keeps nothing about earlier attempts (``""``).
- Local activities: each ``core_local_activity`` marker carries sdk-core's
  ``LocalActivityMarkerData`` (JSON under the details key ``data``): ``attempt`` is the number
  of the last attempt the marker covers. Retries with a short backoff run inside the worker and
  end in one marker. A backoff longer than the local retry threshold records a marker with
  ``backoff`` set, then a timer, then the activity is scheduled again with a new sequence number
  (and, unless the workflow set one, a new activity id) and the next attempt number: such a
  marker covers the attempts after the previous backoff marker of the same activity (same type
  and ``original_schedule_time``). ``temporal_end`` of a marker's last attempt comes from its
  failure (``failed:<type>``, ``timed_out:<kind>``, ``cancelled``) or is ``completed``; earlier
  attempts inside one marker are ``""``. A marker whose data cannot be read (another SDK's
  format) counts as one attempt with an empty id.
- Activities still open when the run closed (terminated, timed out, cancelled, or completed
  while an activity was still running or backing off) have no started event. The watcher then
  reads the closed run's pending activities (``DescribeWorkflowExecution`` keeps them after the
  close) and :meth:`HistoryFold.add_pending` adds their attempts: 1..N for attempt N that had
  started, 1..N-1 for attempt N still scheduled (backing off after attempt N-1, whose end is the
  pending activity's ``last_failure``). A started attempt cut off by the close has no end
  (``""``); an activity whose first attempt never started adds nothing.

Not counted, because Temporal does not show them:

- an activity cancelled while it was backing off between attempts: its history is scheduled,
  cancel requested, cancelled (``ACTIVITY_ID_NOT_STARTED``), with nothing of the attempts that
  ran before; for such runs the list is a lower bound (a receipt of such an attempt is one the
  list does not name);
- local-activity attempts that ran in a workflow task that never completed (the worker died or
  the task failed) left no marker; a later workflow task runs them again from attempt 1.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.api.enums.v1 import EventType, PendingActivityState, TimeoutType
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent, MarkerRecordedEventAttributes
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.client import WorkflowExecutionStatus

import chio_receipts.schemas as schemas

__all__ = [
    "LOCAL_ACTIVITY_MARKERS",
    "HistoryFacts",
    "HistoryFold",
    "completion_event",
    "completion_event_id",
    "history_facts",
    "micros",
    "outcome_of",
]

LOCAL_ACTIVITY_MARKERS = frozenset({"core_local_activity", "LocalActivity"})

_OUTCOMES = {
    WorkflowExecutionStatus.COMPLETED: schemas.Outcome.SUCCESS,
    WorkflowExecutionStatus.FAILED: schemas.Outcome.FAILURE,
    WorkflowExecutionStatus.CANCELED: schemas.Outcome.CANCELLED,
    WorkflowExecutionStatus.TERMINATED: schemas.Outcome.TERMINATED,
    WorkflowExecutionStatus.TIMED_OUT: schemas.Outcome.TIMED_OUT,
    WorkflowExecutionStatus.CONTINUED_AS_NEW: schemas.Outcome.CONTINUED_AS_NEW,
}
_MICRO = timedelta(microseconds=1)
_EVENT_ID_NAMESPACE = uuid.UUID("6f1d2f0e-8c1b-5a7e-9b59-0c4f3c1f7a11")

COMPLETED = "completed"
CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryFacts:
    """What a run's history says about its receipts and its continued-as-new links.

    ``expected_steps == len(expected_attempts)``; ``activity_attempts`` counts the regular
    activities' attempts among them, ``local_activity_markers`` the local-activity markers.
    """

    expected_steps: int
    activity_attempts: int
    local_activity_markers: int
    expected_attempts: tuple[schemas.ExpectedAttempt, ...] = ()
    continued_from_run_id: str | None = None
    continued_as_new_run_id: str | None = None
    parent_workflow_id: str | None = None
    parent_run_id: str | None = None


def _type_name(f: Failure) -> str:
    kind = f.WhichOneof("failure_info")
    if kind == "application_failure_info" and f.application_failure_info.type:
        return f.application_failure_info.type
    if kind is None:
        return "Failure"
    return "".join(w.title() for w in kind.removesuffix("_info").split("_"))


def _timeout_kind(t: TimeoutType.ValueType) -> str:
    try:
        return TimeoutType.Name(t).removeprefix("TIMEOUT_TYPE_").lower()
    except ValueError:
        return "unspecified"


def failed_end(f: Failure) -> str:
    """``failed:<type>``: the application failure's type, else the failure's kind."""
    return f"failed:{_type_name(f)}"


def failure_end(f: Failure) -> str:
    """How an attempt that ended with ``f`` ended: ``timed_out:<kind>``, ``cancelled`` or
    ``failed:<type>`` (an activity failure wrapper is read through to its cause)."""
    kind = f.WhichOneof("failure_info")
    if kind == "activity_failure_info" and f.HasField("cause"):
        return failure_end(f.cause)
    if kind == "timeout_failure_info":
        return f"timed_out:{_timeout_kind(f.timeout_failure_info.timeout_type)}"
    if kind == "canceled_failure_info":
        return CANCELLED
    return failed_end(f)


def _marker_data(attrs: MarkerRecordedEventAttributes) -> dict[str, Any] | None:
    """sdk-core's ``LocalActivityMarkerData`` of a marker, or None when it cannot be read."""
    if "data" not in attrs.details or not attrs.details["data"].payloads:
        return None
    try:
        data = json.loads(attrs.details["data"].payloads[0].data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    attempt = data.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        return None
    return data


@dataclass(slots=True)
class _Started:
    activity_id: str
    activity_type: str
    attempt: int
    previous_end: str


def _regular_attempts(s: _Started, end: str) -> list[schemas.ExpectedAttempt]:
    """Attempts 1..N of a regular activity whose attempt N ended as ``end``."""
    if s.attempt < 1:
        return []
    return [
        schemas.ExpectedAttempt(
            activity_id=s.activity_id,
            activity_type=s.activity_type,
            attempt=n,
            is_local=False,
            temporal_end=end if n == s.attempt else s.previous_end if n == s.attempt - 1 else "",
        )
        for n in range(1, s.attempt + 1)
    ]


class HistoryFold:
    """Folds a run's history events, one at a time, into :class:`HistoryFacts`.

    The watcher feeds it page by page, so no run's whole history is held; what it keeps is one
    small entry per activity still open at that point of the history.
    """

    def __init__(self) -> None:
        self._scheduled: dict[int, tuple[str, str]] = {}
        self._started: dict[int, _Started] = {}
        self._attempts: list[schemas.ExpectedAttempt] = []
        self._backed_off: dict[tuple[str, str], int] = {}
        self._regular = 0
        self._markers = 0
        self._continued_from: str | None = None
        self._continued_to: str | None = None
        self._parent_id: str | None = None
        self._parent_run: str | None = None

    def add(self, ev: HistoryEvent) -> None:
        """Fold one event (in history order)."""
        t = ev.event_type
        if t == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            a = ev.activity_task_scheduled_event_attributes
            self._scheduled[ev.event_id] = (a.activity_id, a.activity_type.name)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            s = ev.activity_task_started_event_attributes
            aid, atype = self._scheduled.get(s.scheduled_event_id, ("", ""))
            previous = failure_end(s.last_failure) if s.HasField("last_failure") else ""
            self._started[s.scheduled_event_id] = _Started(aid, atype, max(s.attempt, 1), previous)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            self._close(ev.activity_task_completed_event_attributes.scheduled_event_id, COMPLETED)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            a_f = ev.activity_task_failed_event_attributes
            self._close(a_f.scheduled_event_id, failed_end(a_f.failure))
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT:
            a_t = ev.activity_task_timed_out_event_attributes
            end = failure_end(a_t.failure)
            if not end.startswith("timed_out:"):
                end = "timed_out:unspecified"
            self._close(a_t.scheduled_event_id, end)
        elif t == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED:
            self._close(ev.activity_task_canceled_event_attributes.scheduled_event_id, CANCELLED)
        elif t == EventType.EVENT_TYPE_MARKER_RECORDED:
            m = ev.marker_recorded_event_attributes
            if m.marker_name in LOCAL_ACTIVITY_MARKERS:
                self._marker(m)
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            w = ev.workflow_execution_started_event_attributes
            self._continued_from = w.continued_execution_run_id or None
            if w.HasField("parent_workflow_execution"):
                self._parent_id = w.parent_workflow_execution.workflow_id or None
                self._parent_run = w.parent_workflow_execution.run_id or None
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            self._continued_to = (
                ev.workflow_execution_continued_as_new_event_attributes.new_execution_run_id or None
            )

    def _close(self, scheduled_event_id: int, end: str) -> None:
        """An activity closed: its attempts 1..N, if it ever started."""
        self._scheduled.pop(scheduled_event_id, None)
        started = self._started.pop(scheduled_event_id, None)
        if started is not None:
            self._attempts.extend(_regular_attempts(started, end))
            self._regular += started.attempt

    @property
    def open_activities(self) -> int:
        """Activities scheduled and neither started nor closed in the events folded so far."""
        return sum(1 for eid in self._scheduled if eid not in self._started)

    def add_pending(self, pending: Iterable[PendingActivityInfo]) -> None:
        """Add the attempts of the activities the run left open, from its pending activities
        (``DescribeWorkflowExecution`` of the closed run); each open activity is added once."""
        open_ids = {
            aid: eid for eid, (aid, _) in self._scheduled.items() if eid not in self._started
        }
        for p in pending:
            eid = open_ids.pop(p.activity_id, None)
            if eid is None:
                continue
            aid, atype = self._scheduled.pop(eid)
            attempt = max(p.attempt, 1)
            started = p.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED or (
                p.state != PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED
                and p.HasField("last_started_time")
                and p.last_started_time.ToNanoseconds() > 0
            )
            failed = failure_end(p.last_failure) if p.HasField("last_failure") else ""
            if started:
                # Attempt N was running when the run closed; N-1 ended with the last failure.
                s = _Started(aid, atype, attempt, failed)
                self._attempts.extend(_regular_attempts(s, ""))
            else:
                # Attempt N never started: attempts 1..N-1 did, N-1 ending with the last failure.
                s = _Started(aid, atype, attempt - 1, "")
                self._attempts.extend(_regular_attempts(s, failed))
            self._regular += s.attempt

    def _marker(self, m: MarkerRecordedEventAttributes) -> None:
        self._markers += 1
        data = _marker_data(m)
        if data is None:
            self._attempts.append(
                schemas.ExpectedAttempt(activity_id="", activity_type="", attempt=1, is_local=True)
            )
            return
        aid = str(data.get("activity_id", ""))
        atype = str(data.get("activity_type", ""))
        last: int = data["attempt"]
        first = 1
        scheduled = data.get("original_schedule_time")
        if scheduled:
            # The attempts before a timer backoff are in the previous marker of this activity.
            chain = (atype, json.dumps(scheduled, sort_keys=True))
            first = self._backed_off.pop(chain, 0) + 1
            if data.get("backoff"):
                self._backed_off[chain] = last
        end = failure_end(m.failure) if m.HasField("failure") else COMPLETED
        for n in range(min(first, last), last + 1):
            self._attempts.append(
                schemas.ExpectedAttempt(
                    activity_id=aid,
                    activity_type=atype,
                    attempt=n,
                    is_local=True,
                    temporal_end=end if n == last else "",
                )
            )

    def facts(self) -> HistoryFacts:
        """The facts of the events folded so far."""
        attempts = list(self._attempts)
        regular = self._regular
        for s in self._started.values():  # started, not closed yet (a partial history)
            attempts.extend(_regular_attempts(s, ""))
            regular += s.attempt
        attempts.sort(key=lambda a: (a.activity_id, a.attempt))
        return HistoryFacts(
            expected_steps=len(attempts),
            activity_attempts=regular,
            local_activity_markers=self._markers,
            expected_attempts=tuple(attempts),
            continued_from_run_id=self._continued_from,
            continued_as_new_run_id=self._continued_to,
            parent_workflow_id=self._parent_id,
            parent_run_id=self._parent_run,
        )


def history_facts(events: Iterable[HistoryEvent]) -> HistoryFacts:
    """Fold a run's history events into :class:`HistoryFacts`."""
    fold = HistoryFold()
    for ev in events:
        fold.add(ev)
    return fold.facts()


def outcome_of(status: WorkflowExecutionStatus | None) -> schemas.Outcome:
    """The completion outcome of a closed execution status."""
    return _OUTCOMES.get(status, schemas.Outcome.UNKNOWN) if status else schemas.Outcome.UNKNOWN


def micros(ts: datetime | None) -> int:
    """Microseconds since the epoch of an aware datetime (0 for None)."""
    if ts is None:
        return 0
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - datetime(1970, 1, 1, tzinfo=UTC)) // _MICRO


def completion_event_id(namespace: str, workflow_id: str, run_id: str) -> str:
    """Deterministic event id of the watcher's completion of a run: a re-emission after a
    restart carries the same id, so downstream drops it as a duplicate."""
    return str(uuid.uuid5(_EVENT_ID_NAMESPACE, schemas.run_key(namespace, workflow_id, run_id)))


def completion_event(
    *,
    namespace: str,
    workflow_id: str,
    run_id: str,
    workflow_type: str,
    task_queue: str,
    status: WorkflowExecutionStatus | None,
    start_time: datetime | None,
    close_time: datetime | None,
    facts: HistoryFacts,
    parent_workflow_ids: tuple[str, ...],
    emitted_at: int,
) -> schemas.RunCompletion:
    """The watcher's :class:`schemas.RunCompletion` for one closed run."""
    return schemas.RunCompletion(
        event_id=completion_event_id(namespace, workflow_id, run_id),
        namespace=namespace,
        workflow_id=workflow_id,
        run_id=run_id,
        workflow_type=workflow_type,
        task_queue=task_queue,
        outcome=outcome_of(status),
        started_at=micros(start_time),
        closed_at=micros(close_time),
        parent_workflow_ids=parent_workflow_ids,
        parent_run_id=facts.parent_run_id,
        continued_from_run_id=facts.continued_from_run_id,
        continued_as_new_run_id=facts.continued_as_new_run_id,
        expected_steps=facts.expected_steps,
        expected_attempts=facts.expected_attempts,
        source=schemas.CompletionSource.WATCHER,
        emitted_at=emitted_at,
    )
