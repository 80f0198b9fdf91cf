"""Syslog output: RFC 5424 messages over TCP (octet counting, RFC 6587) or UDP, facility local0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import urlparse

from chio_receipts.consumers._errors import ConfigError, OutputUnavailable
from chio_receipts.consumers.siem._ocsf import is_deny

__all__ = ["SyslogOutput"]


class SyslogOutput:
    """RFC 5424 messages over TCP (octet-counting framing) or UDP, facility local0."""

    name = "syslog"
    _FACILITY = 16

    def __init__(self, url: str, *, timeout_seconds: float = 10.0) -> None:
        parsed = urlparse(url)
        if parsed.hostname is None or parsed.port is None:
            raise ConfigError(f"syslog output needs host:port, got {url!r}")
        self._tcp = parsed.scheme == "syslog+tcp"
        self._host, self._port = parsed.hostname, parsed.port
        self._timeout = timeout_seconds
        self._writer: asyncio.StreamWriter | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._hostname = socket.gethostname()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), self._timeout)
        udp, self._udp = self._udp, None
        if udp is not None:
            udp.close()

    def format(self, event: Mapping[str, Any]) -> bytes:
        """One RFC 5424 message: structured data carries the ids, the MSG the OCSF JSON."""
        severity = 4 if is_deny(event) else 6
        ts = datetime.fromtimestamp(event["time"] / 1000, tz=UTC).isoformat(timespec="milliseconds")
        uid = str(event["metadata"]["uid"]).replace("]", "").replace('"', "")
        sd = f'[chio@32473 uid="{uid}" action="{event["action"]}"]'
        msg = json.dumps(event, separators=(",", ":"))
        head = (
            f"<{self._FACILITY * 8 + severity}>1 {ts} {self._hostname} chio-receipts - ocsf {sd} "
        )
        return head.encode() + b"\xef\xbb\xbf" + msg.encode()

    async def write(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """Send every event; TCP waits for the bytes to drain."""
        try:
            if self._tcp:
                writer = self._writer
                if writer is None:
                    _, opened = await asyncio.wait_for(
                        asyncio.open_connection(self._host, self._port), self._timeout
                    )
                    self._writer = writer = opened
                for e in batch:
                    data = self.format(e)
                    writer.write(str(len(data)).encode() + b" " + data)
                await asyncio.wait_for(writer.drain(), self._timeout)
            else:
                if self._udp is None:
                    loop = asyncio.get_running_loop()
                    self._udp, _ = await loop.create_datagram_endpoint(
                        asyncio.DatagramProtocol, remote_addr=(self._host, self._port)
                    )
                for e in batch:
                    self._udp.sendto(self.format(e))
        except (OSError, TimeoutError) as exc:
            await self._close()
            raise OutputUnavailable(f"syslog: {type(exc).__name__}: {exc}") from exc
