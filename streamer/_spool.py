"""The local append-only spool: a write-ahead log for receipts that Kafka has not acknowledged.

Layout: a directory of segment files ``seg-<index>.spool`` (index grows by one per segment) and an
``ack`` file holding the acknowledged position. Each record is framed as::

    u32 length (big-endian) | u32 CRC32 of the payload | payload

and the payload is ``u16 topic length, topic, u32 key length, key, u32 value length, value, u16
header count, (u16 name length, name, u32 value length, value)*``. The value bytes are exactly
the bytes sent to Kafka, so a replay carries the same receipt id and signature.

Crash safety: records are only ever appended. On open every segment is scanned; a torn or
corrupt record at the tail of the newest segment (a crash mid-``write``) is logged and truncated
away; corruption inside an older segment is logged and the rest of that segment is skipped. A
record whose append returned is complete on disk up to the fsync policy:

- ``fsync=True`` appends (``durability="before_execute"``) call ``os.fsync`` before returning;
  concurrent appends share one fsync (group commit, see ``AsyncSpool``);
- ``fsync=False`` appends (spill of a full queue, records that failed to send) are written with
  one ``write`` per batch and fsync'd once per batch by the sender, so they survive a process
  crash (the page cache holds them) and, after the batch fsync, a machine crash too.

Acknowledgement (``ack``) moves the head; segments wholly before it are deleted. The ack
position is persisted with an atomic rename at most every ``ack_interval_s`` (and whenever a
segment is deleted, and on close), so a restart replays at most what was acknowledged in that
interval or not yet acknowledged (duplicates, never loss). Capacity: ``max_bytes``
of live segments; an append past it raises :class:`SpoolFull` and writes nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from chio_receipts.schemas import AsyncService
from chio_receipts.streamer._errors import SpoolError, SpoolFull

__all__ = ["AsyncSpool", "Spool", "SpoolBatch", "SpoolPosition", "SpoolRecord"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_SUFFIX = ".spool"
_MAX_RECORD = 64 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolRecord:
    """One Kafka record as it will be produced: topic, key, value bytes and headers."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    def encode(self) -> bytes:
        """The framed bytes of this record (header + payload)."""
        t = self.topic.encode()
        parts = [_U16.pack(len(t)), t, _U32.pack(len(self.key)), self.key]
        parts += [_U32.pack(len(self.value)), self.value, _U16.pack(len(self.headers))]
        for name, value in self.headers:
            n = name.encode()
            parts += [_U16.pack(len(n)), n, _U32.pack(len(value)), value]
        payload = b"".join(parts)
        return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode_payload(cls, payload: bytes) -> SpoolRecord:
        """Parse a payload (without the frame header); raises ``ValueError`` when corrupt."""
        view = memoryview(payload)
        pos = 0

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > len(view):
                raise ValueError("payload truncated")
            out = bytes(view[pos : pos + n])
            pos += n
            return out

        topic = take(_U16.unpack(take(2))[0]).decode()
        key = take(_U32.unpack(take(4))[0])
        value = take(_U32.unpack(take(4))[0])
        headers = []
        for _ in range(_U16.unpack(take(2))[0]):
            name = take(_U16.unpack(take(2))[0]).decode()
            headers.append((name, take(_U32.unpack(take(4))[0])))
        if pos != len(view):
            raise ValueError("trailing bytes in payload")
        return cls(topic=topic, key=key, value=value, headers=tuple(headers))


class SpoolPosition(NamedTuple):
    """A byte position in the spool: segment index and offset within it."""

    segment: int
    offset: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolBatch:
    """Records read from the head of the spool and the position just after the last one."""

    records: tuple[SpoolRecord, ...]
    end: SpoolPosition


@dataclass(slots=True, kw_only=True)
class _Segment:
    index: int
    path: Path
    size: int = 0
    records: int = 0
    offsets: list[int] = field(default_factory=list)


def _segment_name(index: int) -> str:
    return f"seg-{index:012d}{_SUFFIX}"


