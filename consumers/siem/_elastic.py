"""Elasticsearch / OpenSearch output: ``_bulk`` with ``create`` and ``_id`` = the event uid, so a
replayed batch cannot duplicate documents."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from chio_receipts.consumers._errors import OutputUnavailable
from chio_receipts.consumers.siem._output import HttpOutput, http_status_error

__all__ = ["ElasticOutput"]


class ElasticOutput(HttpOutput):
    """Elasticsearch / OpenSearch ``_bulk`` with ``create`` and ``_id`` = event uid."""

    name = "elastic"

    def __init__(
        self, url: str, *, index: str | None = None, timeout_seconds: float = 10.0
    ) -> None:
        super().__init__(
            url.rstrip("/") + "/_bulk" if not url.rstrip("/").endswith("_bulk") else url,
            timeout_seconds=timeout_seconds,
        )
        self._index = index or "chio-receipts"

    async def write(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """One ``_bulk`` request; items that already exist (409) count as accepted."""
        lines: list[str] = []
        for e in batch:
            action = {"create": {"_index": self._index, "_id": e["metadata"]["uid"]}}
            lines.append(json.dumps(action, separators=(",", ":")))
            lines.append(json.dumps(e, separators=(",", ":")))
        response = await self._post(
            ("\n".join(lines) + "\n").encode(), {"Content-Type": "application/x-ndjson"}
        )
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
