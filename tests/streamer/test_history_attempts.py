"""The attempts a run's history shows as started (``HistoryFacts.expected_attempts``), from
hand-built Temporal history events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.api.common.v1 import ActivityType, Payload, Payloads
from temporalio.api.enums.v1 import EventType, PendingActivityState, TimeoutType
from temporalio.api.failure.v1 import (
    ApplicationFailureInfo,
    CanceledFailureInfo,
    Failure,
    ServerFailureInfo,
    TimeoutFailureInfo,
)
from temporalio.api.history.v1 import (
    ActivityTaskCanceledEventAttributes,
    ActivityTaskCompletedEventAttributes,
    ActivityTaskFailedEventAttributes,
    ActivityTaskScheduledEventAttributes,
    ActivityTaskStartedEventAttributes,
    ActivityTaskTimedOutEventAttributes,
    HistoryEvent,
    MarkerRecordedEventAttributes,
)
from temporalio.api.workflow.v1 import PendingActivityInfo
from temporalio.client import WorkflowExecutionStatus

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.streamer._history import HistoryFold, completion_event, failure_end

pytestmark = pytest.mark.unit

E = EventType


def _att(
    activity_id: str, activity_type: str, attempt: int, end: str = "", *, local: bool = False
) -> schemas.ExpectedAttempt:
    return schemas.ExpectedAttempt(
        activity_id=activity_id,
        activity_type=activity_type,
        attempt=attempt,
        is_local=local,
        temporal_end=end,
    )


def _app(kind: str) -> Failure:
    return Failure(message="m", application_failure_info=ApplicationFailureInfo(type=kind))


def _timeout(kind: TimeoutType.ValueType) -> Failure:
    return Failure(message="m", timeout_failure_info=TimeoutFailureInfo(timeout_type=kind))


class _History:
    """Builds a history: event ids count from 1, as Temporal's do."""

    def __init__(self) -> None:
        self.events: list[HistoryEvent] = []

    def add(self, kind: EventType.ValueType, **attrs: Any) -> int:
        eid = len(self.events) + 1
        self.events.append(HistoryEvent(event_id=eid, event_type=kind, **attrs))
        return eid

    def scheduled(self, activity_id: str, activity_type: str) -> int:
        return self.add(
            E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
            activity_task_scheduled_event_attributes=ActivityTaskScheduledEventAttributes(
                activity_id=activity_id, activity_type=ActivityType(name=activity_type)
            ),
        )

    def started(self, sched: int, attempt: int, last_failure: Failure | None = None) -> int:
        a = ActivityTaskStartedEventAttributes(scheduled_event_id=sched, attempt=attempt)
        if last_failure is not None:
            a.last_failure.CopyFrom(last_failure)
        return self.add(
            E.EVENT_TYPE_ACTIVITY_TASK_STARTED, activity_task_started_event_attributes=a
        )

    def completed(self, sched: int) -> None:
        self.add(
            E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
            activity_task_completed_event_attributes=ActivityTaskCompletedEventAttributes(
                scheduled_event_id=sched
            ),
        )

    def failed(self, sched: int, failure: Failure) -> None:
        self.add(
            E.EVENT_TYPE_ACTIVITY_TASK_FAILED,
            activity_task_failed_event_attributes=ActivityTaskFailedEventAttributes(
                scheduled_event_id=sched, failure=failure
            ),
        )

    def timed_out(self, sched: int, kind: TimeoutType.ValueType) -> None:
        self.add(
            E.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
            activity_task_timed_out_event_attributes=ActivityTaskTimedOutEventAttributes(
                scheduled_event_id=sched, failure=_timeout(kind)
            ),
        )

    def cancelled(self, sched: int) -> None:
        self.add(
            E.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
            activity_task_canceled_event_attributes=ActivityTaskCanceledEventAttributes(
                scheduled_event_id=sched
            ),
        )

    def marker(
        self,
        data: dict[str, Any] | bytes | None,
        failure: Failure | None = None,
        name: str = "core_local_activity",
    ) -> None:
        a = MarkerRecordedEventAttributes(marker_name=name)
        if data is not None:
            raw = data if isinstance(data, bytes) else json.dumps(data).encode()
            a.details["data"].CopyFrom(
                Payloads(payloads=[Payload(metadata={"encoding": b"json/plain"}, data=raw)])
            )
        if failure is not None:
            a.failure.CopyFrom(failure)
        self.add(E.EVENT_TYPE_MARKER_RECORDED, marker_recorded_event_attributes=a)

    def facts(self) -> streamer.HistoryFacts:
        return streamer.history_facts(self.events)


