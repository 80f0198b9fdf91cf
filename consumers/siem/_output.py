"""What every SIEM output is (the :class:`Output` protocol) and how HTTP failures are classed.

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

__all__ = ["Output", "http_status_error", "http_transport_error"]


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
