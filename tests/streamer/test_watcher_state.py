"""The watcher's progress without Temporal: paging, lag window, dedup set, restart (milliseconds).

The listings come from ``PagedVisibility`` (newest first, keyset-paged, runs that show up late);
the real-server counterparts are in ``test_streamer_watcher``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.streamer._watcher_state import (
    EPOCH,
    Band,
    Checkpoint,
    Progress,
    Scan,
    ScanSummary,
    drain,
)
from tests.support.visibility import Entry, FakeClient, PagedVisibility

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


class _Crash(Exception):
    """The sink refuses a completion (the process goes down with it)."""


class Recorder:
    """Drives one poll over a store, as the watcher does, and records what it sees."""

    def __init__(self, store: PagedVisibility, window: timedelta, *, every: int = 100) -> None:
        self.store = store
        self.window = window
        self.every = every
        self.cp = Checkpoint(watermark=EPOCH, seen={}, fresh=True)
        self.emitted: Counter[str] = Counter()
        self.saves: list[dict[str, Any]] = []
        self.max_state = 0
        self.fail_at: int | None = None

    def state_size(self) -> int:
        scan = self.cp.scan
        return len(self.cp.seen) + (len(scan.ties) if scan is not None else 0)

    async def _emit(self, entry: Entry) -> None:
        if self.fail_at is not None and sum(self.emitted.values()) + 1 == self.fail_at:
            self.fail_at = None
            raise _Crash(entry.run_id)
        self.emitted[entry.run_id] += 1
        self.max_state = max(self.max_state, self.state_size())

    async def _save(self) -> None:
        self.saves.append(json.loads(json.dumps(self.cp.to_json())))
        self.cp.fresh = False

    async def poll(self) -> tuple[int, ScanSummary | None]:
        progress = Progress(self.cp, self.window, checkpoint_every=self.every)
        since, until = progress.begin().bounds()
        return await drain(self.store.list(since, until), progress, self._emit, self._save)

    def restart_from(self, saved: dict[str, Any]) -> None:
        """A new process reads the checkpoint as it was saved."""
        self.cp = Checkpoint.from_json(saved)


def _close_many(store: PagedVisibility, n: int, start: datetime, step: timedelta) -> list[str]:
    ids = [f"r{start.timestamp():.0f}-{i:06d}" for i in range(n)]
    for i, run_id in enumerate(ids):
        store.close(run_id, start + i * step)
    return ids


async def test_many_runs_between_polls_are_paged_and_the_dedup_set_stays_in_the_window() -> None:
    store = PagedVisibility(page_size=50)
    window = timedelta(seconds=1)
    rec = Recorder(store, window)
    first = _close_many(store, 10, T0, 10 * MS)
    assert (await rec.poll())[0] == 10
    # 5,000 runs close before the next poll, 10 ms apart: 100 of them in any one-second window.
    many = _close_many(store, 5_000, T0 + timedelta(seconds=1), 10 * MS)
    pages_before = store.pages_served
    emitted, summary = await rec.poll()
    assert emitted == 5_000
    assert store.pages_served - pages_before == 101  # the 5,000 and the 10 still in the window
    assert set(rec.emitted) == set(first) | set(many)
    assert max(rec.emitted.values()) == 1
    # Never more than the two windows (the previous poll's and this one's) plus the ties.
    assert rec.max_state <= 2 * 101
    assert len(rec.cp.seen) == 101  # closed in [watermark - 1 s, watermark]
    assert summary is not None
    assert summary.ordered
    assert rec.cp.scan is None
    assert (await rec.poll())[0] == 0


async def test_a_late_run_inside_the_window_is_emitted_exactly_once() -> None:
    store = PagedVisibility(page_size=3)
    rec = Recorder(store, timedelta(seconds=30))
    _close_many(store, 10, T0, timedelta(seconds=1))
    store.close("late", T0 + timedelta(seconds=4, milliseconds=500), visible=False)
    assert (await rec.poll())[0] == 10
    store.show("late")
    _close_many(store, 3, T0 + timedelta(seconds=20), timedelta(seconds=1))
    emitted, summary = await rec.poll()
    assert emitted == 4
    assert summary is not None
    assert summary.late == 1
    assert rec.emitted["late"] == 1
    assert (await rec.poll())[0] == 0
    assert max(rec.emitted.values()) == 1


async def test_a_run_later_than_the_window_is_not_emitted_and_its_band_counts_it() -> None:
    store = PagedVisibility(page_size=4)
    rec = Recorder(store, timedelta(seconds=2))
    _close_many(store, 10, T0, timedelta(seconds=1))
    store.close("lost", T0 + timedelta(seconds=3, milliseconds=500), visible=False)
    assert (await rec.poll())[0] == 10
    band = rec.cp.band
    # The span [epoch, watermark - 2 s) left the window, with 7 runs emitted in it.
    assert band == Band(since=EPOCH, until=T0 + timedelta(seconds=7), emitted=7)
    store.show("lost")
    assert (await rec.poll())[0] == 0
    assert "lost" not in rec.emitted
    assert len(store.matching(band.since, band.until)) == band.emitted + 1


@pytest.mark.parametrize("fail_at", [1, 37, 100, 101, 250, 299, 300])
async def test_a_failed_emission_resumes_at_the_cursor_without_loss_or_duplicate(
    fail_at: int,
) -> None:
    store = PagedVisibility(page_size=25)
    rec = Recorder(store, timedelta(milliseconds=500), every=50)
    ids = _close_many(store, 300, T0, 10 * MS)
    rec.fail_at = fail_at
    with pytest.raises(_Crash):
        await rec.poll()
    # The last save is the one after the failure; a new process starts from it.
    resumed = rec.saves[-1]
    assert resumed["scan"] is not None
    rec.restart_from(resumed)
    since, until = Scan(
        since=datetime.fromisoformat(resumed["scan"]["since"]),
        cursor=datetime.fromisoformat(resumed["scan"]["cursor"]),
    ).bounds()
    assert until is not None
    assert until > since
    _emitted, summary = await rec.poll()
    assert summary is not None
    assert set(rec.emitted) == set(ids)
    assert max(rec.emitted.values()) == 1
    assert rec.max_state <= 2 * 51


async def test_a_hard_crash_re_emits_at_most_the_runs_since_the_last_save() -> None:
    store = PagedVisibility(page_size=25)
    rec = Recorder(store, timedelta(milliseconds=500), every=50)
    ids = _close_many(store, 300, T0, 10 * MS)
    rec.fail_at = 180
    with pytest.raises(_Crash):
        await rec.poll()
    # Killed instead: the save after the failure never happened.
    rec.restart_from(rec.saves[-2])
    await rec.poll()
    assert set(rec.emitted) == set(ids)
    again = [r for r, n in rec.emitted.items() if n > 1]
    assert 0 < len(again) < 50


async def test_runs_closing_at_the_same_instant_survive_a_restart_between_them() -> None:
    store = PagedVisibility(page_size=2)
    rec = Recorder(store, timedelta(0), every=1)
    for i in range(6):
        store.close(f"tie-{i}", T0)
    store.close("newest", T0 + timedelta(seconds=1))
    rec.fail_at = 4
    with pytest.raises(_Crash):
        await rec.poll()
    saved = rec.saves[-1]["scan"]
    assert saved["cursor"] == T0.isoformat()
    assert len(saved["ties"]) == 2
    rec.restart_from(rec.saves[-1])
    await rec.poll()
    assert sorted(rec.emitted) == sorted([*(f"tie-{i}" for i in range(6)), "newest"])
    assert max(rec.emitted.values()) == 1


async def test_a_listing_out_of_order_falls_back_to_keeping_every_id() -> None:
    rec = Recorder(PagedVisibility(), timedelta(seconds=1))
    entries = [Entry(f"a{i}", T0 + i * timedelta(seconds=10)) for i in range(5)]

    async def oldest_first() -> Any:
        for e in entries:
            yield e

    progress = Progress(rec.cp, rec.window, checkpoint_every=100)
    progress.begin()
    emitted, summary = await drain(oldest_first(), progress, rec._emit, rec._save)
    assert emitted == 5
    assert summary is not None
    assert not summary.ordered
    assert set(rec.cp.seen) == {"a4"}  # pruned to the window once the scan ended


def test_window_arithmetic_and_bounds() -> None:
    window = timedelta(seconds=30)
    assert Checkpoint(watermark=EPOCH, seen={}).floor(window) == EPOCH
    cp = Checkpoint(watermark=T0, seen={}, fresh=True)
    assert cp.floor(window) == T0 - window
    progress = Progress(cp, window, checkpoint_every=10)
    scan = progress.begin()
    assert scan.since == T0 - window
    assert scan.start_watermark is None  # first start: nothing is late
    assert scan.bounds() == (T0 - window, None)
    assert progress.admit("a", T0 + timedelta(seconds=5))
    assert scan.bounds() == (T0 - window, T0 + timedelta(seconds=5, microseconds=1))
    progress.record("a", T0 + timedelta(seconds=5))
    assert cp.watermark == T0 + timedelta(seconds=5)
    assert not progress.admit("a", T0 + timedelta(seconds=5))
    assert progress.begin() is scan  # a scan in progress is resumed, not restarted


def test_due_grows_with_the_dedup_set() -> None:
    cp = Checkpoint(watermark=T0, seen={f"s{i}": T0 for i in range(5_000)})
    progress = Progress(cp, timedelta(hours=1), checkpoint_every=100)
    progress.begin()
    for i in range(499):
        progress.admit(f"n{i}", T0)
        progress.record(f"n{i}", T0)
    assert not progress.due()  # a save writes 5,499 ids: not before a tenth of that is new
    for i in range(499, 560):
        progress.admit(f"n{i}", T0)
        progress.record(f"n{i}", T0)
    assert progress.due()


def test_checkpoint_round_trip_with_scan_and_band_and_the_old_format(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    cp = Checkpoint(
        watermark=T0,
        seen={"x": T0},
        scan=Scan(
            since=T0 - timedelta(seconds=30),
            cursor=T0 - MS,
            ties={"t"},
            below=3,
            late=1,
            start_watermark=T0,
        ),
        band=Band(since=EPOCH, until=T0 - timedelta(seconds=30), emitted=9),
    )
    cp.save(path)
    again = Checkpoint.load(path, EPOCH)
    assert (again.watermark, again.seen, again.scan, again.band) == (
        cp.watermark,
        cp.seen,
        cp.scan,
        cp.band,
    )
    assert not again.fresh
    old = {"watermark": T0.isoformat(), "seen": {"y": T0.isoformat()}}
    path.write_text(json.dumps(old))
    legacy = Checkpoint.load(path, EPOCH)
    assert legacy.scan is None
    assert legacy.band is None
    assert legacy.seen == {"y": T0}
    path.write_text(json.dumps({"watermark": T0.isoformat(), "seen": {}, "scan": {"since": 1}}))
    with pytest.raises(streamer.WatcherError):
        Checkpoint.load(path, EPOCH)
    assert Checkpoint.load(tmp_path / "none.json", T0).fresh


class _ListSink:
    def __init__(self, watcher: list[streamer.CompletionWatcher]) -> None:
        self.events: list[schemas.RunCompletion] = []
        self.watcher = watcher
        self.max_seen = 0

    async def publish_step(self, receipt: schemas.StepReceipt, body: bytes) -> None:
        raise AssertionError("the watcher publishes completions only")

    async def publish_completion(self, event: schemas.RunCompletion) -> None:
        self.events.append(event)
        cp = self.watcher[0].checkpoint
        assert cp is not None
        self.max_seen = max(self.max_seen, len(cp.seen))

    async def publish_envelope(self, envelope: Any) -> None:
        raise AssertionError("the watcher publishes completions only")


def _watcher(
    store: PagedVisibility, tmp_path: Path, window_s: float, page_size: int
) -> tuple[streamer.CompletionWatcher, _ListSink, FakeClient]:
    client = FakeClient(store)
    holder: list[streamer.CompletionWatcher] = []
    sink = _ListSink(holder)
    watcher = streamer.CompletionWatcher(
        client,  # type: ignore[arg-type]
        sink,
        streamer.WatcherConfig(
            checkpoint_path=str(tmp_path / "w.json"),
            lag_window_s=window_s,
            page_size=page_size,
            start_from=T0 - timedelta(minutes=1),
        ),
    )
    holder.append(watcher)
    return watcher, sink, client


async def test_the_watcher_streams_pages_and_keeps_its_dedup_set_bounded(tmp_path: Path) -> None:
    store = PagedVisibility()
    _close_many(store, 3_000, T0, 10 * MS)
    watcher, sink, client = _watcher(store, tmp_path, window_s=1.0, page_size=200)
    assert await watcher.poll_once() == 3_000
    assert store.pages_served == 15
    assert len({e.run_id for e in sink.events}) == 3_000
    assert sink.max_seen <= 101
    assert [e.closed_at for e in sink.events] == sorted(
        (e.closed_at for e in sink.events), reverse=True
    )
    saved = json.loads((tmp_path / "w.json").read_text())
    assert len(saved["seen"]) == 101
    assert saved["scan"] is None
    assert client.queries[0].startswith('ExecutionStatus != "Running" AND CloseTime >= "')


async def test_the_watcher_warns_with_the_count_of_runs_later_than_its_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PagedVisibility()
    _close_many(store, 10, T0, timedelta(seconds=1))
    store.close("lost-1", T0 + timedelta(seconds=2, milliseconds=1), visible=False)
    store.close("lost-2", T0 + timedelta(seconds=2, milliseconds=2), visible=False)
    store.close("late", T0 + timedelta(seconds=8, milliseconds=1), visible=False)
    watcher, sink, _ = _watcher(store, tmp_path, window_s=3.0, page_size=4)
    assert await watcher.poll_once() == 10
    for run_id in ("lost-1", "lost-2", "late"):
        store.show(run_id)
    with caplog.at_level(logging.INFO, logger="chio_receipts.streamer._watcher"):
        assert await watcher.poll_once() == 1
    assert [e.run_id for e in sink.events].count("late") == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith("watcher: 2 run(s) that closed between")
    assert "3s lag window" in warnings[0].getMessage()
    assert any("1 run(s) became visible late" in r.getMessage() for r in caplog.records)
    assert watcher.checkpoint is not None
    assert watcher.checkpoint.band is None