def _la(
    seq: int,
    attempt: int,
    *,
    activity_type: str = "lookup",
    backoff: dict[str, int] | None = None,
    scheduled_s: int = 1_700_000_000,
) -> dict[str, Any]:
    """sdk-core's LocalActivityMarkerData, as the dev server stores it."""
    return {
        "seq": seq,
        "attempt": attempt,
        "activity_id": str(seq),
        "activity_type": activity_type,
        "complete_time": {"seconds": scheduled_s + 5, "nanos": 1},
        "backoff": backoff,
        "original_schedule_time": {"seconds": scheduled_s, "nanos": 47106936},
        "activation_index": 1,
    }


def test_completed_activity_is_one_completed_attempt() -> None:
    h = _History()
    s = h.scheduled("1", "charge")
    h.started(s, 1)
    h.completed(s)
    facts = h.facts()
    assert facts.expected_attempts == (_att("1", "charge", 1, "completed"),)
    assert (facts.expected_steps, facts.activity_attempts, facts.local_activity_markers) == (
        1,
        1,
        0,
    )


def test_failed_activity_carries_the_application_type_or_the_failure_kind() -> None:
    h = _History()
    a = h.scheduled("1", "charge")
    h.started(a, 1)
    h.failed(a, _app("CardDeclined"))
    b = h.scheduled("2", "refund")
    h.started(b, 1)
    h.failed(b, Failure(message="m", server_failure_info=ServerFailureInfo()))
    assert h.facts().expected_attempts == (
        _att("1", "charge", 1, "failed:CardDeclined"),
        _att("2", "refund", 1, "failed:ServerFailure"),
    )


@pytest.mark.parametrize(
    ("kind", "end"),
    [
        (TimeoutType.TIMEOUT_TYPE_HEARTBEAT, "timed_out:heartbeat"),
        (TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE, "timed_out:start_to_close"),
        (TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_CLOSE, "timed_out:schedule_to_close"),
    ],
)
def test_timed_out_activity_says_which_timeout(kind: TimeoutType.ValueType, end: str) -> None:
    h = _History()
    s = h.scheduled("7", "upload")
    h.started(s, 1)
    h.timed_out(s, kind)
    assert h.facts().expected_attempts == (_att("7", "upload", 1, end),)


def test_cancelled_activity_after_start() -> None:
    h = _History()
    s = h.scheduled("1", "wait")
    h.started(s, 2, last_failure=_app("Busy"))
    h.cancelled(s)
    assert h.facts().expected_attempts == (
        _att("1", "wait", 1, "failed:Busy"),
        _att("1", "wait", 2, "cancelled"),
    )


@pytest.mark.parametrize(
    ("last_failure", "previous"),
    [
        (_timeout(TimeoutType.TIMEOUT_TYPE_HEARTBEAT), "timed_out:heartbeat"),
        (_timeout(TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE), "timed_out:start_to_close"),
        (_app("RuntimeError"), "failed:RuntimeError"),
    ],
)
def test_retried_activity_is_every_attempt_with_the_last_failure_on_the_one_before(
    last_failure: Failure, previous: str
) -> None:
    h = _History()
    s = h.scheduled("3", "charge")
    h.started(s, 3, last_failure=last_failure)
    h.completed(s)
    facts = h.facts()
    assert facts.expected_attempts == (
        _att("3", "charge", 1, ""),
        _att("3", "charge", 2, previous),
        _att("3", "charge", 3, "completed"),
    )
    assert facts.expected_steps == facts.activity_attempts == 3


