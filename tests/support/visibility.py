"""A visibility store in memory, for the completion watcher's paging and lag-window tests.

It lists closed runs the way Temporal's SQL visibility does: newest first (``CloseTime``
descending, then run id), one page of ``page_size`` at a time, each page continuing after the
last key of the one before (so runs closing meanwhile never shift a page). A run can be closed
hidden and shown later: that is visibility lag. ``FakeClient`` puts it behind the three calls of
``temporalio.client.Client`` the watcher makes.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from temporalio.api.enums.v1 import WorkflowExecutionStatus
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.workflow.v1 import WorkflowExecutionInfo
from temporalio.client import WorkflowExecution, WorkflowExecutionCount, WorkflowHistory
from temporalio.converter import DataConverter


@dataclass(slots=True)
class Entry:
    """One closed run as visibility lists it."""

    run_id: str
    close_time: datetime | None
    workflow_id: str = ""
    visible: bool = True


class PagedVisibility:
    """Closed runs, listed newest first and keyset-paged; counts the pages it served."""

    def __init__(self, page_size: int = 50) -> None:
        self.page_size = page_size
        self.runs: dict[str, Entry] = {}
        self.pages_served = 0

    def close(self, run_id: str, close_time: datetime, *, visible: bool = True) -> Entry:
        """A run closes at ``close_time``; invisible until :meth:`show` when not ``visible``."""
        entry = Entry(run_id, close_time, workflow_id=f"wf-{run_id}", visible=visible)
        self.runs[run_id] = entry
        return entry

    def show(self, run_id: str) -> None:
        """The lagging run becomes visible."""
        self.runs[run_id].visible = True

    def matching(self, since: datetime, until: datetime | None = None) -> list[Entry]:
        """Visible runs closed in ``[since, until)``, newest first."""
        found = [
            e
            for e in self.runs.values()
            if e.visible
            and e.close_time is not None
            and e.close_time >= since
            and (until is None or e.close_time < until)
        ]
        found.sort(key=_key, reverse=True)
        return found

    async def list(
        self, since: datetime, until: datetime | None = None, *, page_size: int | None = None
    ) -> AsyncIterator[Entry]:
        """The listing, one page at a time (each page read from the store when it is asked for)."""
        size = page_size or self.page_size
        after: tuple[datetime, str] | None = None
        while True:
            page = [e for e in self.matching(since, until) if after is None or _key(e) < after]
            page = page[:size]
            if not page:
                return
            self.pages_served += 1
            for entry in page:
                yield entry
            if len(page) < size:
                return
            after = _key(page[-1])


def _key(e: Entry) -> tuple[datetime, str]:
    assert e.close_time is not None
    return (e.close_time, e.run_id)


_SINCE = re.compile(r'CloseTime >= "([^"]+)"')
_UNTIL = re.compile(r'CloseTime < "([^"]+)"')


def _bounds(query: str) -> tuple[datetime, datetime | None]:
    since = _SINCE.search(query)
    until = _UNTIL.search(query)
    assert since is not None, query
    return (
        datetime.fromisoformat(since.group(1)),
        None if until is None else datetime.fromisoformat(until.group(1)),
    )


def execution(entry: Entry, namespace: str = "default") -> WorkflowExecution:
    """The ``WorkflowExecution`` the real client would build from this entry's visibility row."""
    assert entry.close_time is not None
    info = WorkflowExecutionInfo(status=WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_COMPLETED)
    info.execution.workflow_id = entry.workflow_id
    info.execution.run_id = entry.run_id
    info.type.name = "Fake"
    info.task_queue = "fake"
    start = Timestamp()
    start.FromDatetime(entry.close_time - timedelta(seconds=1))
    info.start_time.CopyFrom(start)
    close = Timestamp()
    close.FromDatetime(entry.close_time)
    info.close_time.CopyFrom(close)
    return WorkflowExecution._from_raw_info(info, namespace, DataConverter.default)


class _Handle:
    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id

    async def fetch_history(self, **_: Any) -> WorkflowHistory:
        return WorkflowHistory(self.workflow_id, [])

    async def fetch_history_events(self, **_: Any) -> AsyncIterator[HistoryEvent]:
        events: tuple[HistoryEvent, ...] = ()  # an empty history
        for ev in events:
            yield ev


class FakeClient:
    """``list_workflows``, ``count_workflows`` and ``get_workflow_handle`` over a
    :class:`PagedVisibility` (query bounds parsed from the watcher's query)."""

    namespace = "default"

    def __init__(self, store: PagedVisibility) -> None:
        self.store = store
        self.queries: list[str] = []

    async def list_workflows(
        self, query: str, *, page_size: int = 1000, **_: Any
    ) -> AsyncIterator[WorkflowExecution]:
        self.queries.append(query)
        since, until = _bounds(query)
        async for entry in self.store.list(since, until, page_size=page_size):
            yield execution(entry)

    async def count_workflows(self, query: str, **_: Any) -> WorkflowExecutionCount:
        self.queries.append(query)
        since, until = _bounds(query)
        return WorkflowExecutionCount(len(self.store.matching(since, until)), [])

    def get_workflow_handle(self, workflow_id: str, **_: Any) -> _Handle:
        return _Handle(workflow_id)
