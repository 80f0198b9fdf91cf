"""The sidecar's HTTP API: a :class:`LocalSidecar` behind a Starlette app.

Endpoints (JSON; OpenAPI 3.1 document at ``GET /openapi.json``, built from ``_api``):

    POST /v1/capabilities                  mint a capability
    GET  /v1/capabilities/{id}             read a capability
    POST /v1/capabilities/{id}/attenuate   mint a narrower child
    POST /v1/capabilities/{id}/revoke      revoke (descendants follow through their chain)
    POST /v1/evaluate                      decide one attempt and sign its receipt
    POST /v1/outcomes                      sign how one attempt ended (an outcome record)
    GET  /v1/keys                          Ed25519 public keys by key id
    POST /v1/keys/rotate                   rotate to a fresh signing key (admin)
    GET  /healthz, /livez                  liveness
    GET  /readyz                           readiness (503: store not writable, key not published)
    GET  /metrics                          Prometheus metrics (text exposition format)

and the Chio kernel's routes (chio-api-protect 0.1.2 shapes, ``{"error", "message"}`` errors):

    GET  /chio/health, /chio/live          readiness (503 when the store fails), liveness
    POST /v1/capabilities/mint             mint a signed Chio token from scope strings
    POST /v1/capabilities/validate         validate a token (200 with valid true/false)
    POST /v1/capabilities/release          revoke a token (durable)
    POST /v1/capabilities/attenuate        a narrower child token (the kernel refuses: 403)
    POST /v1/receipts/verify               verify a kernel receipt signed by this sidecar
    GET  /approvals/pending                pending approval requests (role: operator)
    GET  /approvals/{id}                   a request, or its resolution (role: operator)
    POST /approvals/{id}/respond           approve or deny; the approver is the credential
    POST /v1/reconcile                     settle a budget hold at its realized cost

and the budget refund of a decision (saga compensation's ``reverse_budget_charge``):

    POST /v1/budgets/reverse               refund one decision's budget charge, exactly once

``POST /v1/capabilities`` and ``POST /v1/evaluate`` take the project's body or the kernel's
(``scope`` object / ``scopes`` list; ``capability`` token / ``capability_id`` + ``tool_name``)
and answer in the shape of the body they got.

Request bodies are validated with the document's pydantic models. Bad input never yields a
500: malformed JSON is 400, a body that is not an object, a missing or mistyped field 422, a
body over ``max_body_bytes`` 413, an unknown capability 404, a widening attenuation 409, a
refused capability request 422, a store that cannot be written 503 (nothing is handed out that
was not stored); every error is ``{"error": <code>, "reason": <text>}``.

Who may call which route is decided before the route runs, by the access middleware and its one
route → role table (``_access``): 401 for a missing or wrong credential, 403 for a credential
whose role may not call the route. Handlers read the caller with ``_auth.credential_of``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from chio_receipts.schemas import (
    ChioReceiptsError,
    KeyPair,
    Verdict,
    chio_step_fields,
    parameter_hash,
    receipt_to_json,
    verify_kernel_receipt,
)
from chio_receipts.sidecar import _budgets, _chio
from chio_receipts.sidecar._access import AccessControl
from chio_receipts.sidecar._api import (
    OPERATIONS,
    ApprovalRespond,
    Attenuate,
    BudgetReverse,
    BudgetReversed,
    Capability,
    ChioAttenuate,
    ChioCreateCapability,
    ChioEvaluate,
    ChioHealth,
    ChioMint,
    ChioReconcile,
    ChioRelease,
    ChioSdkEvaluate,
    ChioValidate,
    CreateCapability,
    Error,
    Evaluation,
    EvaluationRequestBody,
    Health,
    KeyRotation,
    Keys,
    OutcomeBody,
    OutcomeRecord,
    PublicKey,
    Readiness,
    ReceiptReconcile,
    Revoked,
    openapi_document,
)
from chio_receipts.sidecar._approvals import Approval
from chio_receipts.sidecar._auth import CredentialSet, Role, credential_of, with_token
from chio_receipts.sidecar._chio import ChioRequestError
from chio_receipts.sidecar._datadir import DataDir, key_id_for, rotate_key
from chio_receipts.sidecar._errors import (
    InvalidCapability,
    ScopeWidening,
    SidecarError,
    StoreError,
    UnknownCapability,
)
from chio_receipts.sidecar._local import ChioDecision, LocalSidecar
from chio_receipts.sidecar._metrics import CONTENT_TYPE, SidecarMetrics

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


def _chio_error(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status)


def _chio_body(model: type[_Model], data: Mapping[str, Any]) -> _Model:
    """``data`` as ``model`` on a kernel route: any failure is 400 ``chio_bad_request``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False, include_context=False)[0]
        name = ".".join(str(part) for part in first["loc"])
        raise ChioRequestError(
            400, "chio_bad_request", f"invalid payload: field {name!r}: {first['msg']}"
        ) from None


