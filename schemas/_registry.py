"""A Confluent-compatible schema registry client over httpx (async, cached).

Only the three calls the pipeline needs: register a schema under a subject (returns its id),
fetch a schema by id, and ask whether a schema is compatible with a subject's latest version.
Ids and schemas are immutable in a registry, so both directions are cached for the life of the
client. httpx errors never escape: they become :class:`RegistryError`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import httpx

from chio_receipts.schemas._errors import RegistryError, UnknownSchema
from chio_receipts.schemas._lifecycle import AsyncCloseable

__all__ = ["SchemaRegistryClient", "SubjectStrategy", "subject_name"]

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class SubjectStrategy(StrEnum):
    """How a subject name is derived from topic and record name (Confluent's strategies).

    ``TOPIC`` (TopicNameStrategy, Confluent's default) is the default here too."""

    TOPIC = "topic"  # <topic>-value
    RECORD = "record"  # <record full name>
    TOPIC_RECORD = "topic_record"  # <topic>-<record full name>


def subject_name(strategy: SubjectStrategy, topic: str, record_name: str) -> str:
    """The subject of ``record_name`` written to ``topic`` under ``strategy``."""
    if strategy is SubjectStrategy.TOPIC:
        return f"{topic}-value"
    if strategy is SubjectStrategy.RECORD:
        return record_name
    return f"{topic}-{record_name}"


class SchemaRegistryClient(AsyncCloseable):
    """Async client of a Confluent-compatible schema registry. An async context manager.

    ``transport`` lets tests plug an ``httpx.MockTransport``; ``auth`` is passed to httpx and
    never printed.
    """

    def __init__(
        self,
        url: str,
        *,
        strategy: SubjectStrategy = SubjectStrategy.TOPIC,
        timeout_s: float = 10.0,
        auth: httpx.Auth | tuple[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.strategy = strategy
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=timeout_s,
            auth=auth,
            transport=transport,
            headers={"Accept": _CONTENT_TYPE},
        )
        self._timeout_s = timeout_s
        self._auth = auth
        self._ids: dict[tuple[str, str], int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SchemaRegistryClient({self.url!r}, strategy={self.strategy.value!r})"

    async def aclose(self) -> None:
        """Close the HTTP client; idempotent."""
        await self._client.aclose()

    def subject(self, topic: str, record_name: str) -> str:
        """The subject of ``record_name`` on ``topic`` under this client's strategy."""
        return subject_name(self.strategy, topic, record_name)

    async def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> httpx.Response:
        try:
            return await self._client.request(
                method,
                path,
                content=None if body is None else json.dumps(body),
                headers=None if body is None else {"Content-Type": _CONTENT_TYPE},
            )
        except httpx.HTTPError as exc:
            raise RegistryError(f"schema registry {self.url}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _json(response: httpx.Response, what: str) -> dict[str, Any]:
        if response.status_code >= 400:
            raise RegistryError(
                f"schema registry: {what}: HTTP {response.status_code} {response.text[:200]}",
                status=response.status_code,
            )
        try:
            data = response.json()
        except ValueError as exc:
            raise RegistryError(f"schema registry: {what}: response is not JSON") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"schema registry: {what}: unexpected response {data!r:.200}")
        return data

    async def register(self, subject: str, schema: Mapping[str, Any]) -> int:
        """Register ``schema`` under ``subject`` (idempotent on the registry); its id."""
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        key = (subject, text)
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        async with self._lock:
            if key in self._ids:
                return self._ids[key]
            resp = await self._request(
                "POST", f"/subjects/{quote(subject, safe='')}/versions", {"schema": text}
            )
            data = self._json(resp, f"register {subject}")
            schema_id = data.get("id")
            if not isinstance(schema_id, int):
                raise RegistryError(f"schema registry: register {subject}: no id in {data!r:.200}")
            self._ids[key] = schema_id
            self._schemas.setdefault(schema_id, json.loads(text))
            return schema_id

    async def get_schema(self, schema_id: int) -> dict[str, Any]:
        """The schema JSON registered under ``schema_id``; :class:`UnknownSchema` if none."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        resp = await self._request("GET", f"/schemas/ids/{schema_id}")
        return self._schema_from(resp, schema_id)

    def get_schema_blocking(self, schema_id: int) -> dict[str, Any]:
        """:meth:`get_schema` for synchronous callers (e.g. ``verify`` reading stored messages):
        one short-lived blocking HTTP client per uncached id."""
        cached = self._schemas.get(schema_id)
        if cached is not None:
            return cached
        try:
            with httpx.Client(
                base_url=self.url,
                timeout=self._timeout_s,
                auth=self._auth,
                headers={"Accept": _CONTENT_TYPE},
            ) as client:
                resp = client.get(f"/schemas/ids/{schema_id}")
        except httpx.HTTPError as exc:
            raise RegistryError(f"schema registry {self.url}: {type(exc).__name__}: {exc}") from exc
        return self._schema_from(resp, schema_id)

    def _schema_from(self, resp: httpx.Response, schema_id: int) -> dict[str, Any]:
        if resp.status_code == 404:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        data = self._json(resp, f"get schema {schema_id}")
        if data.get("schemaType", "AVRO") != "AVRO":
            raise UnknownSchema(f"schema id {schema_id} is {data.get('schemaType')}, not Avro")
        try:
            schema = json.loads(data["schema"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"schema registry: schema {schema_id} is not JSON") from exc
        if not isinstance(schema, dict):
            raise UnknownSchema(f"schema id {schema_id} is not an Avro record schema")
        self._schemas[schema_id] = schema
        return schema

    async def is_compatible(
        self, subject: str, schema: Mapping[str, Any], *, version: str = "latest"
    ) -> bool:
        """Whether ``schema`` is compatible with ``subject``'s ``version`` under the subject's
        compatibility level; True when the subject does not exist yet."""
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        resp = await self._request(
            "POST",
            f"/compatibility/subjects/{quote(subject, safe='')}/versions/{version}",
            {"schema": text},
        )
        if resp.status_code == 404:
            return True
        return bool(self._json(resp, f"compatibility {subject}").get("is_compatible", False))

    def cached_schema(self, schema_id: int) -> dict[str, Any] | None:
        """The schema of ``schema_id`` if this client has already seen it (no I/O)."""
        return self._schemas.get(schema_id)