def test_activity_never_started_contributes_nothing() -> None:
    h = _History()
    pending = h.scheduled("1", "charge")  # the run closed while it was pending or backing off
    timed = h.scheduled("2", "charge")
    h.timed_out(timed, TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START)
    gone = h.scheduled("3", "charge")
    h.cancelled(gone)
    assert pending
    facts = h.facts()
    assert facts.expected_attempts == ()
    assert facts.expected_steps == 0


def test_local_marker_with_attempt_three_is_three_attempts() -> None:
    h = _History()
    h.marker(_la(1, 3))
    facts = h.facts()
    assert facts.expected_attempts == (
        _att("1", "lookup", 1, local=True),
        _att("1", "lookup", 2, local=True),
        _att("1", "lookup", 3, "completed", local=True),
    )
    assert (facts.expected_steps, facts.activity_attempts, facts.local_activity_markers) == (
        3,
        0,
        1,
    )


@pytest.mark.parametrize(
    ("failure", "end"),
    [
        (_app("Flake"), "failed:Flake"),
        (_timeout(TimeoutType.TIMEOUT_TYPE_START_TO_CLOSE), "timed_out:start_to_close"),
        (Failure(message="m", canceled_failure_info=CanceledFailureInfo()), "cancelled"),
    ],
)
def test_local_marker_failure_ends_its_last_attempt(failure: Failure, end: str) -> None:
    h = _History()
    h.marker(_la(1, 2), failure=failure)
    assert h.facts().expected_attempts == (
        _att("1", "lookup", 1, local=True),
        _att("1", "lookup", 2, end, local=True),
    )


def test_local_retries_across_a_timer_backoff_are_counted_once() -> None:
    """Attempts 1-3 retried in the worker, then a timer backoff (new seq, new activity id) and
    attempt 4 in a second marker; then another local activity of the same type."""
    h = _History()
    h.marker(_la(1, 3, backoff={"seconds": 1, "nanos": 600000000}), failure=_app("Flake"))
    h.marker(_la(2, 4))
    h.marker(_la(3, 2, scheduled_s=1_700_000_009))
    facts = h.facts()
    assert facts.expected_attempts == (
        _att("1", "lookup", 1, local=True),
        _att("1", "lookup", 2, local=True),
        _att("1", "lookup", 3, "failed:Flake", local=True),
        _att("2", "lookup", 4, "completed", local=True),
        _att("3", "lookup", 1, local=True),
        _att("3", "lookup", 2, "completed", local=True),
    )
    assert facts.local_activity_markers == 3


def test_unreadable_local_marker_is_one_attempt_and_other_markers_are_ignored() -> None:
    h = _History()
    h.marker(b"\xff not json")
    h.marker(None, name="LocalActivity")
    h.marker({"attempt": 0})
    h.marker(_la(1, 1), name="core_patch")
    facts = h.facts()
    assert facts.expected_attempts == (_att("", "", 1, local=True),) * 3
    assert facts.local_activity_markers == 3


def test_attempts_are_in_activity_id_then_attempt_order_and_fold_by_page() -> None:
    h = _History()
    b = h.scheduled("b", "t")
    a = h.scheduled("a", "t")
    h.started(b, 2, last_failure=_app("X"))
    h.started(a, 1)
    h.marker(_la(9, 1))
    h.completed(b)
    h.completed(a)
    facts = h.facts()
    assert [x.key for x in facts.expected_attempts] == [("9", 1), ("a", 1), ("b", 1), ("b", 2)]
    assert facts.expected_steps == len(facts.expected_attempts) == 4
    fold = HistoryFold()
    for page in (h.events[:3], h.events[3:5], h.events[5:]):
        for ev in page:
            fold.add(ev)
        fold.facts()  # a look mid-way changes nothing
    assert fold.facts() == facts


def test_started_but_not_closed_counts_its_attempts_with_no_end() -> None:
    h = _History()
    s = h.scheduled("1", "t")
    h.started(s, 2, last_failure=_app("X"))
    assert h.facts().expected_attempts == (_att("1", "t", 1, "failed:X"), _att("1", "t", 2, ""))