def _ttl(ttl_seconds: int | None, ttl_nanos: int | None = None) -> int:
    # The kernel's rule: ttl_seconds if non-zero, else ttl_nanos rounded up, else one hour.
    if ttl_seconds:
        return ttl_seconds
    if ttl_nanos:
        return -(-ttl_nanos // 1_000_000_000)
    return 3600


def _guard_of(decision: ChioDecision) -> str | None:
    return None if decision.allowed else decision.guard


def _verdict_of(decision: ChioDecision) -> str | None:
    """``pending`` for a call held for a person's approval (its receipt is a deny)."""
    return "pending" if decision.approval_id else None


def _decision_label(decision: object) -> str:
    if isinstance(decision, Mapping) and isinstance(decision.get("verdict"), str):
        return str(decision["verdict"])
    return "none"


def _hex64(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _verify_report(
    receipt: Mapping[str, Any], trusted: set[str], expected: Mapping[str, Any]
) -> dict[str, Any]:
    """The kernel's ``/v1/receipts/verify`` report (``sidecar_verify_receipt_handler``)."""
    found = verify_kernel_receipt(receipt)
    if found.kernel_key is None:
        raise ChioRequestError(
            400, "chio_bad_request", f"invalid receipt verify payload: {found.reason}"
        )
    signer_trusted = found.kernel_key in trusted
    semantic = (
        receipt.get("receipt_kind") == "mediated_decision"
        and receipt.get("boundary_class") == "prevent"
        and receipt.get("observation_outcome") is None
        and receipt.get("trust_level") == "mediated"
    )
    result = _decision_label(receipt.get("decision"))
    ok = (
        found.signature_valid
        and signer_trusted
        and found.receipt_id_valid
        and found.parameter_hash_valid
        and _hex64(receipt.get("content_hash"))
        and _hex64(receipt.get("policy_hash"))
        and semantic
    )
    reason: str | None = None
    if not found.signature_valid:
        reason = "receipt signature did not verify"
    elif not signer_trusted:
        reason = "receipt signer is not trusted"
    elif (want := str(expected.get("expected_decision") or "").strip()) and want != result:
        ok, reason = False, f"decision {result} does not match expected {want}"
    elif (
        want := str(expected.get("expected_capability_id") or "").strip()
    ) and want != receipt.get("capability_id"):
        ok, reason = False, "receipt capability_id does not match expected_capability_id"
    elif not ok:
        if not found.receipt_id_valid:
            reason = "receipt id does not match body"
        elif not found.parameter_hash_valid:
            reason = "receipt action parameter_hash does not match parameters"
        elif not semantic:
            reason = "receipt semantics are not authoritative"
    report: dict[str, Any] = {
        "signature_valid": found.signature_valid,
        "signer_trusted": signer_trusted,
        "receipt_id_valid": found.receipt_id_valid,
        "parameter_hash_valid": found.parameter_hash_valid,
        "receipt_kind": receipt.get("receipt_kind"),
        "boundary_class": receipt.get("boundary_class"),
        "trust_level": receipt.get("trust_level"),
        "result": result,
        "authorized": ok and result == "allow",
        "signer_key_hex": found.kernel_key,
        "ok": ok,
        "valid": ok,
    }
    if reason is not None:
        report["reason"] = reason
    report["decision"] = result
    report["signed_at"] = receipt.get("timestamp")
    report["receipt_id"] = receipt.get("id")
    return report


def _json(model: BaseModel, status: int) -> Response:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


Handler = Callable[[Request], Awaitable[Response]]


def _parameter_hashes(parameters: object) -> set[str]:
    """Hashes a client may send: the kernel's (RFC 8785) and chio-sdk-python's, which hashes
    ``json.dumps(sort_keys=True, ensure_ascii=True)`` and differs on floats and non-ASCII."""
    out = set()
    with contextlib.suppress(ChioReceiptsError):
        out.add(parameter_hash(parameters))
    try:
        sdk = json.dumps(parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        out.add(hashlib.sha256(sdk.encode()).hexdigest())
    except (TypeError, ValueError):
        pass
    return out


def _sdk_answer(decision: ChioDecision) -> Response:
    """chio-sdk-python's shape: the bare receipt on allow; on deny a 403 its client turns into
    ``ChioDeniedError``, with the signed receipt kept in the body."""
    if decision.allowed:
        return JSONResponse(decision.receipt)
    return JSONResponse(
        {
            "error": "chio_capability_revoked" if decision.revoked else "chio_denied",
            "message": decision.reason,
            "guard": decision.guard,
            "reason": decision.reason,
            "receipt": decision.receipt,
        },
        status_code=403,
    )


def _fresh_key() -> KeyPair:
    seed = os.urandom(32)
    return KeyPair.from_seed(key_id_for(KeyPair.from_seed("", seed).public_key), seed)


def create_sidecar_app(
    sidecar: LocalSidecar,
    *,
    credentials: CredentialSet | None = None,
    token: str | None = None,
    data_dir: DataDir | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    metrics: SidecarMetrics | None = None,
) -> Starlette:
    """The ASGI app serving ``sidecar``.

    ``credentials`` (named, hashed; see ``_auth``) are what the access middleware accepts;
    without any, loopback callers are admin and other callers are refused. ``token`` is the
    deprecated single shared token: it is accepted as the admin credential ``token``.
    ``data_dir`` is where ``POST /v1/keys/rotate`` records a new key (in memory without one).
    ``metrics`` (a private :class:`SidecarMetrics` by default; ``app.state.metrics``) counts
    what the app decides, mints, revokes, fails to store and refuses; ``GET /metrics`` serves it.
    """
    meter = metrics if metrics is not None else SidecarMetrics()
    meter.watch_key(lambda: sidecar.key_id)
    meter.watch_policy(lambda: sidecar.policy_hash)
    credentials = with_token(credentials, token)
    status = {op.name: op.status for op in OPERATIONS}
    # Serialized once: the document is static, and the same object the tests compare with.
    document = json.dumps(openapi_document()).encode()

    def guarded(fn: Handler, name: str) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except _BadRequest as exc:
                return _error(exc.status, exc.error, exc.reason)
            except ChioRequestError as exc:
                return _chio_error(exc.status, exc.error, exc.message)
            except ChioReceiptsError as exc:
                if isinstance(exc, StoreError):
                    meter.store_errors.labels(operation=name).inc()
                code, error = _wire_error(exc)
                return _error(code, error, str(exc))

        return endpoint

    async def chio_call(make: Callable[[], Awaitable[Response]], name: str) -> Response:
        try:
            return await make()
        except _BadRequest as exc:
            return _chio_error(400, "chio_bad_request", exc.reason)
        except ChioRequestError as exc:
            return _chio_error(exc.status, exc.error, exc.message)
        except StoreError as exc:
            meter.store_errors.labels(operation=name).inc()
            return _chio_error(503, "chio_store_unavailable", str(exc))
        except UnknownCapability as exc:
            return _chio_error(404, "chio_capability_not_found", str(exc))
        except ChioReceiptsError as exc:
            return _chio_error(400, "chio_bad_request", str(exc))

    def chio_route(fn: Handler, name: str) -> Handler:
        async def endpoint(request: Request) -> Response:
            return await chio_call(lambda: fn(request), name)

        return endpoint

    async def read_any(request: Request) -> tuple[dict[str, Any] | None, _BadRequest | None]:
        # The body of a route shared by the project's and the kernel's shapes, or why it could
        # not be read (the project's handler then answers with its own error).
        try:
            return await _read_json(request, max_body_bytes), None
        except _BadRequest as exc:
            return None, exc

    async def create_capability(request: Request) -> Response:
        data, unreadable = await read_any(request)
        if data is not None and ("scopes" in data or isinstance(data.get("scope"), dict)):
            kernel_body = data
            return await chio_call(lambda: chio_create(kernel_body), "create_capability")
        if data is None:
            raise unreadable or _BadRequest(400, "bad_request", "bad request")
        body = _validate(CreateCapability, data)
        cap = sidecar.mint(body.subject, body.scope, body.ttl_seconds, parent_id=body.parent_id)
        meter.minted.labels(family="project").inc()
        return _json(Capability.of(cap), status["create_capability"])

    async def get_capability(request: Request) -> Response:
        cap = await sidecar.get_capability(request.path_params["cap_id"])
        return _json(Capability.of(cap, sidecar.chio_token(cap.id)), status["get_capability"])

    async def attenuate(request: Request) -> Response:
        body = _validate(Attenuate, await _read_json(request, max_body_bytes))
        cap = sidecar.derive(
            request.path_params["cap_id"], scope=body.scope, ttl_seconds=body.ttl_seconds
        )
        meter.minted.labels(family="project").inc()
        return _json(Capability.of(cap), status["attenuate"])

    async def revoke(request: Request) -> Response:
        cap_id = request.path_params["cap_id"]
        sidecar.revoke_now(cap_id)
        meter.revoked.labels(family="project").inc()
        return _json(Revoked(revoked=cap_id), status["revoke"])

    async def evaluate(request: Request) -> Response:
        data, unreadable = await read_any(request)
        if data is not None and "capability" in data:
            mediated = data
            return await chio_call(lambda: chio_mediated(mediated), "evaluate")
        if data is not None and "tool_name" in data and "tool" not in data:
            sdk_body = data
            return await chio_call(lambda: chio_sdk_evaluate(sdk_body), "evaluate")
        if data is None:
            raise unreadable or _BadRequest(400, "bad_request", "bad request")
        body = _validate(EvaluationRequestBody, data)
        started = time.perf_counter()
        signed = sidecar.evaluate_now(body.to_request())
        allowed = signed.receipt.verdict is Verdict.ALLOW
        guard = None if allowed else chio_step_fields(signed.receipt).guard
        pending = signed.receipt.verdict is Verdict.PENDING_APPROVAL
        meter.decision(
            "project", allowed, started, guard=guard, verdict="pending" if pending else None
        )
        answer = Evaluation(
            receipt=receipt_to_json(signed.receipt),
            body=base64.b64encode(signed.body).decode("ascii"),
        )
        return _json(answer, status["evaluate"])

    async def outcomes(request: Request) -> Response:
        body = _validate(OutcomeBody, await _read_json(request, max_body_bytes))
        started = time.perf_counter()
        signed = sidecar.record_outcome_now(body.to_outcome())
        meter.outcome(signed.status.value, started)
        return _json(OutcomeRecord.of(signed), status["outcomes"])

    async def keys(request: Request) -> Response:
        pub = await sidecar.public_keys()
        answer = Keys(
            current=sidecar.key_id,
            keys=[PublicKey(key_id=k, public_key=v.hex()) for k, v in sorted(pub.items())],
        )
        return _json(answer, status["keys"])

    async def healthz(request: Request) -> Response:
        return _json(Health(key_id=sidecar.key_id), status["healthz"])

    async def livez(request: Request) -> Response:
        return _json(Health(key_id=sidecar.key_id), status["livez"])

    def readiness() -> dict[str, str]:
        # Open to anyone: the answer names the failed check, the log says why (paths, errors).
        checks = {"store": "ok", "signing_key": "ok"}
        try:
            sidecar.store.check_writable()
        except StoreError as exc:
            meter.store_error("readyz")
            _log.warning("not ready: the store cannot be written: %s", exc)
            checks["store"] = "cannot be written"
        try:
            published = sidecar.store.keys()
            current = [k.key_id for k in published if k.retired_at is None]
            if current != [sidecar.key_id]:
                checks["signing_key"] = "not published"
        except StoreError as exc:
            _log.warning("not ready: the published keys cannot be read: %s", exc)
            checks["signing_key"] = "published keys cannot be read"
        if data_dir is not None and not data_dir.seed_path.is_file():
            _log.warning("not ready: the signing key seed %s is missing", data_dir.seed_path)
            checks["signing_key"] = "seed file missing"
        return checks

    async def readyz(request: Request) -> Response:
        checks = readiness()
        ready = all(v == "ok" for v in checks.values())
        body = Readiness(
            status="ready" if ready else "not_ready", key_id=sidecar.key_id, checks=checks
        )
        return _json(body, status["readyz"] if ready else 503)

    async def keys_rotate(request: Request) -> Response:
        old = sidecar.key_id
        if data_dir is not None:
            rotate_key(data_dir, signal_server=False)
            key = data_dir.signing_key()
        else:
            key = _fresh_key()
        sidecar.use_key(key)
        who = credential_of(request).name
        _log.info("signing key rotated %s -> %s by credential %s", old, key.key_id, who)
        answer = KeyRotation(old_key_id=old, current=key.key_id, public_key=key.public_key.hex())
        return _json(answer, status["keys_rotate"])

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    async def metrics_text(request: Request) -> Response:
        return Response(meter.exposition(), headers={"content-type": CONTENT_TYPE})

    # -- the Chio kernel's routes ------------------------------------------------------------

    def chio_health_body() -> tuple[int, ChioHealth]:
        durable = sidecar.durable
        try:
            sidecar.store.ping()
            state, code = "healthy", 200
        except StoreError:
            meter.store_errors.labels(operation="chio_health").inc()
            state, code = "unhealthy", 503
        return code, ChioHealth(
            status=state,  # type: ignore[arg-type]
            version=_chio.KERNEL_VERSION,
            receipt_backend="durable" if durable else "ephemeral",
            revocation_backend="sqlite" if durable else "memory",
        )

    async def chio_health(request: Request) -> Response:
        code, body = chio_health_body()
        return _json(body, code)

    async def chio_live(request: Request) -> Response:
        body = ChioHealth(
            status="healthy",
            version=_chio.KERNEL_VERSION,
            receipt_backend="",
            revocation_backend="",
        )
        return _json(body, 200)

    async def chio_create(data: Mapping[str, Any]) -> Response:
        if isinstance(data.get("scope"), dict):
            sdk = _chio_body(ChioCreateCapability, data)
            scope = _chio.normalize_scope(data["scope"])
            token = sidecar.chio_mint(sdk.subject, scope, _ttl(sdk.ttl_seconds), sdk.job_uid)
            meter.minted.labels(family="sdk").inc()
            # chio-sdk-python parses the answer with its own model, which only knows
            # PascalCase operations: it gets the same token in its spelling (see README).
            return JSONResponse(_chio.sdk_spelling(token))
        body = _chio_body(ChioMint, data)
        scope = _chio.parse_scope_strings(body.scopes)
        token = sidecar.chio_mint(
            body.subject, scope, _ttl(body.ttl_seconds, body.ttl_nanos), body.job_uid
        )
        meter.minted.labels(family="kernel").inc()
        return JSONResponse(token)

    async def chio_mint(request: Request) -> Response:
        body = _chio_body(ChioMint, await _read_json(request, max_body_bytes))
        scope = _chio.parse_scope_strings(body.scopes)
        token = sidecar.chio_mint(
            body.subject, scope, _ttl(body.ttl_seconds, body.ttl_nanos), body.job_uid
        )
        meter.minted.labels(family="kernel").inc()
        return JSONResponse({"capability": token})

    async def chio_validate(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        body = _chio_body(ChioValidate, data)
        token = {k: v for k, v in data.items() if k not in ("expected_subject", "expected_scope")}
        valid, reason = sidecar.chio_validate(
            token, expected_subject=body.expected_subject, expected_scope=body.expected_scope
        )
        answer: dict[str, Any] = {"valid": valid}
        if reason is not None:
            answer["reason"] = reason
        answer["expires_at"] = body.expires_at
        answer["capability_id"] = body.id
        return JSONResponse(answer)

    async def chio_release(request: Request) -> Response:
        body = _chio_body(ChioRelease, await _read_json(request, max_body_bytes))
        sidecar.chio_release(body.capability_id)
        meter.revoked.labels(family="kernel").inc()
        return JSONResponse({"released": True})

    async def chio_attenuate(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        _chio_body(ChioAttenuate, data)
        child = sidecar.chio_attenuate(data["parent_token"], data["new_scope"])
        meter.minted.labels(family="kernel").inc()
        # Answered in the spelling of the parent as sent (chio-sdk-python sends its own).
        sent = data["parent_token"].get("scope", {})
        sdk = any(
            op in ("Invoke", "ReadResult", "Read", "Subscribe", "Get", "Delegate")
            for grant in sent.get("grants", [])
            if isinstance(sent, dict)
            for op in (grant.get("operations") or [] if isinstance(grant, dict) else [])
        )
        return JSONResponse(_chio.sdk_spelling(child) if sdk else child)

    async def chio_verify_receipt(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        return JSONResponse(_verify_report(data, sidecar.trusted_keys(), data))

    async def chio_mediated(data: Mapping[str, Any]) -> Response:
        body = _chio_body(ChioEvaluate, data)
        started = time.perf_counter()
        decision = sidecar.chio_evaluate(
            token=data["capability"],
            tool_server=body.tool_server,
            tool_name=body.tool_name,
            parameters=data.get("parameters", {}),
            request_id=body.request_id,
        )
        meter.decision(
            "kernel",
            decision.allowed,
            started,
            guard=_guard_of(decision),
            verdict=_verdict_of(decision),
        )
        if decision.revoked:
            # The kernel's 403 for a revoked capability; the signed deny receipt rides along.
            return JSONResponse(
                {
                    "error": "chio_capability_revoked",
                    "message": decision.reason,
                    "receipt": decision.receipt,
                },
                status_code=403,
            )
        return JSONResponse(
            {
                "status": "authorized" if decision.allowed else "deny",
                "receipt": decision.receipt,
                "execution_nonce": decision.execution_nonce,
            }
        )

    async def chio_sdk_evaluate(data: Mapping[str, Any]) -> Response:
        body = _chio_body(ChioSdkEvaluate, data)
        parameters = data.get("parameters", {})
        if body.parameter_hash is not None and body.parameter_hash not in _parameter_hashes(
            parameters
        ):
            raise ChioRequestError(
                400, "chio_bad_request", "parameter_hash does not match parameters"
            )
        started = time.perf_counter()
        decision = sidecar.chio_evaluate(
            capability_id=body.capability_id,
            tool_server=body.tool_server,
            tool_name=body.tool_name,
            parameters=parameters,
        )
        meter.decision(
            "sdk",
            decision.allowed,
            started,
            guard=_guard_of(decision),
            verdict=_verdict_of(decision),
        )
        return _sdk_answer(decision)

    # -- approvals (the kernel's /approvals routes; role operator) ----------------------------

    def query_int(request: Request, name: str) -> int | None:
        raw = request.query_params.get(name)
        if raw is None:
            return None
        if not raw.isdigit():
            raise ChioRequestError(400, "bad_request", f"query parameter {name!r} must be a number")
        return int(raw)

    async def approvals_pending(request: Request) -> Response:
        q = request.query_params
        found = sidecar.approvals.pending(
            tool_server=q.get("tool_server"),
            tool_name=q.get("tool_name"),
            workflow_id=q.get("workflow_id"),
            receipt_id=q.get("receipt_id"),
            not_expired_at=query_int(request, "not_expired_at"),
            limit=query_int(request, "limit"),
        )
        views = [a.request_view() for a in found]
        return JSONResponse({"approvals": views, "count": len(views)})

    async def approval_get(request: Request) -> Response:
        approval = sidecar.approvals.get(request.path_params["approval_id"])
        answer: dict[str, Any] = {"request": approval.request_view()}
        if approval.state == "pending":
            answer["pending"] = approval.request_view()
        resolution = approval.resolution_view()
        if resolution is not None:
            answer["resolution"] = resolution
        return JSONResponse(answer)

    async def approval_respond(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        if "approver" in data or "token" in data:
            raise ChioRequestError(
                400,
                "bad_request",
                "the approver is the authenticated credential; the body names none",
            )
        body = _chio_body(ApprovalRespond, data)
        answered: Approval = sidecar.approvals.respond(
            request.path_params["approval_id"],
            approved=body.outcome == "approved",
            approver=credential_of(request).name,
            reason=body.reason or "",
            policy_hash=sidecar.policy_hash,
        )
        signalled = await sidecar.approvals.notify(answered)
        return JSONResponse(
            {
                "approval_id": answered.approval_id,
                "outcome": answered.outcome,
                "resolved_at": answered.resolved_at,
                "approver": answered.approver,
                "receipt": dict(answered.decision_receipt or {}),
                "workflow_id": answered.workflow_id,
                "run_id": answered.run_id,
                "signalled": signalled,
            }
        )

    # -- budgets: settlement at the realized cost and refunds (see _budgets) ------------------

    async def reconcile(request: Request) -> Response:
        data = await _read_json(request, max_body_bytes)
        if "execution_nonce" in data:
            kernel = _chio_body(ChioReconcile, data)
            receipt = _budgets.reconcile(
                sidecar,
                realized_units=kernel.realized_cost.units,
                currency=kernel.realized_cost.currency,
                execution_nonce=kernel.execution_nonce,
                arguments=data.get("arguments", {}),
            )
        else:
            project = _chio_body(ReceiptReconcile, data)
            receipt = _budgets.reconcile(
                sidecar,
                realized_units=project.realized_cost.units,
                currency=project.realized_cost.currency,
                receipt_id=project.receipt_id,
            )
        return JSONResponse({"status": "reconciled", "receipt": receipt})

    async def budget_reverse(request: Request) -> Response:
        body = _validate(BudgetReverse, await _read_json(request, max_body_bytes))
        who = credential_of(request)
        if who.role is Role.WORKER and not (body.workflow_id and body.run_id):
            raise _BadRequest(
                422, "missing_field", "a worker refunds its run's charges: name workflow_id, run_id"
            )
        run = (body.workflow_id, body.run_id) if body.workflow_id and body.run_id else None
        try:
            done = _budgets.reverse(sidecar, body.receipt_id, run=run, reversed_by=who.name)
        except _budgets.ReversalRefused as exc:
            return _error(exc.status, exc.error, exc.reason)
        answer = BudgetReversed(
            status="reversed" if done.refunded else "already_reversed",
            refunded=done.refunded,
            receipt_id=body.receipt_id,
            hold_id=done.charge.hold_id,
            capability_id=done.charge.capability_id,
            refunded_units=done.refunded_units,
            refunded_invocations=1 if done.refunded else 0,
            currency=done.charge.currency,
            refund_receipt_id=done.refund_receipt_id,
            receipt=done.receipt,
        )
        return _json(answer, status["budget_reverse"])

    handlers: dict[str, Handler] = {
        "create_capability": create_capability,
        "get_capability": get_capability,
        "attenuate": attenuate,
        "revoke": revoke,
        "evaluate": evaluate,
        "outcomes": outcomes,
        "keys": keys,
        "healthz": healthz,
        "livez": livez,
        "readyz": readyz,
        "keys_rotate": keys_rotate,
        "openapi": openapi,
        "metrics": metrics_text,
        "chio_health": chio_health,
        "chio_live": chio_live,
        "chio_mint": chio_mint,
        "chio_validate": chio_validate,
        "chio_release": chio_release,
        "chio_attenuate": chio_attenuate,
        "chio_verify_receipt": chio_verify_receipt,
        "approvals_pending": approvals_pending,
        "approval_get": approval_get,
        "approval_respond": approval_respond,
        "reconcile": reconcile,
        "budget_reverse": budget_reverse,
    }

    def endpoint_for(op: Any) -> Handler:
        # Who may call it is the access middleware's (one table, before routing).
        if op.chio:
            return chio_route(handlers[op.name], op.name)
        return guarded(handlers[op.name], op.name)

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            return _error(exc.status_code, code, str(exc.detail))
        return _error(400, "bad_request", "bad request")

    async def internal_error(request: Request, exc: Exception) -> Response:
        _log.exception("sidecar request failed", exc_info=exc)
        return _error(500, "internal", "internal error")

    routes = [
        Route(op.path, endpoint_for(op), methods=[op.method], name=op.name) for op in OPERATIONS
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(AccessControl, credentials=credentials, on_refused=meter.auth_failure)
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    app.state.metrics = meter
    app.state.credentials = credentials
    return app
