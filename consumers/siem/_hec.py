"""Splunk HTTP Event Collector output: one POST of HEC event envelopes per batch."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from typing import Any, Self
from urllib.parse import urlparse

import httpx

from chio_receipts.consumers._errors import OutputUnavailable
from chio_receipts.consumers.siem._output import http_status_error, http_transport_error

__all__ = ["HecOutput"]


class HecOutput:
    """Splunk HTTP Event Collector: one POST per batch of HEC event envelopes."""

    name = "hec"

    def __init__(
        self,
        url: str,
        token: str,
        *,
        index: str | None = None,
        sourcetype: str = "ocsf:api_activity",
        timeout_seconds: float = 10.0,
    ) -> None:
        parsed = urlparse(url)
        self._url = (
            url if parsed.path not in ("", "/") else url.rstrip("/") + "/services/collector/event"
        )
        self._token = token
        self._index = index
        self._sourcetype = sourcetype
        self._timeout = timeout_seconds
        self._client: httpx.AsyncClient | None = None
        self._host = socket.gethostname()

    async def __aenter__(self) -> Self:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def envelope(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The HEC envelope of one OCSF event."""
        doc: dict[str, Any] = {
            "time": event["time"] / 1000,
            "host": self._host,
            "source": "chio-receipts",
            "sourcetype": self._sourcetype,
            "event": event,
        }
        if self._index:
            doc["index"] = self._index
        return doc

    async def write(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """POST the batch (concatenated JSON envelopes)."""
        if self._client is None:
            raise OutputUnavailable("hec output is not started")
        body = "\n".join(json.dumps(self.envelope(e), separators=(",", ":")) for e in batch)
        try:
            response = await self._client.post(
                self._url,
                content=body.encode(),
                headers={"Authorization": f"Splunk {self._token}"},
            )
        except httpx.HTTPError as exc:
            raise http_transport_error(exc, "hec") from exc
        if response.status_code != 200:
            raise http_status_error(response.status_code, response.text, "hec")
