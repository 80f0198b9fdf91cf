"""A minimal HTTP/1.1 receiver on 127.0.0.1 for output and key-endpoint tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Receiver:
    """A minimal HTTP/1.1 server on 127.0.0.1 recording requests (keep-alive aware)."""

    def __init__(
        self, status: list[int] | None = None, reply: Callable[[bytes], bytes] | None = None
    ):
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self._status = status or []
        self._reply = reply or (lambda body: b'{"text":"Success","code":0}')
        self._server: asyncio.base_events.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self._status.pop(0) if self._status else 200
                self.requests.append((method, path, headers, body))
                reply = self._reply(body) if status == 200 else b'{"text":"busy","code":9}'
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
