"""The sidecar's HTTP API: ``LocalSidecar`` served with Starlette on uvicorn.

Endpoints (JSON; OpenAPI 3 document at ``GET /openapi.json``):

    POST /v1/capabilities                  mint a capability
    GET  /v1/capabilities/{id}             read a capability
    POST /v1/capabilities/{id}/attenuate   mint a narrower child
    POST /v1/capabilities/{id}/revoke      revoke (descendants follow through their chain)
    POST /v1/evaluate                      decide one attempt and sign its receipt
    GET  /v1/keys                          Ed25519 public keys by key id
    GET  /healthz                          liveness

Bad input never yields a 500: malformed JSON is 400, a missing or mistyped field 422, a body
over ``max_body_bytes`` 413, an unknown capability 404, a widening attenuation 409, a missing
or wrong bearer token 401; every error is ``{"error": <code>, "reason": <text>}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chio_receipts.interceptor._errors import (
    ChioTemporalConfigError,
    ChioTemporalError,
    ScopeWidening,
    UnknownCapability,
)
from chio_receipts.interceptor._model import EvaluationRequest, receipt_to_json
from chio_receipts.interceptor._sidecar_local import LocalSidecar

__all__ = [
    "DEFAULT_MAX_BODY",
    "SidecarServer",
    "create_sidecar_app",
    "openapi_document",
    "serve_sidecar",
]

_log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 64 * 1024


class _BadRequest(Exception):
    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason


def _error(status: int, error: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": error, "reason": reason}, status_code=status)


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


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in data:
        raise _BadRequest(422, "missing_field", f"field {name!r} is required")
    value = data[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _BadRequest(422, "invalid_field", f"field {name!r} has the wrong type")
    return value


def _scope(data: dict[str, Any]) -> list[str]:
    scope: list[Any] = _field(data, "scope", list)
    if not all(isinstance(s, str) for s in scope):
        raise _BadRequest(422, "invalid_field", "field 'scope' must be a list of strings")
    return [str(s) for s in scope]


def _ttl(data: dict[str, Any], *, required: bool) -> float | None:
    if not required and data.get("ttl_seconds") is None:
        return None
    ttl = _field(data, "ttl_seconds", (int, float))
    return float(ttl)


Handler = Callable[[Request], Awaitable[Response]]


def create_sidecar_app(
    sidecar: LocalSidecar,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> Starlette:
    """The ASGI app serving ``sidecar``; ``token`` enables bearer authentication."""
    expected = f"Bearer {token}".encode() if token else None

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
            except UnknownCapability as exc:
                return _error(404, "unknown_capability", str(exc))
            except ScopeWidening as exc:
                return _error(409, "scope_widening", str(exc))
            except ChioTemporalConfigError as exc:
                return _error(422, "invalid_capability", str(exc))
            except (KeyError, TypeError, ValueError) as exc:
                return _error(422, "invalid_field", f"invalid request: {exc!s}")

        return endpoint

    async def create(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        subject = _field(data, "subject", str)
        scope = _scope(data)
        ttl = _ttl(data, required=True)
        assert ttl is not None  # noqa: S101 - required
        parent = data.get("parent_id")
        if parent is not None and not isinstance(parent, str):
            raise _BadRequest(422, "invalid_field", "field 'parent_id' must be a string")
        cap = sidecar.mint(subject, scope, ttl, parent_id=parent)
        return JSONResponse(cap.to_json(), status_code=201)

    async def get(request: Request) -> Response:
        cap = await sidecar.get_capability(request.path_params["cap_id"])
        return JSONResponse(cap.to_json())

    async def attenuate(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        cap = sidecar.derive(
            request.path_params["cap_id"],
            scope=_scope(data),
            ttl_seconds=_ttl(data, required=False),
        )
        return JSONResponse(cap.to_json(), status_code=201)

    async def revoke(request: Request) -> Response:
        sidecar.revoke_now(request.path_params["cap_id"])
        return JSONResponse({"revoked": request.path_params["cap_id"]})

    async def evaluate(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        for name in ("capability_id", "tool_server", "tool"):
            _field(data, name, str)
        try:
            req = EvaluationRequest.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise _BadRequest(422, "invalid_field", f"invalid evaluation request: {exc}") from None
        signed = sidecar.evaluate_now(req)
        return JSONResponse(
            {
                "receipt": receipt_to_json(signed.receipt),
                "body": base64.b64encode(signed.body).decode("ascii"),
            }
        )

    async def keys(request: Request) -> Response:
        pub = await sidecar.public_keys()
        return JSONResponse(
            {
                "current": sidecar.key_id,
                "keys": [
                    {"key_id": k, "algorithm": "Ed25519", "public_key": v.hex()}
                    for k, v in sorted(pub.items())
                ],
            }
        )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "key_id": sidecar.key_id})

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            return _error(exc.status_code, code, str(exc.detail))
        return _error(400, "bad_request", "bad request")

    async def internal_error(request: Request, exc: Exception) -> Response:
        _log.exception("sidecar request failed", exc_info=exc)
        if isinstance(exc, ChioTemporalError):
            return _error(422, "invalid_request", str(exc))
        return _error(500, "internal", "internal error")

    routes = [
        Route("/v1/capabilities", guarded(create), methods=["POST"]),
        Route("/v1/capabilities/{cap_id}", guarded(get), methods=["GET"]),
        Route("/v1/capabilities/{cap_id}/attenuate", guarded(attenuate), methods=["POST"]),
        Route("/v1/capabilities/{cap_id}/revoke", guarded(revoke), methods=["POST"]),
        Route("/v1/evaluate", guarded(evaluate), methods=["POST"]),
        Route("/v1/keys", guarded(keys, auth=False), methods=["GET"]),
        Route("/healthz", guarded(healthz, auth=False), methods=["GET"]),
        Route("/openapi.json", guarded(openapi, auth=False), methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )


def _err_schema() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/Error"}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the sidecar API."""

    def errors(*codes: int) -> dict[str, Any]:
        return {
            str(c): {
                "description": "error",
                "content": {"application/json": {"schema": _err_schema()}},
            }
            for c in codes
        }

    def ok(code: int, ref: str, description: str) -> dict[str, Any]:
        return {
            str(code): {
                "description": description,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
                },
            }
        }

    def body(ref: str) -> dict[str, Any]:
        return {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }

    cap_id = [{"name": "cap_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    str_list = {"type": "array", "items": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "chio policy sidecar",
            "version": "1",
            "description": "Capabilities, attenuation, and Ed25519-signed allow/deny receipts "
            "for Temporal activity attempts. Errors are {error, reason} objects; "
            "authenticated endpoints take 'Authorization: Bearer <token>' when configured.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "reason"],
                    "properties": {"error": {"type": "string"}, "reason": {"type": "string"}},
                },
                "CreateCapability": {
                    "type": "object",
                    "required": ["subject", "scope", "ttl_seconds"],
                    "properties": {
                        "subject": {"type": "string"},
                        "scope": str_list,
                        "ttl_seconds": {"type": "number", "exclusiveMinimum": 0},
                        "parent_id": {"type": ["string", "null"]},
                    },
                },
                "Attenuate": {
                    "type": "object",
                    "required": ["scope"],
                    "properties": {
                        "scope": str_list,
                        "ttl_seconds": {"type": ["number", "null"]},
                    },
                },
                "Capability": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "subject": {"type": "string"},
                        "scope": str_list,
                        "issued_at": {"type": "integer", "description": "µs since epoch"},
                        "expires_at": {"type": "integer", "description": "µs since epoch"},
                        "parent_id": {"type": ["string", "null"]},
                        "chain": str_list,
                        "issuer_key_id": {"type": "string"},
                    },
                },
                "EvaluationRequest": {
                    "type": "object",
                    "required": ["capability_id", "tool_server", "tool"],
                    "properties": {
                        **{
                            n: {"type": "string"}
                            for n in (
                                "capability_id",
                                "tool_server",
                                "tool",
                                "namespace",
                                "workflow_id",
                                "run_id",
                                "workflow_type",
                                "task_queue",
                                "activity_id",
                                "activity_type",
                                "argument_digest",
                                "argument_key_id",
                                "worker_identity",
                            )
                        },
                        "attempt": {"type": "integer"},
                        "is_local": {"type": "boolean"},
                        "scheduled_at": {"type": "integer"},
                        "started_at": {"type": "integer"},
                        "prev_hash": {"type": "string", "description": "hex"},
                        "deny_reason": {
                            "type": ["string", "null"],
                            "description": "ask for a signed deny; never yields an allow",
                        },
                    },
                },
                "Evaluation": {
                    "type": "object",
                    "required": ["receipt", "body"],
                    "properties": {
                        "receipt": {
                            "type": "object",
                            "description": "StepReceipt fields (Avro schema StepReceipt); "
                            "prev_hash and signature as hex",
                        },
                        "body": {
                            "type": "string",
                            "description": "base64 of the signed schemaless Avro body",
                        },
                    },
                },
                "Keys": {
                    "type": "object",
                    "properties": {
                        "current": {"type": "string"},
                        "keys": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "key_id": {"type": "string"},
                                    "algorithm": {"const": "Ed25519"},
                                    "public_key": {"type": "string", "description": "hex"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/capabilities": {
                "post": {
                    "summary": "Mint a capability",
                    "requestBody": body("CreateCapability"),
                    "responses": {
                        **ok(201, "Capability", "minted"),
                        **errors(400, 401, 404, 409, 413, 422),
                    },
                }
            },
            "/v1/capabilities/{cap_id}": {
                "get": {
                    "summary": "Read a capability",
                    "parameters": cap_id,
                    "responses": {**ok(200, "Capability", "the capability"), **errors(401, 404)},
                }
            },
            "/v1/capabilities/{cap_id}/attenuate": {
                "post": {
                    "summary": "Mint a child with a subset of the parent's scope",
                    "parameters": cap_id,
                    "requestBody": body("Attenuate"),
                    "responses": {
                        **ok(201, "Capability", "minted"),
                        **errors(400, 401, 404, 409, 413, 422),
                    },
                }
            },
            "/v1/capabilities/{cap_id}/revoke": {
                "post": {
                    "summary": "Revoke a capability and its descendants",
                    "parameters": cap_id,
                    "responses": {"200": {"description": "revoked"}, **errors(401, 404)},
                }
            },
            "/v1/evaluate": {
                "post": {
                    "summary": "Decide one activity attempt and sign the receipt",
                    "requestBody": body("EvaluationRequest"),
                    "responses": {
                        **ok(200, "Evaluation", "signed receipt (ALLOW or DENY)"),
                        **errors(400, 401, 413, 422),
                    },
                }
            },
            "/v1/keys": {
                "get": {
                    "summary": "Public keys",
                    "security": [],
                    "responses": ok(200, "Keys", "keys"),
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI document"}},
                }
            },
        },
    }


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without signal capture: the embedding process owns its signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SidecarServer:
    """Serve a :class:`LocalSidecar` over HTTP inside the running event loop.

    An idempotent async context manager. ``port=0`` picks a free port; the bound port stays the
    same across :meth:`stop` / :meth:`start`, so a client can see the sidecar go away and come
    back. Listens on 127.0.0.1 unless told otherwise.
    """

    def __init__(
        self,
        sidecar: LocalSidecar,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        shutdown_timeout: float = 5.0,
    ) -> None:
        self.sidecar = sidecar
        self.host = host
        self.port = port
        self._app = create_sidecar_app(sidecar, token=token, max_body_bytes=max_body_bytes)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._shutdown_timeout = shutdown_timeout

    def __repr__(self) -> str:
        return f"SidecarServer({self.url!r}, running={self.running})"

    @property
    def url(self) -> str:
        """Base URL of the served API."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server task runs."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Bind and start serving (no-op when running)."""
        if self.running:
            return
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted sockets whose proto
        # says TCP, and without it every response waits ~40 ms on Nagle + delayed ACK.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5
        )
        server = _EmbeddedServer(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with asyncio.timeout(10):
                while not server.started:
                    if self._task.done():
                        await self._task
                        raise RuntimeError("the sidecar server stopped during startup")
                    await asyncio.sleep(0.01)
        finally:
            if not server.started:
                sock.close()

    async def stop(self) -> None:
        """Stop serving and close connections (idempotent, bounded by ``shutdown_timeout``)."""
        server, task = self._server, self._task
        self._server, self._task = None, None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            async with asyncio.timeout(self._shutdown_timeout):
                await task
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve_sidecar(
    sidecar: LocalSidecar,
    *,
    host: str = "127.0.0.1",
    port: int = 9090,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    log_level: str = "info",
) -> None:
    """Serve ``sidecar`` until SIGINT/SIGTERM (the ``sidecar serve`` command)."""
    app = create_sidecar_app(sidecar, token=token, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="off", timeout_keep_alive=5
    )
    await uvicorn.Server(config).serve()
