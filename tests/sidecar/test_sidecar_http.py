"""The sidecar's HTTP API in process (ASGI transport): errors, auth, the OpenAPI document."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from chio_receipts.schemas import EvaluationRequest, receipt_from_json, verify_body
from chio_receipts.sidecar import LocalSidecar, create_sidecar_app, openapi_document
from chio_receipts.sidecar._api import (
    OPERATIONS,
    Capability,
    CreateCapability,
    Error,
    Evaluation,
    EvaluationRequestBody,
    Keys,
)


def _client(side: LocalSidecar, token: str | None = None) -> httpx.AsyncClient:
    app = create_sidecar_app(side, token=token, max_body_bytes=4096)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar")


@pytest.mark.unit
async def test_bad_requests_get_4xx_json_never_500() -> None:
    side = LocalSidecar()
    cap = side.mint("agent:a", ["read"], 60)
    async with _client(side) as http:
        cases = [
            (await http.post("/v1/capabilities", content=b"{not json"), 400, "malformed_json"),
            (await http.post("/v1/capabilities", content=b"[1, 2]"), 422, "invalid_request"),
            (await http.post("/v1/capabilities", json={"scope": ["a"]}), 422, "missing_field"),
            (
                await http.post(
                    "/v1/capabilities", json={"subject": 1, "scope": ["a"], "ttl_seconds": 5}
                ),
                422,
                "invalid_field",
            ),
            (
                await http.post(
                    "/v1/capabilities", json={"subject": "s", "scope": [1], "ttl_seconds": 5}
                ),
                422,
                "invalid_field",
            ),
            (
                await http.post(
                    "/v1/capabilities", json={"subject": "s", "scope": ["a"], "ttl_seconds": -1}
                ),
                422,
                "invalid_capability",
            ),
            (
                await http.post(
                    "/v1/capabilities",
                    json={"subject": "s", "scope": ["a"], "ttl_seconds": True},
                ),
                422,
                "invalid_field",
            ),
            (await http.post("/v1/evaluate", content=b"x" * 5000), 413, "too_large"),
            (await http.post("/v1/evaluate", json={"tool": "a"}), 422, "missing_field"),
            (
                await http.post(
                    "/v1/evaluate",
                    json={
                        "capability_id": cap.id,
                        "tool_server": "s",
                        "tool": "read",
                        "attempt": "one",
                    },
                ),
                422,
                "invalid_field",
            ),
            (
                await http.post(
                    "/v1/evaluate",
                    json={
                        "capability_id": cap.id,
                        "tool_server": "s",
                        "tool": "read",
                        "prev_hash": "zz",
                    },
                ),
                422,
                "invalid_field",
            ),
            (
                await http.post(
                    "/v1/evaluate",
                    json={
                        "capability_id": cap.id,
                        "tool_server": "s",
                        "tool": "read",
                        "attempt": 2**80,
                    },
                ),
                422,
                "invalid_field",
            ),
            (await http.get("/v1/capabilities/cap-missing"), 404, "unknown_capability"),
            (
                await http.post(f"/v1/capabilities/{cap.id}/attenuate", json={"scope": ["admin"]}),
                409,
                "scope_widening",
            ),
            (await http.get("/v1/nothing-here"), 404, "not_found"),
            (await http.get("/v1/evaluate"), 405, "method_not_allowed"),
        ]
        for response, status, error in cases:
            assert response.status_code == status, (response.request.url, response.text)
            body = response.json()
            assert body["error"] == error, body
            assert body["reason"]


@pytest.mark.unit
async def test_bearer_token_guards_everything_but_keys_health_and_openapi() -> None:
    side = LocalSidecar()
    async with _client(side, token="s3cret") as http:
        denied = await http.post(
            "/v1/capabilities", json={"subject": "s", "scope": ["a"], "ttl_seconds": 5}
        )
        assert denied.status_code == 401
        assert denied.json()["error"] == "unauthorized"
        ok = await http.post(
            "/v1/capabilities",
            json={"subject": "s", "scope": ["a"], "ttl_seconds": 5},
            headers={"authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 201
        assert (await http.get("/healthz")).json()["status"] == "ok"
        keys = (await http.get("/v1/keys")).json()
        assert keys["keys"][0]["public_key"] == side_public_hex(side)
        doc = (await http.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        assert {
            "/v1/capabilities",
            "/v1/capabilities/{cap_id}/attenuate",
            "/v1/evaluate",
            "/v1/keys",
            "/healthz",
        } <= set(doc["paths"])


def side_public_hex(side: LocalSidecar) -> str:
    return side.store.public_keys()[side.key_id].hex()


def _served_operations(side: LocalSidecar) -> set[tuple[str, str]]:
    app = create_sidecar_app(side)
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        # Starlette answers HEAD for every GET route by itself; it is not an operation of ours.
        out |= {(route.path, m.lower()) for m in route.methods or () if m != "HEAD"}
    return out


@pytest.mark.unit
def test_every_route_is_documented_and_every_documented_operation_is_served() -> None:
    doc = openapi_document()
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    served = _served_operations(LocalSidecar())
    assert served == documented
    assert len(served) == len(OPERATIONS) == 25
    assert ("/v1/capabilities/{cap_id}/revoke", "post") in served
    assert {("/v1/reconcile", "post"), ("/v1/budgets/reverse", "post")} <= served
    assert ("/metrics", "get") in served
    # The Chio kernel's routes (chio-api-protect 0.1.2) are in the same table.
    assert {
        ("/chio/health", "get"),
        ("/chio/live", "get"),
        ("/v1/capabilities/mint", "post"),
        ("/v1/capabilities/validate", "post"),
        ("/v1/capabilities/release", "post"),
        ("/v1/capabilities/attenuate", "post"),
        ("/v1/receipts/verify", "post"),
    } <= served


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.mark.unit
def test_document_schemas_come_from_the_models_that_validate_requests() -> None:
    doc = openapi_document()
    schemas = doc["components"]["schemas"]
    create = doc["paths"]["/v1/capabilities"]["post"]
    # The project's body first, then the Chio kernel's two shapes of the same route.
    bodies = create["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert [b["$ref"] for b in bodies] == [
        "#/components/schemas/CreateCapability",
        "#/components/schemas/ChioCreateCapability",
        "#/components/schemas/ChioMint",
    ]
    assert schemas["CreateCapability"] == CreateCapability.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    assert schemas["CreateCapability"]["required"] == ["subject", "scope", "ttl_seconds"]
    assert set(create["responses"]) == {
        "200",
        "201",
        "400",
        "401",
        "403",
        "404",
        "409",
        "413",
        "422",
    }
    assert set(schemas) >= {"Error", "Capability", "EvaluationRequestBody", "Evaluation", "Keys"}
    # Every $ref points at a schema the document holds.
    refs = set(_refs(doc))
    assert "#/components/schemas/Error" in refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    # The unauthenticated routes say so; the others inherit the bearer requirement.
    open_routes = {p for p, ops in doc["paths"].items() for op in ops.values() if "security" in op}
    assert open_routes == {
        "/v1/keys",
        "/healthz",
        "/livez",
        "/readyz",
        "/openapi.json",
        "/metrics",
        "/chio/health",
        "/chio/live",
        "/v1/receipts/verify",
    }


@pytest.mark.unit
def test_the_evaluate_body_model_has_exactly_the_request_fields() -> None:
    fields = [f.name for f in dataclasses.fields(EvaluationRequest)]
    assert list(EvaluationRequestBody.model_fields) == fields
    request = EvaluationRequest(
        capability_id="cap-1",
        tool_server="srv",
        tool="read",
        namespace="ns",
        workflow_id="wf",
        run_id="r",
        workflow_type="W",
        task_queue="q",
        activity_id="1",
        activity_type="read",
        attempt=3,
        is_local=True,
        argument_digest="d" * 64,
        argument_key_id="k",
        scheduled_at=5,
        started_at=6,
        worker_identity="w",
        prev_hash=bytes(range(32)),
        deny_reason="no",
        parameters={"args": [{"amount": 12.5, "note": "café"}, [1, None, True]]},
        redact_parameters=True,
    )
    assert EvaluationRequestBody.model_validate(request.to_json()).to_request() == request
    assert EvaluationRequest.from_json(request.to_json()) == request
    assert "café" not in repr(request)


@pytest.mark.unit
async def test_served_document_is_the_generated_one_and_answers_match_their_models() -> None:
    side = LocalSidecar()
    async with _client(side) as http:
        served = await http.get("/openapi.json")
        assert served.status_code == 200
        assert served.headers["content-type"] == "application/json"
        assert served.json() == openapi_document()
        created = await http.post(
            "/v1/capabilities", json={"subject": "agent:a", "scope": ["read"], "ttl_seconds": 60}
        )
        assert created.status_code == 201
        cap = Capability.model_validate(created.json())
        assert cap == Capability.of(await side.get_capability(cap.id))
        evaluated = await http.post(
            "/v1/evaluate", json={"capability_id": cap.id, "tool_server": "s", "tool": "read"}
        )
        answer = Evaluation.model_validate(evaluated.json())
        receipt = receipt_from_json(answer.receipt)
        keys = Keys.model_validate((await http.get("/v1/keys")).json())
        assert keys.current == side.key_id
        public = bytes.fromhex(keys.keys[0].public_key)
        assert verify_body(base64.b64decode(answer.body), public)
        assert receipt.capability_id == cap.id
        missing = await http.post("/v1/capabilities/cap-x/revoke", json={})
        assert missing.status_code == 404
        assert Error.model_validate(missing.json()).error == "unknown_capability"
    # A mutated copy does not change what later callers get.
    doc = openapi_document()
    doc["paths"].clear()
    assert openapi_document()["paths"]
