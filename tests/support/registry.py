"""An in-memory Confluent schema registry speaking the HTTP contract (a test double for the
registry client's HTTP handling only)."""

from __future__ import annotations

import json

import httpx

import chio_receipts.schemas as schemas


class FakeRegistry:
    """In-memory Confluent registry speaking the HTTP contract (test double for HTTP only)."""

    def __init__(self) -> None:
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.requests: list[str] = []
        self.fail_next: int | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.fail_next is not None:
            status, self.fail_next = self.fail_next, None
            return httpx.Response(status, json={"error_code": status, "message": "boom"})
        parts = request.url.path.strip("/").split("/")
        if request.method == "POST" and parts[0] == "subjects" and parts[2] == "versions":
            assert request.headers["content-type"] == "application/vnd.schemaregistry.v1+json"
            text = json.loads(request.content)["schema"]
            json.loads(text)
            ids = [i for i, t in self.schemas.items() if t == text]
            schema_id = ids[0] if ids else len(self.schemas) + 1
            self.schemas[schema_id] = text
            self.subjects.setdefault(parts[1], []).append(schema_id)
            return httpx.Response(200, json={"id": schema_id})
        if request.method == "GET" and parts[:2] == ["schemas", "ids"]:
            text = self.schemas.get(int(parts[2]))
            if text is None:
                return httpx.Response(404, json={"error_code": 40403, "message": "not found"})
            return httpx.Response(200, json={"schema": text})
        if request.method == "POST" and parts[0] == "compatibility":
            versions = self.subjects.get(parts[2])
            if not versions:
                return httpx.Response(404, json={"error_code": 40401})
            new = json.loads(json.loads(request.content)["schema"])
            old = json.loads(self.schemas[versions[-1]])
            return httpx.Response(200, json={"is_compatible": schemas.check_backward(new, old)})
        return httpx.Response(404)
