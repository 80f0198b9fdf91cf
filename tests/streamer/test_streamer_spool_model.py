"""Model-based test of the spool: append, read, acknowledge, crash (with a torn tail), reopen."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chio_receipts.streamer import Spool, SpoolPosition, SpoolRecord

pytestmark = pytest.mark.unit


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.spool = Spool(self.dir, segment_bytes=400, max_bytes=1 << 20, ack_interval_s=0)
        self.spool.open()
        self.model: list[SpoolRecord] = []  # appended and not acknowledged, in order
        self.cursor: SpoolPosition | None = None
        self.read_ahead: list[SpoolRecord] = []
        self.n = 0

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(count=st.integers(1, 6), size=st.integers(0, 120), fsync=st.booleans())
    def append(self, count: int, size: int, fsync: bool) -> None:
        records = []
        for _ in range(count):
            self.n += 1
            records.append(
                SpoolRecord(topic="t", key=str(self.n).encode(), value=b"x" * size,
                            headers=(("n", str(self.n).encode()),))
            )  # fmt: skip
        self.spool.append(records, fsync=fsync)
        self.model.extend(records)

    @rule(max_records=st.integers(1, 8))
    def read_ahead_then_ack(self, max_records: int) -> None:
        batch = self.spool.read(max_records=max_records, start=self.cursor)
        if batch is None:
            assert len(self.read_ahead) == len(self.model)
            return
        self.read_ahead.extend(batch.records)
        assert self.read_ahead == self.model[: len(self.read_ahead)]
        self.cursor = batch.end

    @precondition(lambda self: self.cursor is not None)
    @rule()
    def ack_read(self) -> None:
        assert self.cursor is not None
        self.spool.ack(self.cursor)
        del self.model[: len(self.read_ahead)]
        self.read_ahead = []
        self.cursor = None

    @rule(torn=st.binary(min_size=1, max_size=30))
    def crash_with_torn_tail_and_reopen(self, torn: bytes) -> None:
        # No close(): the process dies (the kernel drops its lock); a partial record may sit at
        # the tail.
        self.spool._release_lock()
        segments = sorted(self.dir.glob("*.spool"))
        if segments:
            with segments[-1].open("ab") as f:
                f.write(b"\x00\x00\x01\x00" + torn)
        self.spool = Spool(self.dir, segment_bytes=400, max_bytes=1 << 20, ack_interval_s=0)
        self.spool.open()
        self.read_ahead = []
        self.cursor = None

    @rule()
    def everything_unacknowledged_reads_back_in_order(self) -> None:
        got: list[SpoolRecord] = []
        cursor = None
        while (batch := self.spool.read(max_records=7, start=cursor)) is not None:
            got.extend(batch.records)
            cursor = batch.end
        assert got == self.model

    @invariant()
    def depth_matches_the_model(self) -> None:
        assert self.spool.depth == len(self.model)


SpoolMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
test_spool_model = SpoolMachine.TestCase