class Spool:
    """Synchronous, thread-safe spool over one directory (see the module docstring).

    Blocking file I/O: call it from a worker thread (``AsyncSpool`` does) when on an event loop.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 16 << 20,
        ack_interval_s: float = 0.2,
    ) -> None:
        self._dir = Path(directory)
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._head = SpoolPosition(0, 0)
        self._head_records = 0  # records of the head segment before ``_head.offset``
        self._records = 0  # records in live segments (kept so ``depth`` is O(1) per call)
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._opened = False
        self._ack_interval = ack_interval_s
        self._ack_written: float | None = None  # monotonic time of the last ack-file write

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory if needed and recover its segments; idempotent."""
        with self._lock:
            if self._opened:
                return
            try:
                self._dir.mkdir(parents=True, exist_ok=True)
                self._take_lock()
                self._recover()
            except OSError as exc:
                self._release_lock()
                raise SpoolError(f"cannot open spool {self._dir}: {exc}") from exc
            self._opened = True

    def _take_lock(self) -> None:
        # One process per spool directory: two writers would interleave segments and both
        # replay them. The kernel drops the lock when the owner dies, even by kill -9.
        fd = os.open(self._dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"spool {self._dir} is in use by another process (or another Spool object); "
                "give each worker process its own spool directory"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Fsync and close the active segment; idempotent."""
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None
            if self._opened and self._ack_written is not None:
                self._persist_ack(time.monotonic())
            self._release_lock()
            self._opened = False

    def __enter__(self) -> Spool:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recover(self) -> None:
        paths = sorted(p for p in self._dir.iterdir() if p.name.endswith(_SUFFIX))
        segments: list[_Segment] = []
        for i, path in enumerate(paths):
            try:
                index = int(path.name[4 : -len(_SUFFIX)])
            except ValueError:
                log.warning("spool: ignoring unexpected file %s", path.name)
                continue
            seg = _Segment(index=index, path=path)
            self._scan(seg, last=i == len(paths) - 1)
            segments.append(seg)
        self._segments = segments
        self._records = sum(s.records for s in segments)
        head = self._read_ack() or SpoolPosition(0, 0)
        for seg in list(segments):
            if seg.index < head.segment:
                self._delete(seg)  # wholly acknowledged before the crash
        self._head, self._head_records = SpoolPosition(max(head.segment, 0), 0), 0
        if self._segments:
            seg0 = self._segments[0]
            if seg0.index == head.segment and head.offset in seg0.offsets:
                self._head = head
                self._head_records = seg0.offsets.index(head.offset)
            elif seg0.index == head.segment and head.offset == seg0.size:
                self._head, self._head_records = head, seg0.records
            else:
                self._head = SpoolPosition(seg0.index, 0)
        if self.depth:
            log.info("spool %s: recovered %d unacknowledged records", self._dir, self.depth)

    def _scan(self, seg: _Segment, *, last: bool) -> None:
        data = seg.path.read_bytes()
        pos = 0
        while pos < len(data):
            bad = None
            if len(data) - pos < _HEADER.size:
                bad = "torn record header"
            else:
                length, crc = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + length
                if length > _MAX_RECORD:
                    bad = f"absurd record length {length}"
                elif end > len(data):
                    bad = "torn record payload"
                elif zlib.crc32(data[pos + _HEADER.size : end]) != crc:
                    bad = "checksum mismatch"
            if bad is not None:
                if last:
                    log.warning(
                        "spool %s: %s at offset %d, truncating %d bytes (torn tail of a crash)",
                        seg.path.name,
                        bad,
                        pos,
                        len(data) - pos,
                    )
                    with seg.path.open("r+b") as f:
                        f.truncate(pos)
                        os.fsync(f.fileno())
                else:
                    log.error(
                        "spool %s: %s at offset %d, skipping the rest of the segment",
                        seg.path.name,
                        bad,
                        pos,
                    )
                break
            seg.offsets.append(pos)
            seg.records += 1
            pos = end
        seg.size = pos

    # -- ack file --------------------------------------------------------------------------------

    def _read_ack(self) -> SpoolPosition | None:
        try:
            text = (self._dir / "ack").read_text("ascii").split()
            return SpoolPosition(int(text[0]), int(text[1]))
        except (OSError, ValueError, IndexError):
            return None

    def _write_ack(self) -> None:
        tmp = self._dir / "ack.tmp"
        tmp.write_text(f"{self._head.segment} {self._head.offset}\n", "ascii")
        os.replace(tmp, self._dir / "ack")

    # -- state -----------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The spool directory."""
        return self._dir

    @property
    def depth(self) -> int:
        """Records appended and not yet acknowledged."""
        return self._records - self._head_records

    @property
    def size_bytes(self) -> int:
        """Bytes of live segments (acknowledged bytes of the head segment included)."""
        return sum(s.size for s in self._segments)

    # -- append ----------------------------------------------------------------------------------

    def append(self, records: Sequence[SpoolRecord], *, fsync: bool) -> None:
        """Append ``records`` in order, in one write; fsync when asked. All or nothing."""
        if not records:
            return
        encoded = [r.encode() for r in records]
        blob = b"".join(encoded)
        with self._lock:
            if not self._opened:
                raise SpoolError("spool is not open")
            if self.size_bytes + len(blob) > self._max_bytes:
                raise SpoolFull(
                    f"spool {self._dir} is full ({self.size_bytes} of {self._max_bytes} bytes)"
                )
            seg = self._active()
            fd = self._fd
            if fd is None:  # pragma: no cover - _active always opens one
                raise SpoolError("spool has no active segment")
            try:
                written = os.write(fd, blob)
                while written < len(blob):
                    written += os.write(fd, blob[written:])
                if fsync:
                    os.fsync(fd)
            except OSError as exc:
                # Leave no partial record behind: cut the segment back to its last good size.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, seg.size)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise SpoolFull(f"spool {self._dir}: disk full") from exc
                raise SpoolError(f"spool {self._dir}: write failed: {exc}") from exc
            off = seg.size
            for e in encoded:
                seg.offsets.append(off)
                off += len(e)
            seg.size = off
            seg.records += len(encoded)
            self._records += len(encoded)

    def sync(self) -> None:
        """Fsync the active segment (the per-batch fsync of ``fsync=False`` appends)."""
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    raise SpoolError(f"spool {self._dir}: fsync failed: {exc}") from exc

    def _active(self) -> _Segment:
        seg = self._segments[-1] if self._segments else None
        if seg is not None and self._fd is not None and seg.size < self._segment_bytes:
            return seg
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if seg is not None and seg.size < self._segment_bytes:
            self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND)
            return seg
        index = seg.index + 1 if seg is not None else max(self._head.segment, 0)
        new = _Segment(index=index, path=self._dir / _segment_name(index))
        self._fd = os.open(new.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        _fsync_dir(self._dir)
        self._segments.append(new)
        if len(self._segments) == 1:
            self._head = SpoolPosition(index, 0)
            self._head_records = 0
        return new

    # -- read / ack ------------------------------------------------------------------------------

    def read(
        self,
        max_records: int = 500,
        max_bytes: int = 4 << 20,
        *,
        start: SpoolPosition | None = None,
    ) -> SpoolBatch | None:
        """Up to ``max_records`` records in append order, from ``start`` (a position a previous
        read returned) or, by default, from the acknowledged head. Reading does not acknowledge.
        """
        with self._lock:
            pos = self._head if start is None or start < self._head else start
            seg = next((s for s in self._segments if s.index >= pos.segment), None)
            if seg is None:
                return None
            if seg.index == pos.segment:
                start_idx = bisect.bisect_left(seg.offsets, pos.offset)
            else:
                start_idx = 0
            if start_idx >= seg.records:
                seg = next((s for s in self._segments if s.index > seg.index and s.records), None)
                if seg is None:
                    return None
                start_idx = 0
            offsets = seg.offsets[start_idx : start_idx + max_records]
            begin = offsets[0]
            end = seg.size
            if start_idx + len(offsets) < seg.records:
                end = seg.offsets[start_idx + len(offsets)]
            with seg.path.open("rb") as f:
                f.seek(begin)
                data = f.read(min(end - begin, max(max_bytes, 1)))
        records: list[SpoolRecord] = []
        consumed = 0
        for off in offsets:
            rel = off - begin
            if rel >= len(data) or len(data) - rel < _HEADER.size:
                break
            length, _crc = _HEADER.unpack_from(data, rel)
            stop = rel + _HEADER.size + length
            if stop > len(data):
                break
            try:
                records.append(SpoolRecord.decode_payload(data[rel + _HEADER.size : stop]))
            except (ValueError, UnicodeDecodeError) as exc:
                raise SpoolError(f"spool {seg.path.name}: corrupt record at {off}") from exc
            consumed = stop
        if not records:
            # One record larger than max_bytes: read it alone.
            if max_bytes >= _MAX_RECORD:
                return None
            return self.read(max_records=1, max_bytes=_MAX_RECORD, start=start)
        return SpoolBatch(records=tuple(records), end=SpoolPosition(seg.index, begin + consumed))

    def ack(self, position: SpoolPosition) -> None:
        """Everything before ``position`` reached Kafka: drop it (delete whole segments)."""
        with self._lock:
            deleted = False
            for seg in list(self._segments):
                if seg.index < position.segment:
                    self._delete(seg)
                    deleted = True
            found = next((s for s in self._segments if s.index == position.segment), None)
            if found is None:
                if deleted:
                    self._persist_ack(time.monotonic())
                return
            seg = found
            self._head = position
            self._head_records = sum(1 for o in seg.offsets if o < position.offset)
            if position.offset >= seg.size and self._head_records == seg.records:
                # All acknowledged: drop the segment; the next append starts a new one.
                is_active = seg is self._segments[-1]
                if is_active and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                self._delete(seg)
                deleted = True
                self._head = SpoolPosition(seg.index + 1, 0)
                self._head_records = 0
                if self._segments:
                    self._head = SpoolPosition(self._segments[0].index, 0)
            now = time.monotonic()
            last = self._ack_written
            if deleted or last is None or now - last >= self._ack_interval:
                self._persist_ack(now)

    def _persist_ack(self, now: float) -> None:
        try:
            self._write_ack()
        except OSError as exc:
            log.warning("spool %s: cannot persist ack position: %s", self._dir, exc)
        self._ack_written = now

    def _delete(self, seg: _Segment) -> None:
        try:
            seg.path.unlink(missing_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool {self._dir}: cannot delete {seg.path.name}: {exc}") from exc
        self._segments.remove(seg)
        self._records -= seg.records


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AsyncSpool(AsyncService):
    """Event-loop front of a :class:`Spool`: file I/O on one dedicated thread, group commit.

    Concurrent ``append(..., fsync=True)`` calls are gathered into one write and one fsync, so
    ``durability="before_execute"`` costs one fsync per group, not per receipt. An idempotent
    async context manager.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[SpoolRecord, bool, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the spool (recovery runs on the spool thread); idempotent."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chio-spool")
        await self._run(self.spool.open)

    async def stop(self) -> None:
        """Finish pending appends, fsync and close; idempotent."""
        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._executor is not None:
            await self._run(self.spool.close)
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _run(self, fn: object, *args: object) -> object:
        if self._executor is None:
            raise SpoolError("spool is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)  # type: ignore[arg-type]

    async def append(self, record: SpoolRecord, *, fsync: bool) -> None:
        """Append one record; returns once written (and fsync'd when ``fsync``)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, fsync, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="chio-spool-writer")
        await fut

    async def append_many(self, records: Sequence[SpoolRecord], *, fsync: bool) -> None:
        """Append a batch in order with one write (and one fsync when ``fsync``)."""
        if records:
            await self._run(lambda: self.spool.append(records, fsync=fsync))

    async def _write_pending(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            records = [r for r, _, _ in group]
            fsync = any(f for _, f, _ in group)
            try:
                await self._run(self._append_sync, records, fsync)
            except SpoolError as exc:  # handed to every waiting caller
                for _, _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, _, fut in group:
                if not fut.done():
                    fut.set_result(None)

    def _append_sync(self, records: Sequence[SpoolRecord], fsync: bool) -> None:
        self.spool.append(records, fsync=fsync)

    async def sync(self) -> None:
        """Fsync the active segment."""
        await self._run(self.spool.sync)

    async def read(
        self, max_records: int = 500, *, start: SpoolPosition | None = None
    ) -> SpoolBatch | None:
        """Read a batch from ``start`` or the head (see :meth:`Spool.read`)."""
        result = await self._run(lambda: self.spool.read(max_records, start=start))
        return result if isinstance(result, SpoolBatch) else None

    async def ack(self, position: SpoolPosition) -> None:
        """Acknowledge up to ``position`` (see :meth:`Spool.ack`)."""
        await self._run(lambda: self.spool.ack(position))

    @property
    def depth(self) -> int:
        """Unacknowledged records (read without the spool thread; approximate while writing)."""
        return self.spool.depth
