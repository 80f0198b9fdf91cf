"""A small TCP proxy for connection faults: pass, blackhole, reset, cut mid-stream, latency.

All on 127.0.0.1. ``mode`` applies to new and existing connections: ``blackhole`` keeps
sockets open and silently drops bytes in both directions, ``latency`` delays every chunk,
``cut_after`` forwards that many more bytes per connection and then closes it.
:meth:`reset_all` aborts every open connection with an RST.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

__all__ = ["TcpProxy"]


@dataclass(slots=True, eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    forwarded: int = 0


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port``; an async context manager."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.mode = "pass"
        self.latency_s = 0.0
        self.cut_after = 0
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0

    @property
    def address(self) -> str:
        """host:port clients connect to."""
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen (idempotent)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.reset_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)

    def set_mode(self, mode: str, *, latency_s: float = 0.0, cut_after: int = 0) -> None:
        """``pass`` | ``blackhole`` | ``latency`` | ``cut_after``."""
        self.mode, self.latency_s, self.cut_after = mode, latency_s, cut_after
        for conn in self._conns:
            conn.forwarded = 0

    def reset_all(self) -> None:
        """Abort every open connection with an RST (SO_LINGER 0)."""
        for conn in list(self._conns):
            for writer in (conn.client, conn.upstream):
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                writer.transport.abort()
        self._conns.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        conn = _Conn(writer, up_writer)
        self._conns.add(conn)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(conn, src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.mode == "blackhole":
                    continue
                if self.mode == "latency" and self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if self.mode == "cut_after":
                    room = self.cut_after - conn.forwarded
                    if room <= 0:
                        break
                    data = data[:room]
                conn.forwarded += len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            self._conns.discard(conn)
            for w in (conn.client, conn.upstream):
                w.transport.abort()
