"""A model-based test of the spool: append, crash anywhere, reopen, drain; nothing lost or added.

The model is the list of records appended (and not lost with a torn tail) and how many of them
were acknowledged. The ack position is persisted lazily, so after a crash the spool may hand
back records acknowledged shortly before it (duplicates, never loss): what it holds must be a
suffix of the log that contains every unacknowledged record. Crashes are simulated
two ways: in process (the spool object is abandoned without ``close`` and the newest segment is
cut at a random byte inside the last append, which is what a ``kill -9`` or power loss during a
``write`` leaves), and with a real child process killed with SIGKILL while appending.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from chio_receipts.streamer import Spool, SpoolError, SpoolFull, SpoolRecord

pytestmark = pytest.mark.unit

_records = st.builds(
    SpoolRecord,
    topic=st.sampled_from(["steps", "runs", "t" * 40]),
    key=st.binary(max_size=24),
    value=st.binary(min_size=0, max_size=120),
    headers=st.lists(
        st.tuples(st.sampled_from(["ce_id", "ce_type", "x"]), st.binary(max_size=12)), max_size=3
    ).map(tuple),
)


def _segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".spool"))


def _abandon(spool: Spool) -> None:
    """Drop a spool as a crash would: no fsync, no close, no ack persisted (only what the
    kernel releases for a dead process is released: the descriptor and the owner lock)."""
    fd = spool._fd
    if fd is not None:
        os.close(fd)
        spool._fd = None
    spool._release_lock()


def _contents(spool: Spool) -> list[SpoolRecord]:
    """Every unacknowledged record, read without acknowledging."""
    out: list[SpoolRecord] = []
    start = None
    while (batch := spool.read(max_records=7, start=start)) is not None:
        out.extend(batch.records)
        start = batch.end
    return out


class SpoolModel(RuleBasedStateMachine):
    """Random appends, reads, acks, crashes and reopens against a list model."""

    def __init__(self) -> None:
        super().__init__()
        self.directory: Path | None = None
        self.spool: Spool | None = None
        self.log: list[SpoolRecord] = []
        self.acked = 0
        self.max_bytes = 6000

    @property
    def model(self) -> list[SpoolRecord]:
        """Records appended and not acknowledged, in order."""
        return self.log[self.acked :]

    def _recovered(self) -> None:
        """After a crash: the spool holds a suffix of the log covering every unacked record."""
        assert self.spool is not None
        held = _contents(self.spool)
        k = len(self.log) - len(held)
        assert 0 <= k <= self.acked, (
            f"{len(held)} records recovered, {len(self.model)} were unacknowledged: lost some"
        )
        assert held == self.log[k:], "recovered records are not the tail of what was appended"
        self.acked = k

    @initialize(segment_bytes=st.sampled_from([150, 400, 4096]))
    def open_spool(self, segment_bytes: int) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.segment_bytes = segment_bytes
        self.spool = self._open()

    def _open(self) -> Spool:
        assert self.directory is not None
        spool = Spool(self.directory, max_bytes=self.max_bytes, segment_bytes=self.segment_bytes)
        spool.open()
        return spool

    @rule(records=st.lists(_records, min_size=1, max_size=6), fsync=st.booleans())
    def append(self, records: list[SpoolRecord], fsync: bool) -> None:
        assert self.spool is not None
        try:
            self.spool.append(records, fsync=fsync)
        except SpoolFull:
            total = sum(len(r.encode()) for r in records)
            assert self.spool.size_bytes + total > self.max_bytes
            return
        self.log.extend(records)

    @rule(records=st.lists(_records, min_size=1, max_size=6), data=st.data())
    def crash_during_append(self, records: list[SpoolRecord], data: st.DataObject) -> None:
        """The process dies inside ``append``: a random prefix of its bytes reached the file."""
        assert self.spool is not None
        assert self.directory is not None
        before = {p.name: p.stat().st_size for p in _segments(self.directory)}
        try:
            self.spool.append(records, fsync=False)
        except SpoolFull:
            return
        last = _segments(self.directory)[-1]
        start = before.get(last.name, 0)
        end = last.stat().st_size
        cut = data.draw(st.integers(start, end), label="cut")
        _abandon(self.spool)
        os.truncate(last, cut)
        # Records wholly written before the cut survive (a prefix of this append), no others.
        kept, pos = [], start
        for r in records:
            pos += len(r.encode())
            if pos <= cut:
                kept.append(r)
        # The torn append is the newest data: everything before it behaves as after a crash.
        self.spool = self._open()
        self.log.extend(kept)
        self._recovered()

    @rule()
    def crash_and_reopen(self) -> None:
        assert self.spool is not None
        _abandon(self.spool)
        self.spool = self._open()
        self._recovered()

    @rule()
    def close_and_reopen(self) -> None:
        assert self.spool is not None
        self.spool.close()
        self.spool = self._open()

    @precondition(lambda self: bool(self.model))
    @rule(n=st.integers(1, 8), acknowledge=st.booleans())
    def read(self, n: int, acknowledge: bool) -> None:
        assert self.spool is not None
        batch = self.spool.read(max_records=n)
        assert batch is not None, f"{len(self.model)} records appended, read returned nothing"
        got = list(batch.records)
        assert 1 <= len(got) <= n
        assert got == self.model[: len(got)], "read returned records out of append order"
        if acknowledge:
            self.spool.ack(batch.end)
            self.acked += len(got)

    @rule(data=st.data())
    def disk_full_mid_write(self, data: st.DataObject) -> None:
        """``write`` stores some bytes then fails with ENOSPC: nothing of the append remains."""
        assert self.spool is not None
        records = data.draw(st.lists(_records, min_size=1, max_size=3), label="records")
        real_write = os.write
        calls = {"n": 0}

        def failing_write(fd: int, blob: bytes | memoryview) -> int:
            calls["n"] += 1
            if calls["n"] == 1 and len(blob) > 1:
                return real_write(fd, bytes(blob)[: len(blob) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        os.write = failing_write  # type: ignore[assignment]
        try:
            with pytest.raises(SpoolError):
                self.spool.append(records, fsync=True)
        finally:
            os.write = real_write

    @invariant()
    def depth_matches_the_model(self) -> None:
        if self.spool is not None:
            assert self.spool.depth == len(self.model)

    def teardown(self) -> None:
        if self.spool is None or self.directory is None:
            return
        # Crash once more, then drain everything: the unacknowledged records, in order, after
        # at most the recently acknowledged ones again.
        _abandon(self.spool)
        self.spool = spool = self._open()
        self._recovered()
        drained: list[SpoolRecord] = []
        while (batch := spool.read(max_records=7)) is not None:
            drained.extend(batch.records)
            spool.ack(batch.end)
        assert drained == self.model
        assert spool.depth == 0
        spool.close()
        reopened = self._open()
        assert reopened.read() is None, "acknowledged records came back after a reopen"
        reopened.close()
        shutil.rmtree(self.directory, ignore_errors=True)


TestSpoolModel = SpoolModel.TestCase
TestSpoolModel.settings = settings(
    max_examples=int(os.environ.get("CHIO_SPOOL_MODEL_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


_CHILD = textwrap.dedent(
    """
    import sys
    from chio_receipts.streamer import Spool, SpoolRecord
    spool = Spool(sys.argv[1], segment_bytes=2048, max_bytes=1 << 30)
    spool.open()
    i = 0
    while True:
        batch = [SpoolRecord(topic="steps", key=b"k", value=f"{i + j}".encode() * 7)
                 for j in range(3)]
        spool.append(batch, fsync=(i % 2 == 0))
        i += 3
        sys.stdout.write(f"{i}\\n")
        sys.stdout.flush()
    """
)


def test_a_spool_appender_killed_with_sigkill_keeps_every_returned_append(tmp_path: Path) -> None:
    """A real process appending in a loop is killed at a random moment, five times over."""
    directory = tmp_path / "spool"
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    acknowledged = 0
    for round_ in range(5):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(directory)],
            stdout=subprocess.PIPE,
            env=env,
            cwd=root,
        )
        assert child.stdout is not None
        # Let it append for a while (its first line proves it started).
        first = child.stdout.readline()
        assert first, "the appender did not start"
        time.sleep(0.05 + 0.07 * round_)
        child.send_signal(signal.SIGKILL)
        out = first + child.stdout.read()
        child.wait(10)
        lines = out.decode().split()
        returned = int(lines[-1]) if lines else 0
        spool = Spool(directory, segment_bytes=2048)
        spool.open()
        values: list[bytes] = []
        while (batch := spool.read(max_records=500)) is not None:
            values.extend(r.value for r in batch.records)
            spool.ack(batch.end)
        spool.close()
        expected_prefix = [f"{i}".encode() * 7 for i in range(returned)]
        pairs = enumerate(zip(values, expected_prefix, strict=False))
        first_diff = next((i for i, (a, b) in pairs if a != b), None)
        assert values[:returned] == expected_prefix, (
            f"round {round_}: {returned} records were appended before the kill, "
            f"{len(values)} recovered; first difference at {first_diff}"
        )
        # Anything after them is a torn-but-complete tail of the append in flight, never junk.
        extra = values[returned:]
        assert extra == [f"{i}".encode() * 7 for i in range(returned, returned + len(extra))]
        assert len(extra) <= 3
        acknowledged += len(values)
    assert acknowledged > 0