def test_failure_end_reads_an_activity_failure_through_to_its_cause() -> None:
    wrapped = Failure(message="activity error", cause=_timeout(TimeoutType.TIMEOUT_TYPE_HEARTBEAT))
    wrapped.activity_failure_info.SetInParent()
    assert failure_end(wrapped) == "timed_out:heartbeat"
    assert failure_end(Failure(message="m")) == "failed:Failure"
    assert failure_end(Failure(application_failure_info=ApplicationFailureInfo())) == (
        "failed:ApplicationFailure"
    )


def test_completion_event_carries_the_expected_attempts_through_avro() -> None:
    h = _History()
    s = h.scheduled("1", "charge")
    h.started(s, 2, last_failure=_timeout(TimeoutType.TIMEOUT_TYPE_HEARTBEAT))
    h.completed(s)
    h.marker(_la(2, 2), failure=_app("Flake"))
    facts = h.facts()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ev = completion_event(
        namespace="ns",
        workflow_id="w",
        run_id="r",
        workflow_type="T",
        task_queue="q",
        status=WorkflowExecutionStatus.COMPLETED,
        start_time=t0,
        close_time=t0,
        facts=facts,
        parent_workflow_ids=(),
        emitted_at=1,
    )
    assert ev.expected_attempts == facts.expected_attempts
    assert ev.expected_steps == 4
    body = schemas.encode(schemas.RUN_COMPLETION_SCHEMA, ev.to_avro())
    back = schemas.RunCompletion.from_avro(schemas.decode(body).record)
    assert back.expected_attempts == facts.expected_attempts


P = PendingActivityState


def _pending(
    activity_id: str,
    attempt: int,
    state: PendingActivityState.ValueType,
    last_failure: Failure | None = None,
    *,
    started_s: int = 0,
) -> PendingActivityInfo:
    p = PendingActivityInfo(
        activity_id=activity_id,
        activity_type=ActivityType(name="ignored"),
        attempt=attempt,
        state=state,
    )
    if last_failure is not None:
        p.last_failure.CopyFrom(last_failure)
    if started_s:
        p.last_started_time.FromSeconds(started_s)
    return p


def test_open_activities_take_their_attempts_from_the_pending_activities() -> None:
    """The run closed with activities open: backing off after attempt 1, running attempt 3,
    never started, cancel requested while running and while scheduled."""
    h = _History()
    for aid in ("back", "run", "never", "cr-run", "cr-sched"):
        h.scheduled(aid, f"t-{aid}")
    done = h.scheduled("done", "t-done")
    h.started(done, 1)
    h.completed(done)
    fold = HistoryFold()
    for ev in h.events:
        fold.add(ev)
    assert fold.open_activities == 5
    pending = [
        _pending("back", 2, P.PENDING_ACTIVITY_STATE_SCHEDULED, _app("Flake")),
        _pending(
            "run", 3, P.PENDING_ACTIVITY_STATE_STARTED, _timeout(TimeoutType.TIMEOUT_TYPE_HEARTBEAT)
        ),
        _pending("never", 1, P.PENDING_ACTIVITY_STATE_SCHEDULED),
        _pending("cr-run", 1, P.PENDING_ACTIVITY_STATE_CANCEL_REQUESTED, started_s=1_700_000_000),
        _pending("cr-sched", 1, P.PENDING_ACTIVITY_STATE_CANCEL_REQUESTED),
        _pending("done", 1, P.PENDING_ACTIVITY_STATE_STARTED),  # closed in history: not again
        _pending("elsewhere", 1, P.PENDING_ACTIVITY_STATE_STARTED),  # not this history's
    ]
    fold.add_pending(pending)
    fold.add_pending(pending)  # each open activity is added once
    assert fold.open_activities == 0
    facts = fold.facts()
    assert facts.expected_attempts == (
        _att("back", "t-back", 1, "failed:Flake"),
        _att("cr-run", "t-cr-run", 1, ""),
        _att("done", "t-done", 1, "completed"),
        _att("run", "t-run", 1, ""),
        _att("run", "t-run", 2, "timed_out:heartbeat"),
        _att("run", "t-run", 3, ""),
    )
    assert facts.expected_steps == facts.activity_attempts == 6
