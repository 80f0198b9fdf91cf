"""The completion watcher's progress: checkpoint, lag window, dedup set (pure: no Temporal).

Temporal's visibility API lists closed runs newest first (``CloseTime`` descending, on SQL and on
Elasticsearch visibility alike; neither the dev server's SQLite nor other SQL stores accept an
``ORDER BY``). A poll therefore walks down from the newest close time to its floor, and its
progress is a *cursor*: every listed run that closed after the cursor has been handled. The
watcher never holds the listing; it handles one page at a time and remembers only:

- ``watermark``: the newest close time it has emitted;
- ``seen``: the ids of the runs it emitted that closed inside the lag window
  (``CloseTime >= watermark - window``), the only ones a later poll can list again;
- ``scan``: an unfinished poll (``since``, ``cursor``, the ids emitted at the cursor's close time),
  so that a restart goes on from the cursor instead of listing the window's floor again.

So memory is bounded by the runs that close inside one lag window (twice that while a poll
replaces one window by the next), however many runs close between two polls.

Visibility lag: the visibility store can show a closed run late, after runs that closed later.
Every poll lists ``CloseTime >= watermark - window`` again; a late run inside the window is
emitted then, once (``seen`` drops the others). A run that becomes visible only after its close
time has left the window is never listed again and is not emitted. The watcher notices some of
them: when a span of close times leaves the window it records how many runs it emitted there
(:class:`Band`), and the next poll counts the closed runs of that span on the server; more runs
than emitted means that many were lost to the lag, which the watcher logs as a warning. Runs that
appear later still, or fewer than were deleted by retention meanwhile, go unnoticed.

If the server ever listed out of order (a run newer than the cursor after it), the scan falls back
to keeping every id it emits until it ends: correct, no longer bounded, and a restart may emit a
run twice (with the same event id, which downstream drops).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from chio_receipts.streamer._errors import WatcherError

__all__ = [
    "EPOCH",
    "Band",
    "Checkpoint",
    "Progress",
    "Scan",
    "ScanSummary",
    "VisibleRun",
    "drain",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


class VisibleRun(Protocol):
    """What the progress needs of a visibility entry (``temporalio.client.WorkflowExecution``)."""

    @property
    def run_id(self) -> str:
        """The run's id."""

    @property
    def close_time(self) -> datetime | None:
        """When the run closed (``None`` while it runs)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Band:
    """A span of close times ``[since, until)`` that left the lag window, and how many runs the
    watcher emitted in it; the next poll compares that with the server's count."""

    since: datetime
    until: datetime
    emitted: int


@dataclass(slots=True, kw_only=True)
class Scan:
    """One poll's listing, newest first: runs closed in ``[since, cursor]`` are still to do.

    ``ties`` are the ids emitted at exactly the cursor's close time but below the window (the
    window's own ids are in ``Checkpoint.seen``). ``below`` counts the runs emitted below the
    window (for the :class:`Band`), ``late`` those that closed before ``start_watermark``.
    """

    since: datetime
    cursor: datetime | None = None
    ordered: bool = True
    ties: set[str] = field(default_factory=set)
    below: int = 0
    late: int = 0
    start_watermark: datetime | None = None

    def bounds(self) -> tuple[datetime, datetime | None]:
        """``[since, until)`` of the close times still to list (``until`` None: no upper bound).

        ``until`` is one microsecond past the cursor: the server may keep finer close times
        than the microseconds a ``datetime`` holds, and the runs at the cursor must be listed
        again (``ties`` and ``seen`` drop those already emitted).
        """
        if self.ordered and self.cursor is not None:
            return self.since, self.cursor + _MICRO
        return self.since, None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanSummary:
    """What one finished scan found worth saying."""

    late: int
    ordered: bool
    band: Band | None


