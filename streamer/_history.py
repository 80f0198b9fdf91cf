"""Facts about one closed run, read from its Temporal history and visibility record (pure).

``expected_steps`` is the number of activity attempts the interceptor receipted:

- for every ``ActivityTaskStarted`` event, its ``attempt``: Temporal writes the started event once,
  for the last attempt, when the activity closes; every earlier attempt of it also started on a
  worker (a retry follows a failure or timeout of a started attempt), so attempt N means N
  receipts;
- one per local-activity marker (``MarkerRecorded`` named ``core_local_activity``). Local
  activity retries that happen inside one marker (short backoffs retried in the worker) are not
  visible in history, so a retried local activity is undercounted;
- an activity still running or backing off when the run was terminated, timed out or cancelled
  has no started event yet, so it is not counted either: for such runs the number is a lower
  bound (the receipt builder revises the envelope when a late step arrives).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowExecutionStatus

import chio_receipts.schemas as schemas

__all__ = [
    "LOCAL_ACTIVITY_MARKERS",
    "HistoryFacts",
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


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryFacts:
    """What a run's history says about its receipts and its continued-as-new links."""

    expected_steps: int
    activity_attempts: int
    local_activity_markers: int
    continued_from_run_id: str | None = None
    continued_as_new_run_id: str | None = None
    parent_workflow_id: str | None = None
    parent_run_id: str | None = None


def history_facts(events: Iterable[HistoryEvent]) -> HistoryFacts:
    """Fold a run's history events into :class:`HistoryFacts`."""
    attempts = 0
    markers = 0
    continued_from: str | None = None
    continued_to: str | None = None
    parent_id: str | None = None
    parent_run: str | None = None
    for ev in events:
        t = ev.event_type
        if t == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attempts += max(ev.activity_task_started_event_attributes.attempt, 1)
        elif t == EventType.EVENT_TYPE_MARKER_RECORDED:
            if ev.marker_recorded_event_attributes.marker_name in LOCAL_ACTIVITY_MARKERS:
                markers += 1
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            a = ev.workflow_execution_started_event_attributes
            continued_from = a.continued_execution_run_id or None
            if a.HasField("parent_workflow_execution"):
                parent_id = a.parent_workflow_execution.workflow_id or None
                parent_run = a.parent_workflow_execution.run_id or None
        elif t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
            continued_to = (
                ev.workflow_execution_continued_as_new_event_attributes.new_execution_run_id or None
            )
    return HistoryFacts(
        expected_steps=attempts + markers,
        activity_attempts=attempts,
        local_activity_markers=markers,
        continued_from_run_id=continued_from,
        continued_as_new_run_id=continued_to,
        parent_workflow_id=parent_id,
        parent_run_id=parent_run,
    )


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
        source=schemas.CompletionSource.WATCHER,
        emitted_at=emitted_at,
    )
