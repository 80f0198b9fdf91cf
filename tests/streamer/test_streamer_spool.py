"""The spool: framing, recovery of torn tails, capacity, acknowledgement, and kill -9 safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chio_receipts.streamer import AsyncSpool, Spool, SpoolFull, SpoolRecord

pytestmark = pytest.mark.unit


def _rec(i: int, size: int = 40) -> SpoolRecord:
    return SpoolRecord(
        topic="chio.receipts.steps.v1",
        key=f"default/wf-{i % 7}/run".encode(),
        value=bytes([i % 256]) * size,
        headers=(("ce_id", f"id-{i}".encode()), ("content-type", b"application/avro")),
    )


def _drain(spool: Spool) -> list[SpoolRecord]:
    out: list[SpoolRecord] = []
    while (batch := spool.read(max_records=5)) is not None:
        out.extend(batch.records)
        spool.ack(batch.end)
    return out


@settings(max_examples=100, deadline=None)
@given(
    st.builds(
        SpoolRecord,
        topic=st.text(max_size=30),
        key=st.binary(max_size=50),
        value=st.binary(max_size=300),
        headers=st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=20)), max_size=4).map(
            tuple
        ),
    )
)
def test_record_framing_round_trips(record: SpoolRecord) -> None:
    framed = record.encode()
    assert SpoolRecord.decode_payload(framed[8:]) == record


def test_append_read_ack_in_order_and_segments_are_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=1000) as spool:
        records = [_rec(i) for i in range(60)]
        for i in range(0, 60, 6):
            spool.append(records[i : i + 6], fsync=False)
        assert spool.depth == 60
        assert len(list(tmp_path.glob("*.spool"))) > 2
        assert _drain(spool) == records
        assert spool.depth == 0
        assert list(tmp_path.glob("*.spool")) == []
        spool.append([_rec(99)], fsync=True)
        assert spool.read() is not None
    with Spool(tmp_path) as spool:
        assert _drain(spool) == [_rec(99)]


def test_ack_position_survives_reopen(tmp_path: Path) -> None:
    records = [_rec(i) for i in range(10)]
    with Spool(tmp_path) as spool:
        spool.append(records, fsync=True)
        batch = spool.read(max_records=4)
        assert batch is not None
        spool.ack(batch.end)
    with Spool(tmp_path) as spool:
        assert spool.depth == 6
        assert _drain(spool) == records[4:]


def test_torn_tail_is_truncated_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [_rec(i) for i in range(5)]
    with Spool(tmp_path) as spool:
        spool.append(records, fsync=True)
    seg = next(tmp_path.glob("*.spool"))
    whole = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(_rec(5).encode()[:-3])  # a crash in the middle of a write
    with Spool(tmp_path) as spool:
        assert spool.depth == 5
        assert seg.stat().st_size == whole
        assert "torn" in caplog.text
        spool.append([_rec(6)], fsync=True)
        assert _drain(spool) == [*records, _rec(6)]


def test_corrupt_record_in_an_older_segment_skips_its_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Spool(tmp_path, segment_bytes=300) as spool:
        for i in range(6):
            spool.append([_rec(i)], fsync=False)
    first = sorted(tmp_path.glob("*.spool"))[0]
    data = bytearray(first.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of the last record of the first segment
    first.write_bytes(bytes(data))
    with Spool(tmp_path) as spool:
        got = _drain(spool)
    assert "checksum mismatch" in caplog.text
    assert len(got) == 5
    assert got[-1] == _rec(5)


def test_capacity_raises_spool_full_and_writes_nothing(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=500) as spool:
        spool.append([_rec(0, 100)], fsync=False)
        depth = spool.depth
        with pytest.raises(SpoolFull) as err:
            spool.append([_rec(1, 100)] * 5, fsync=False)
        assert err.value.retriable
        assert spool.depth == depth
    import chio_receipts.schemas as schemas

    assert issubclass(SpoolFull, schemas.ReceiptSinkError)


async def test_async_spool_group_commit_keeps_order(tmp_path: Path) -> None:
    import asyncio

    async with AsyncSpool(Spool(tmp_path)) as spool:
        await asyncio.gather(*(spool.append(_rec(i), fsync=True) for i in range(50)))
        assert spool.depth == 50
        batch = await spool.read(100)
        assert batch is not None
        assert [r.headers[0][1] for r in batch.records] == [f"id-{i}".encode() for i in range(50)]
        await spool.ack(batch.end)
        assert spool.depth == 0


_CHILD = textwrap.dedent(
    """
    import sys
    from chio_receipts.streamer import Spool, SpoolRecord
    spool = Spool(sys.argv[1], segment_bytes=4096)
    spool.open()
    i = 0
    while True:
        n = str(i).encode()
        rec = SpoolRecord(topic="t", key=b"k", value=b"v" * (i % 300), headers=(("n", n),))
        spool.append([rec], fsync=True)
        print(i, flush=True)  # acknowledged to the parent only after the fsync'd append
        i += 1
    """
)


def test_kill_9_of_a_writing_process_loses_nothing_acknowledged(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(spool_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout is not None
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert acked >= 300
    with Spool(spool_dir) as spool:
        got = [int(r.headers[0][1]) for r in _drain(spool)]
    # Everything acknowledged is there, in order; at most a few later appends made it too.
    assert got[: acked + 1] == list(range(acked + 1))
    assert got == list(range(len(got)))


def test_read_from_a_cursor_pipelines_without_acknowledging(tmp_path: Path) -> None:
    records = [_rec(i) for i in range(30)]
    with Spool(tmp_path, segment_bytes=600) as spool:
        spool.append(records[:10], fsync=False)
        spool.append(records[10:], fsync=False)
        first = spool.read(max_records=7)
        assert first is not None
        second = spool.read(max_records=7, start=first.end)
        assert second is not None
        got = [*first.records, *second.records]
        cursor = second.end
        while (batch := spool.read(max_records=7, start=cursor)) is not None:
            got.extend(batch.records)
            cursor = batch.end
        assert got == records
        assert spool.depth == 30  # reading acknowledged nothing
        spool.ack(first.end)
        assert spool.depth == 23
        again = spool.read(max_records=100)  # a rewind starts at the acknowledged head
        assert again is not None
        assert again.records[0] == records[7]
        spool.ack(cursor)
        assert spool.depth == 0


def test_one_owner_per_spool_directory(tmp_path: Path) -> None:
    from chio_receipts.streamer import SpoolError

    with Spool(tmp_path), pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path).open()
    with Spool(tmp_path) as again:  # released on close
        assert again.depth == 0


def test_throttled_ack_file_replays_only_duplicates_after_a_crash(tmp_path: Path) -> None:
    records = [_rec(i) for i in range(10)]
    spool = Spool(tmp_path, ack_interval_s=3600)
    spool.open()
    spool.append(records, fsync=True)
    first = spool.read(max_records=3)
    assert first is not None
    spool.ack(first.end)  # the first ack is persisted
    second = spool.read(max_records=3, start=first.end)
    assert second is not None
    spool.ack(second.end)  # throttled: not persisted yet
    spool._release_lock()  # the process dies without close()
    with Spool(tmp_path) as again:
        assert _drain(again) == records[3:]  # records 3..5 come again: duplicates, no loss