@dataclass(slots=True)
class Checkpoint:
    """The watcher's persisted state: watermark, dedup set, unfinished scan, band to check.

    ``fresh`` is true when nothing was loaded (first start): no run is called late then.
    """

    watermark: datetime
    seen: dict[str, datetime]
    scan: Scan | None = None
    band: Band | None = None
    fresh: bool = False

    @classmethod
    def load(cls, path: Path, default: datetime) -> Checkpoint:
        """Read ``path``; a missing file starts at ``default``."""
        try:
            raw = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return cls(watermark=default, seen={}, fresh=True)
        except (OSError, ValueError) as exc:
            raise WatcherError(f"unreadable watcher checkpoint {path}: {exc}") from exc
        try:
            return cls.from_json(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WatcherError(f"malformed watcher checkpoint {path}: {exc}") from exc

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Checkpoint:
        """The checkpoint of a decoded JSON object (files without ``scan``/``band`` load too)."""
        ts = datetime.fromisoformat
        scan = raw.get("scan")
        band = raw.get("band")
        return cls(
            watermark=ts(raw["watermark"]),
            seen={k: ts(v) for k, v in raw["seen"].items()},
            scan=None
            if scan is None
            else Scan(
                since=ts(scan["since"]),
                cursor=None if scan["cursor"] is None else ts(scan["cursor"]),
                ordered=bool(scan["ordered"]),
                ties=set(scan["ties"]),
                below=int(scan["below"]),
                late=int(scan["late"]),
                start_watermark=None
                if scan["start_watermark"] is None
                else ts(scan["start_watermark"]),
            ),
            band=None
            if band is None
            else Band(
                since=ts(band["since"]), until=ts(band["until"]), emitted=int(band["emitted"])
            ),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready object (ids sorted, so equal states write equal files)."""
        scan = self.scan
        band = self.band
        return {
            "watermark": self.watermark.isoformat(),
            "seen": {k: v.isoformat() for k, v in sorted(self.seen.items())},
            "scan": None
            if scan is None
            else {
                "since": scan.since.isoformat(),
                "cursor": None if scan.cursor is None else scan.cursor.isoformat(),
                "ordered": scan.ordered,
                "ties": sorted(scan.ties),
                "below": scan.below,
                "late": scan.late,
                "start_watermark": None
                if scan.start_watermark is None
                else scan.start_watermark.isoformat(),
            },
            "band": None
            if band is None
            else {
                "since": band.since.isoformat(),
                "until": band.until.isoformat(),
                "emitted": band.emitted,
            },
        }

    def save(self, path: Path) -> None:
        """Atomically replace ``path`` with this checkpoint (temp file, fsync, rename)."""
        data = json.dumps(self.to_json())
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
        self.fresh = False

    def floor(self, window: timedelta) -> datetime:
        """The lowest close time a poll lists: ``watermark - window`` (never before the epoch)."""
        return max(self.watermark - window, EPOCH)

    def prune(self, window: timedelta) -> None:
        """Forget run ids that closed before the lag window (no scan may be in progress)."""
        floor = self.floor(window)
        self.seen = {k: v for k, v in self.seen.items() if v >= floor}


class Progress:
    """Decides, entry by entry of a newest-first listing, what to emit and what to remember.

    ``begin`` starts a scan (or resumes the checkpoint's unfinished one); ``admit`` says whether
    a listed run is new; ``record`` notes a run handed to the sink; ``due`` says when to save;
    ``finish`` closes the scan and prunes the dedup set to the window.
    """

    def __init__(self, checkpoint: Checkpoint, window: timedelta, *, checkpoint_every: int) -> None:
        self.checkpoint = checkpoint
        self.window = window
        self.checkpoint_every = max(1, checkpoint_every)
        self._unsaved = 0

    @property
    def scan(self) -> Scan:
        """The scan in progress (``begin`` first)."""
        scan = self.checkpoint.scan
        if scan is None:
            raise WatcherError("no watcher scan in progress")
        return scan

    def begin(self) -> Scan:
        """The checkpoint's unfinished scan, or a new one from the window's floor."""
        cp = self.checkpoint
        if cp.scan is None:
            cp.scan = Scan(
                since=cp.floor(self.window),
                start_watermark=None if cp.fresh else cp.watermark,
            )
        return cp.scan

    def admit(self, run_id: str, close_time: datetime) -> bool:
        """Move the cursor to this listed run; true when it has not been emitted yet."""
        scan = self.scan
        if scan.ordered:
            if scan.cursor is None or close_time < scan.cursor:
                scan.cursor = close_time
                scan.ties.clear()
            elif close_time > scan.cursor:
                # Not newest first after all: no cursor to resume from, keep every id.
                scan.ordered = False
                scan.cursor = None
                scan.ties.clear()
        return run_id not in self.checkpoint.seen and run_id not in scan.ties

    def record(self, run_id: str, close_time: datetime) -> None:
        """Note that the run was handed to the sink."""
        cp = self.checkpoint
        scan = self.scan
        if scan.start_watermark is not None and close_time < scan.start_watermark:
            scan.late += 1
        cp.watermark = max(cp.watermark, close_time)
        if not scan.ordered or close_time >= cp.floor(self.window):
            cp.seen[run_id] = close_time
        else:
            # Below the window: only a resumed scan could list it again, and only at the cursor.
            scan.ties.add(run_id)
            scan.below += 1
        self._unsaved += 1

    def due(self) -> bool:
        """Time to save: every ``checkpoint_every`` runs, or every tenth of the dedup set when
        that is larger (a save writes the whole set; this keeps its cost per run constant)."""
        return self._unsaved >= max(self.checkpoint_every, len(self.checkpoint.seen) // 10)

    def compact(self) -> None:
        """Drop ids below the window that the rest of the scan cannot list again (above the
        cursor), and reset the save counter; call before saving."""
        cp = self.checkpoint
        scan = cp.scan
        self._unsaved = 0
        if scan is None or not scan.ordered or scan.cursor is None:
            return
        floor = cp.floor(self.window)
        cursor = scan.cursor
        cp.seen = {k: v for k, v in cp.seen.items() if v >= floor or v <= cursor}

    def finish(self) -> ScanSummary:
        """End the scan: prune the dedup set to the window, record the band that left it."""
        cp = self.checkpoint
        scan = self.scan
        floor = cp.floor(self.window)
        band = None
        if floor > scan.since:
            left = sum(1 for v in cp.seen.values() if scan.since <= v < floor)
            band = Band(since=scan.since, until=floor, emitted=scan.below + left)
        cp.seen = {k: v for k, v in cp.seen.items() if v >= floor}
        cp.scan = None
        if band is not None:
            cp.band = band
        self._unsaved = 0
        return ScanSummary(late=scan.late, ordered=scan.ordered, band=band)


R = TypeVar("R", bound=VisibleRun)


async def drain(
    entries: AsyncIterable[R],
    progress: Progress,
    emit: Callable[[R], Awaitable[None]],
    save: Callable[[], Awaitable[None]],
) -> tuple[int, ScanSummary | None]:
    """Emit every new run of a listing (``progress.begin()`` first), saving as it goes.

    A run is recorded only after ``emit`` returned, so a failure part-way (raised) leaves the
    scan's cursor at the failed run; the checkpoint is saved then too, and the next attempt
    resumes from there. Returns how many runs were emitted and, when the listing ended, the
    finished scan's summary.
    """
    emitted = 0
    summary = None
    try:
        async for entry in entries:
            close = entry.close_time
            if close is None or not progress.admit(entry.run_id, close):
                continue
            await emit(entry)
            progress.record(entry.run_id, close)
            emitted += 1
            if progress.due():
                progress.compact()
                await save()
        summary = progress.finish()
    finally:
        progress.compact()
        await save()
    return emitted, summary
