"""What every SIEM output is (the :class:`Output` protocol), how HTTP failures are classed, and
the base of the HTTP outputs (:class:`HttpOutput`: one client, one POST per batch).

An output takes one batch of OCSF events at a time: ``write`` returns once the whole batch was
accepted, raises :class:`OutputUnavailable` when a later attempt can succeed (network, 5xx,
429, timeout) and :class:`OutputRejected` when the output refused the batch itself (4xx).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Protocol, Self

import httpx

from chio_receipts.consumers._errors import OutputError, OutputRejected, OutputUnavailable

__all__ = ["HttpOutput", "Output", "http_status_error", "http_transport_error"]


class Output(Protocol):
    """Where OCSF events go."""

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def write(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """Deliver ``batch``; raise OutputUnavailable (retry) or OutputRejected (refused)."""
        ...


def http_transport_error(exc: httpx.HTTPError, what: str) -> OutputError:
    """A request that got no answer: worth retrying."""
    return OutputUnavailable(f"{what}: {type(exc).__name__}: {exc}")


def http_status_error(status: int, text: str, what: str) -> OutputError:
    """An HTTP error answer: 429 and 5xx are transient, any other status a refusal."""
    if status == 429 or status >= 500:
        return OutputUnavailable(f"{what}: HTTP {status}: {text[:300]}")
    return OutputRejected(f"{what}: HTTP {status}: {text[:300]}")


class HttpOutput:
    """Base of the outputs that POST each batch to one URL: owns an httpx client while entered.

    A subclass sets ``name``, builds the request body and headers, and reads the answer of
    :meth:`_post` when a 200 says more than "accepted".
    """

    name: str

    def __init__(self, url: str, *, timeout_seconds: float) -> None:
        self._url = url
        self._timeout = timeout_seconds
        self._client: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Self:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _post(self, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """POST ``content``; any answer but 200 is raised as :class:`OutputError`."""
        if self._client is None:
            raise OutputUnavailable(f"{self.name} output is not started")
        try:
            response = await self._client.post(self._url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise http_transport_error(exc, self.name) from exc
        if response.status_code != 200:
            raise http_status_error(response.status_code, response.text, self.name)
        return response
