"""The sidecar's HTTP API as data: typed bodies, the operation table, the OpenAPI document.

Pure: no server and no sidecar state. The app (``_app``) serves exactly :data:`OPERATIONS` and
validates request bodies with the same pydantic models the document is built from, so the
document cannot drift from what is served.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from chio_receipts.schemas import CapabilityToken, EvaluationRequest

__all__ = [
    "OPERATIONS",
    "Attenuate",
    "Capability",
    "CreateCapability",
    "Error",
    "Evaluation",
    "EvaluationRequestBody",
    "Health",
    "Keys",
    "Operation",
    "PublicKey",
    "Revoked",
    "openapi_document",
]

_INT_MAX = 2**63 - 1
_Long = Annotated[int, Field(ge=-_INT_MAX, le=_INT_MAX)]
_Micros = Annotated[int, Field(description="µs since the Unix epoch")]


class _Body(BaseModel):
    # Strict: JSON types only, no coercion ("1" is not 1, true is not a number). Unknown fields
    # are ignored so an older sidecar accepts a newer client's request.
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


# -- requests ----------------------------------------------------------------------------------


class CreateCapability(_Body):
    """Body of ``POST /v1/capabilities``."""

    subject: str
    scope: list[str]
    # The bound is the sidecar's check (422 invalid_capability), not a validation error: both
    # are refusals, but clients match on the error code.
    ttl_seconds: Annotated[float, Field(json_schema_extra={"exclusiveMinimum": 0})]
    parent_id: str | None = None


class Attenuate(_Body):
    """Body of ``POST /v1/capabilities/{cap_id}/attenuate``; no ttl keeps the parent's expiry."""

    scope: list[str]
    ttl_seconds: float | None = None


class EvaluationRequestBody(_Body):
    """Body of ``POST /v1/evaluate``: the JSON form of an ``EvaluationRequest``."""

    capability_id: str
    tool_server: str
    tool: str
    namespace: str = ""
    workflow_id: str = ""
    run_id: str = ""
    workflow_type: str = ""
    task_queue: str = ""
    activity_id: str = ""
    activity_type: str = ""
    attempt: _Long = 1
    is_local: bool = False
    argument_digest: str = ""
    argument_key_id: str = ""
    scheduled_at: _Long = 0
    started_at: _Long = 0
    worker_identity: str = ""
    prev_hash: Annotated[str, Field(pattern=r"^(?:[0-9a-fA-F]{2})*$", description="hex")] = ""
    deny_reason: Annotated[
        str | None, Field(description="ask for a signed deny; never yields an allow")
    ] = None

    def to_request(self) -> EvaluationRequest:
        """The protocol object this body describes."""
        return EvaluationRequest(
            capability_id=self.capability_id,
            tool_server=self.tool_server,
            tool=self.tool,
            namespace=self.namespace,
            workflow_id=self.workflow_id,
            run_id=self.run_id,
            workflow_type=self.workflow_type,
            task_queue=self.task_queue,
            activity_id=self.activity_id,
            activity_type=self.activity_type,
            attempt=self.attempt,
            is_local=self.is_local,
            argument_digest=self.argument_digest,
            argument_key_id=self.argument_key_id,
            scheduled_at=self.scheduled_at,
            started_at=self.started_at,
            worker_identity=self.worker_identity,
            prev_hash=bytes.fromhex(self.prev_hash),
            deny_reason=self.deny_reason,
        )


# -- responses ---------------------------------------------------------------------------------


class Capability(_Body):
    """A capability: who may call which tools until when; ``chain`` lists ancestors, root first."""

    id: str
    subject: str
    scope: list[str]
    issued_at: _Micros
    expires_at: _Micros
    parent_id: str | None
    chain: list[str]
    issuer_key_id: str

    @classmethod
    def of(cls, token: CapabilityToken) -> Capability:
        """The JSON body of ``token``."""
        return cls(
            id=token.id,
            subject=token.subject,
            scope=list(token.scope),
            issued_at=token.issued_at,
            expires_at=token.expires_at,
            parent_id=token.parent_id,
            chain=list(token.chain),
            issuer_key_id=token.issuer_key_id,
        )


class Evaluation(_Body):
    """A decided attempt: the signed receipt's fields and its wire body."""

    receipt: dict[str, Any] = Field(
        description="StepReceipt fields (Avro schema StepReceipt); prev_hash and signature as hex"
    )
    body: str = Field(description="base64 of the signed schemaless Avro body")


