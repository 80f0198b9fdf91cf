"""Elasticsearch / OpenSearch output: ``_bulk`` with ``create`` and ``_id`` = the event uid, so a
replayed batch cannot duplicate documents."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Self

import httpx

from chio_receipts.consumers._errors import OutputUnavailable
from chio_receipts.consumers.siem._output import http_status_error, http_transport_error

__all__ = ["ElasticOutput"]


class ElasticOutput:
    """Elasticsearch / OpenSearch ``_bulk`` with ``create`` and ``_id`` = event uid."""

    name = "elastic"

    def __init__(
        self, url: str, *, index: str | None = None, timeout_seconds: float = 10.0
    ) -> None:
        self._url = url.rstrip("/") + "/_bulk" if not url.rstrip("/").endswith("_bulk") else url
        self._index = index or "chio-receipts"
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

    async def write(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """One ``_bulk`` request; items that already exist (409) count as accepted."""
        if self._client is None:
            raise OutputUnavailable("elastic output is not started")
        lines: list[str] = []
        for e in batch:
            action = {"create": {"_index": self._index, "_id": e["metadata"]["uid"]}}
            lines.append(json.dumps(action, separators=(",", ":")))
            lines.append(json.dumps(e, separators=(",", ":")))
        try:
            response = await self._client.post(
                self._url,
                content=("\n".join(lines) + "\n").encode(),
                headers={"Content-Type": "application/x-ndjson"},
            )
        except httpx.HTTPError as exc:
            raise http_transport_error(exc, "elastic") from exc
        if response.status_code != 200:
            raise http_status_error(response.status_code, response.text, "elastic")
        try:
            result = response.json()
        except ValueError as exc:
            raise OutputUnavailable("elastic: response is not JSON") from exc
        if not result.get("errors"):
            return
        for item in result.get("items", []):
            status = int(next(iter(item.values())).get("status", 500))
            if status in (200, 201, 409):
                continue
            raise http_status_error(status, json.dumps(item)[:300], "elastic item")
