"""The sidecar's HTTP API: a :class:`LocalSidecar` behind a Starlette app.

Endpoints (JSON; OpenAPI 3.1 document at ``GET /openapi.json``, built from ``_api``):

    POST /v1/capabilities                  mint a capability
    GET  /v1/capabilities/{id}             read a capability
    POST /v1/capabilities/{id}/attenuate   mint a narrower child
    POST /v1/capabilities/{id}/revoke      revoke (descendants follow through their chain)
    POST /v1/evaluate                      decide one attempt and sign its receipt
    GET  /v1/keys                          Ed25519 public keys by key id
    GET  /healthz                          liveness

Request bodies are validated with the document's pydantic models. Bad input never yields a
500: malformed JSON is 400, a body that is not an object, a missing or mistyped field 422, a
body over ``max_body_bytes`` 413, an unknown capability 404, a widening attenuation 409, a
refused capability request 422, a missing or wrong bearer token 401, a store that cannot be
written 503 (nothing is handed out that was not stored); every error is
``{"error": <code>, "reason": <text>}``.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chio_receipts.schemas import ChioReceiptsError, receipt_to_json
from chio_receipts.sidecar._api import (
    OPERATIONS,
    Attenuate,
    Capability,
    CreateCapability,
    Error,
    Evaluation,
    EvaluationRequestBody,
    Health,
    Keys,
    PublicKey,
    Revoked,
    openapi_document,
)
from chio_receipts.sidecar._errors import (
    InvalidCapability,
    ScopeWidening,
    SidecarError,
    StoreError,
    UnknownCapability,
)
from chio_receipts.sidecar._local import LocalSidecar

__all__ = ["DEFAULT_MAX_BODY", "create_sidecar_app"]

_log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 64 * 1024

# The sidecar's errors on the wire, most specific first: (type, status, error code).
_ERROR_STATUS: tuple[tuple[type[SidecarError], int, str], ...] = (
    (UnknownCapability, 404, "unknown_capability"),
    (ScopeWidening, 409, "scope_widening"),
    (InvalidCapability, 422, "invalid_capability"),
    (StoreError, 503, "store_unavailable"),
)

_Model = TypeVar("_Model", bound=BaseModel)


def _wire_error(exc: ChioReceiptsError) -> tuple[int, str]:
    """Status and error code of a refusal; any other project error is an invalid request."""
    for kind, status, error in _ERROR_STATUS:
        if isinstance(exc, kind):
            return status, error
    return 422, "invalid_request"


class _BadRequest(Exception):
    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason


def _error(status: int, error: str, reason: str) -> JSONResponse:
    return JSONResponse(Error(error=error, reason=reason).model_dump(), status_code=status)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise _BadRequest(400, "bad_request", "invalid Content-Length") from None
        if too_big:
            raise _BadRequest(413, "too_large", f"request body over {limit} bytes")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise _BadRequest(413, "too_large", f"request body over {limit} bytes")
    try:
        data = json.loads(bytes(chunks))
    except (ValueError, RecursionError) as exc:
        raise _BadRequest(400, "malformed_json", f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _BadRequest(422, "invalid_request", "body must be a JSON object")
    return data


def _validate(model: type[_Model], data: Mapping[str, Any]) -> _Model:
    """``data`` as ``model``; the first failing field decides the answer (it is never echoed)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        name = ".".join(str(part) for part in first["loc"])
        if first["type"] == "missing":
            raise _BadRequest(422, "missing_field", f"field {name!r} is required") from None
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise _BadRequest(
            422, "invalid_field", f"field {name!r} is invalid: {first['msg']}{more}"
        ) from None


def _json(model: BaseModel, status: int) -> Response:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


Handler = Callable[[Request], Awaitable[Response]]


def create_sidecar_app(
    sidecar: LocalSidecar,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> Starlette:
    """The ASGI app serving ``sidecar``; ``token`` enables bearer authentication."""
    expected = f"Bearer {token}".encode() if token else None
    status = {op.name: op.status for op in OPERATIONS}
    # Serialized once: the document is static, and the same object the tests compare with.
    document = json.dumps(openapi_document()).encode()

    def guarded(fn: Handler, *, auth: bool = True) -> Handler:
        async def endpoint(request: Request) -> Response:
            if auth and expected is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return _error(401, "unauthorized", "missing or wrong bearer token")
            try:
                return await fn(request)
            except _BadRequest as exc:
                return _error(exc.status, exc.error, exc.reason)
            except ChioReceiptsError as exc:
                code, error = _wire_error(exc)
                return _error(code, error, str(exc))

        return endpoint

    async def create_capability(request: Request) -> Response:
        body = _validate(CreateCapability, await _read_json(request, max_body_bytes))
        cap = sidecar.mint(body.subject, body.scope, body.ttl_seconds, parent_id=body.parent_id)
        return _json(Capability.of(cap), status["create_capability"])

    async def get_capability(request: Request) -> Response:
        cap = await sidecar.get_capability(request.path_params["cap_id"])
        return _json(Capability.of(cap), status["get_capability"])

    async def attenuate(request: Request) -> Response:
        body = _validate(Attenuate, await _read_json(request, max_body_bytes))
        cap = sidecar.derive(
            request.path_params["cap_id"], scope=body.scope, ttl_seconds=body.ttl_seconds
        )
        return _json(Capability.of(cap), status["attenuate"])

    async def revoke(request: Request) -> Response:
        cap_id = request.path_params["cap_id"]
        sidecar.revoke_now(cap_id)
        return _json(Revoked(revoked=cap_id), status["revoke"])

    async def evaluate(request: Request) -> Response:
        body = _validate(EvaluationRequestBody, await _read_json(request, max_body_bytes))
        signed = sidecar.evaluate_now(body.to_request())
        answer = Evaluation(
            receipt=receipt_to_json(signed.receipt),
            body=base64.b64encode(signed.body).decode("ascii"),
        )
        return _json(answer, status["evaluate"])

    async def keys(request: Request) -> Response:
        pub = await sidecar.public_keys()
        answer = Keys(
            current=sidecar.key_id,
            keys=[PublicKey(key_id=k, public_key=v.hex()) for k, v in sorted(pub.items())],
        )
        return _json(answer, status["keys"])

    async def healthz(request: Request) -> Response:
        return _json(Health(key_id=sidecar.key_id), status["healthz"])

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    handlers: dict[str, Handler] = {
        "create_capability": create_capability,
        "get_capability": get_capability,
        "attenuate": attenuate,
        "revoke": revoke,
        "evaluate": evaluate,
        "keys": keys,
        "healthz": healthz,
        "openapi": openapi,
    }

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            return _error(exc.status_code, code, str(exc.detail))
        return _error(400, "bad_request", "bad request")

    async def internal_error(request: Request, exc: Exception) -> Response:
        _log.exception("sidecar request failed", exc_info=exc)
        return _error(500, "internal", "internal error")

    routes = [
        Route(op.path, guarded(handlers[op.name], auth=op.auth), methods=[op.method], name=op.name)
        for op in OPERATIONS
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