class PublicKey(_Body):
    """One Ed25519 public key of the sidecar."""

    key_id: str
    algorithm: Literal["Ed25519"] = "Ed25519"
    public_key: str = Field(description="hex")


class Keys(_Body):
    """The sidecar's public keys: the current signing key and retired ones."""

    current: str
    keys: list[PublicKey]


class Revoked(_Body):
    """Answer of a revocation."""

    revoked: str


class Health(_Body):
    """Liveness, with the id of the signing key."""

    status: Literal["ok"] = "ok"
    key_id: str


class Error(_Body):
    """Every error answer: a stable code to match on and a reason to read."""

    error: str
    reason: str


# -- the operation table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One route of the API: what the app serves and the document describes."""

    name: str
    method: Literal["GET", "POST"]
    path: str
    summary: str
    request: type[_Body] | None = None
    response: type[_Body] | None = None
    status: int = 200
    description: str = ""
    errors: tuple[int, ...] = ()
    auth: bool = True

    @property
    def path_params(self) -> tuple[str, ...]:
        """Names of the ``{…}`` segments of :attr:`path`."""
        return tuple(re.findall(r"\{(\w+)\}", self.path))


_BODY_ERRORS = (400, 413, 422)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        name="create_capability",
        method="POST",
        path="/v1/capabilities",
        summary="Mint a capability",
        request=CreateCapability,
        response=Capability,
        status=201,
        description="minted",
        errors=(*_BODY_ERRORS, 404, 409),
    ),
    Operation(
        name="get_capability",
        method="GET",
        path="/v1/capabilities/{cap_id}",
        summary="Read a capability",
        response=Capability,
        description="the capability",
        errors=(404,),
    ),
    Operation(
        name="attenuate",
        method="POST",
        path="/v1/capabilities/{cap_id}/attenuate",
        summary="Mint a child with a subset of the parent's scope",
        request=Attenuate,
        response=Capability,
        status=201,
        description="minted",
        errors=(*_BODY_ERRORS, 404, 409),
    ),
    Operation(
        name="revoke",
        method="POST",
        path="/v1/capabilities/{cap_id}/revoke",
        summary="Revoke a capability and its descendants",
        response=Revoked,
        description="revoked",
        errors=(404,),
    ),
    Operation(
        name="evaluate",
        method="POST",
        path="/v1/evaluate",
        summary="Decide one activity attempt and sign the receipt",
        request=EvaluationRequestBody,
        response=Evaluation,
        description="signed receipt (ALLOW or DENY)",
        errors=_BODY_ERRORS,
    ),
    Operation(
        name="keys",
        method="GET",
        path="/v1/keys",
        summary="Public keys",
        response=Keys,
        description="keys",
        auth=False,
    ),
    Operation(
        name="healthz",
        method="GET",
        path="/healthz",
        summary="Liveness",
        response=Health,
        description="ok",
        auth=False,
    ),
    Operation(
        name="openapi",
        method="GET",
        path="/openapi.json",
        summary="This document",
        description="OpenAPI document",
        auth=False,
    ),
)
"""Every route of the sidecar API, in the order the document lists them."""


def _ref(model: type[_Body]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.name, "summary": op.summary}
    if not op.auth:
        out["security"] = []
    if op.path_params:
        out["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in op.path_params
        ]
    if op.request is not None:
        out["requestBody"] = {"required": True, "content": _json(_ref(op.request))}
    ok: dict[str, Any] = {"description": op.description or "ok"}
    if op.response is not None:
        ok["content"] = _json(_ref(op.response))
    errors = sorted({*op.errors, *((401,) if op.auth else ())})
    out["responses"] = {
        str(op.status): ok,
        **{str(c): {"description": "error", "content": _json(_ref(Error))} for c in errors},
    }
    return out


@functools.cache
def _document() -> dict[str, Any]:
    models: list[tuple[type[_Body], JsonSchemaMode]] = [(Error, "serialization")]
    for op in OPERATIONS:
        if op.request is not None:
            models.append((op.request, "validation"))
        if op.response is not None:
            models.append((op.response, "serialization"))
    _, top = models_json_schema(
        list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
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
            "schemas": top["$defs"],
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the sidecar API, built from :data:`OPERATIONS`."""
    return copy.deepcopy(_document())
