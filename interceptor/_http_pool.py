"""The HTTP connection pool both sidecar clients share (``HttpSidecar``, ``ChioKernelSidecar``)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any, Self

import httpx

from chio_receipts.interceptor._errors import ChioSidecarUnavailable
from chio_receipts.schemas import AsyncCloseable, RetryPolicy, retry_async

__all__ = ["PooledHttpClient"]

_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


class PooledHttpClient(AsyncCloseable):
    """One pooled ``httpx.AsyncClient`` to ``base_url``, opened on first use, with a bearer token
    and a retry policy for connection failures (a request that may have reached the server is
    never retried). An idempotent async context manager; without ``async with``, close it with
    :meth:`aclose`."""

    def __init__(
        self,
        base_url: str,
        *,
        bearer: str | None,
        timeout: float,
        connect_timeout: float,
        retries: int,
        retry_wait: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None,
        describe: str,
        peer: str,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._peer = peer
        self._bearer = bearer or None
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._retry = RetryPolicy(
            initial_seconds=retry_wait,
            maximum_seconds=1.0,
            attempts=max(0, retries) + 1,
            retry_on=lambda exc: isinstance(exc, _RETRYABLE),
            describe=describe,
        )
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        self._open()
        return self

    def _open(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            headers = {"accept": "application/json"}
            if self._bearer:
                headers["authorization"] = f"Bearer {self._bearer}"
            # TCP_NODELAY: a request is written as headers then body; with Nagle's algorithm
            # and delayed ACKs that costs ~40 ms per evaluation.
            transport = self._transport or httpx.AsyncHTTPTransport(
                limits=self._limits,
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            )
            self._client = httpx.AsyncClient(
                base_url=self.base_url, timeout=self._timeout, headers=headers, transport=transport
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool (idempotent)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _exchange(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> httpx.Response:
        """One request, retried on connection failures only; a transport failure or a timeout
        is :class:`ChioSidecarUnavailable` (retriable, never an allow)."""
        client = self._open()

        async def send() -> httpx.Response:
            return await client.request(method, path, json=body)

        try:
            return await retry_async(send, policy=self._retry)
        except httpx.TimeoutException as exc:
            raise ChioSidecarUnavailable(
                f"{self._peer} {self.base_url} timed out: {exc!r}"
            ) from exc
        except httpx.HTTPError as exc:
            raise ChioSidecarUnavailable(
                f"{self._peer} {self.base_url} unreachable: {type(exc).__name__}"
            ) from exc
