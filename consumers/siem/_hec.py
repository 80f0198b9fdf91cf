"""Splunk HTTP Event Collector output: one POST of HEC event envelopes per batch."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

from chio_receipts.consumers.siem._output import HttpOutput

__all__ = ["HecOutput"]


class HecOutput(HttpOutput):
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
        super().__init__(
            url if parsed.path not in ("", "/") else url.rstrip("/") + "/services/collector/event",
            timeout_seconds=timeout_seconds,
        )
        self._token = token
        self._index = index
        self._sourcetype = sourcetype
        self._host = socket.gethostname()

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
        body = "\n".join(json.dumps(self.envelope(e), separators=(",", ":")) for e in batch)
        await self._post(body.encode(), {"Authorization": f"Splunk {self._token}"})
