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

from chio_receipts.schemas import CapabilityToken, EvaluationRequest, StepOutcome, StepStatus
from chio_receipts.sidecar._access import roles_for

__all__ = [
    "OPERATIONS",
    "Attenuate",
    "BudgetReverse",
    "BudgetReversed",
    "Capability",
    "ChioAttenuate",
    "ChioCapability",
    "ChioCost",
    "ChioCreateCapability",
    "ChioDenied",
    "ChioError",
    "ChioEvaluate",
    "ChioEvaluation",
    "ChioHealth",
    "ChioMint",
    "ChioMinted",
    "ChioReceipt",
    "ChioReceiptReport",
    "ChioReconcile",
    "ChioReconciled",
    "ChioRelease",
    "ChioReleased",
    "ChioSdkEvaluate",
    "ChioValidate",
    "ChioValidation",
    "ChioVerifyReceipt",
    "CreateCapability",
    "Error",
    "Evaluation",
    "EvaluationRequestBody",
    "Health",
    "KeyRotation",
    "Keys",
    "Operation",
    "OutcomeBody",
    "OutcomeRecord",
    "PublicKey",
    "Readiness",
    "ReceiptReconcile",
    "Revoked",
    "SignedOutcome",
    "openapi_document",
]

_INT_MAX = 2**63 - 1
_Long = Annotated[int, Field(ge=-_INT_MAX, le=_INT_MAX)]
_Micros = Annotated[int, Field(description="µs since the Unix epoch")]
_TraceId = Annotated[str, Field(pattern=r"^(?:[0-9a-f]{32})?$", description="W3C trace id, hex")]
_SpanId = Annotated[str, Field(pattern=r"^(?:[0-9a-f]{16})?$", description="W3C span id, hex")]
_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


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
    parameters: Any = Field(
        default_factory=dict,
        description="the call's parameters (JSON), signed into the Chio receipt's action",
    )
    redact_parameters: bool = Field(
        default=False, description="sign empty parameters and only their parameter_hash"
    )
    trace_id: _TraceId = ""
    span_id: _SpanId = ""

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
            parameters=self.parameters,
            redact_parameters=self.redact_parameters,
            trace_id=self.trace_id,
            span_id=self.span_id,
        )


class OutcomeBody(_Body):
    """Body of ``POST /v1/outcomes``: a ``StepOutcome`` (Avro schema StepOutcome) without its
    receipt: how one attempt's body ended, linked to its decision. Never the result: only its
    keyed digest."""

    outcome_id: Annotated[str, Field(pattern=_UUID, description="UUID of the record")]
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    activity_id: str
    activity_type: str
    attempt: Annotated[int, Field(ge=0, le=2**31 - 1)]
    is_local: bool
    tool_server: str
    tool: str
    capability_id: str
    decision_receipt_id: str = Field(description="receipt_id of the decision's StepReceipt")
    decision_chio_id: str = Field(default="", description="id of the decision's Chio receipt")
    status: Literal["COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT", "GATE_FAILED"]
    error_type: str = Field(default="", description="the failure's type; never its message")
    started_at: _Micros
    ended_at: _Micros
    duration_us: Annotated[int, Field(ge=0, le=_INT_MAX)]
    result_digest: Annotated[
        str, Field(pattern=r"^(?:[0-9a-f]{64})?$", description="hex HMAC-SHA256 of the result")
    ] = ""
    result_key_id: str = ""
    worker_identity: str = ""
    trace_id: _TraceId = ""
    span_id: _SpanId = ""

    def to_outcome(self) -> StepOutcome:
        """The record this body describes (unsigned)."""
        fields = self.model_dump()
        fields["status"] = StepStatus(self.status)
        return StepOutcome(**fields)


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
    chio_token: dict[str, Any] | None = Field(
        default=None,
        description="The capability's signed kernel-format token (chio.capability.v1) exactly as "
        "signed, when it was minted through the kernel routes; what a kernel-mediated "
        "evaluation presents.",
    )

    @classmethod
    def of(cls, token: CapabilityToken, chio_token: dict[str, Any] | None = None) -> Capability:
        """The JSON body of ``token`` (with its raw kernel token, when there is one)."""
        return cls(
            id=token.id,
            subject=token.subject,
            scope=list(token.scope),
            issued_at=token.issued_at,
            expires_at=token.expires_at,
            parent_id=token.parent_id,
            chain=list(token.chain),
            issuer_key_id=token.issuer_key_id,
            chio_token=chio_token,
        )


class Evaluation(_Body):
    """A decided attempt: the signed receipt's fields and its wire body."""

    receipt: dict[str, Any] = Field(
        description="StepReceipt fields (Avro schema StepReceipt); prev_hash and signature as hex"
    )
    body: str = Field(description="base64 of the signed schemaless Avro body")


class SignedOutcome(_Body):
    """An outcome record as signed: the body's fields, ``chio_receipt`` and ``chio_signed``."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    chio_receipt: str = Field(
        description="the Chio trace_observation receipt as compact JSON, exactly as signed"
    )
    chio_signed: str = Field(description="hex of the bytes its signature covers")


class OutcomeRecord(_Body):
    """A signed outcome record (``schemas.sign_chio_outcome`` with the sidecar's key)."""

    outcome: SignedOutcome

    @classmethod
    def of(cls, outcome: StepOutcome) -> OutcomeRecord:
        """The JSON answer for a signed ``outcome`` (bytes as hex, as in ``Evaluation``)."""
        fields = outcome.to_avro()
        fields["chio_signed"] = outcome.chio_signed.hex()
        return cls(outcome=SignedOutcome(**fields))


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


class Readiness(_Body):
    """Readiness: 200 ``ready`` when the store can be written and the signing key is published,
    else 503 ``not_ready``; ``checks`` says which part failed."""

    status: Literal["ready", "not_ready"]
    key_id: str
    checks: dict[str, str] = Field(description="'ok' or why not, by check (store, signing_key)")


class KeyRotation(_Body):
    """Answer of a key rotation: the new signing key, published before anything is signed."""

    old_key_id: str
    current: str
    public_key: str = Field(description="hex")


class Error(_Body):
    """Every error answer: a stable code to match on and a reason to read."""

    error: str
    reason: str


# -- the Chio kernel's bodies (chio-api-protect 0.1.2) -----------------------------------------
# These models validate and document the shapes; tokens and receipts inside them are passed on
# and answered as the raw JSON objects they are, never re-serialised through a model.


class _Open(BaseModel):
    # A kernel object: unknown fields are kept (they may be signed).
    model_config = ConfigDict(strict=True, frozen=True, extra="allow")


class ChioCapability(_Open):
    """A Chio capability token (``chio.capability.v1``), signed by the sidecar's key."""

    schema_: str = Field("chio.capability.v1", alias="schema")
    id: str
    issuer: str = Field(description="the issuer's Ed25519 public key, hex")
    subject: str = Field(description="the holder's key, derived from the requested subject")
    scope: dict[str, Any] = Field(description="ChioScope: grants, resource_grants, prompt_grants")
    issued_at: int = Field(description="unix seconds")
    expires_at: int = Field(description="unix seconds")
    delegation_chain: list[dict[str, Any]] = Field(default_factory=list)
    signature: str


class ChioReceipt(_Open):
    """A Chio kernel receipt (mediated decision), signed by the sidecar's key."""

    id: str
    timestamp: int
    capability_id: str
    tool_server: str
    tool_name: str
    action: dict[str, Any]
    decision: dict[str, Any] | None = None
    receipt_kind: str
    boundary_class: str
    tool_origin: str
    redaction_mode: str
    content_hash: str
    policy_hash: str
    metadata: dict[str, Any] | None = None
    trust_level: str
    kernel_key: str
    signature: str


class ChioMint(_Body):
    """Body of ``POST /v1/capabilities/mint`` (and the canonical body of ``/v1/capabilities``)."""

    subject: str
    scopes: list[str] = Field(
        default_factory=list,
        description="tool:SERVER:TOOL:OP, tools:TOOL, TOOL:OP, resource:URI:OP, prompt:NAME:OP",
    )
    ttl_seconds: Annotated[int, Field(ge=0)] | None = None
    ttl_nanos: Annotated[int, Field(ge=0)] | None = None
    job_uid: str = ""


class ChioCreateCapability(_Body):
    """chio-sdk-python's body of ``POST /v1/capabilities``: a ``ChioScope`` object, either
    operation spelling (``"Invoke"`` or ``"invoke"``)."""

    subject: str
    scope: dict[str, Any]
    ttl_seconds: Annotated[int, Field(ge=0)] | None = None
    job_uid: str = ""


class ChioMinted(_Body):
    """Answer of ``POST /v1/capabilities/mint``."""

    capability: ChioCapability


class ChioValidate(_Open):
    """Body of ``POST /v1/capabilities/validate``: the token's fields, flattened, and optional
    expectations."""

    id: str
    expires_at: int
    expected_subject: str | None = None
    expected_scope: dict[str, Any] | None = None


class ChioValidation(_Body):
    """Answer of ``POST /v1/capabilities/validate``."""

    valid: bool
    reason: str | None = None
    expires_at: int | None = None
    capability_id: str


class ChioRelease(_Body):
    """Body of ``POST /v1/capabilities/release`` (a durable revocation)."""

    capability_id: str
    job_uid: str = ""
    reason: str = ""


class ChioReleased(_Body):
    """Answer of ``POST /v1/capabilities/release``."""

    released: bool


class ChioAttenuate(_Body):
    """Body of ``POST /v1/capabilities/attenuate`` (chio-sdk-python's shape)."""

    parent_token: dict[str, Any]
    new_scope: dict[str, Any]


class ChioEvaluate(_Body):
    """The kernel's mediated body of ``POST /v1/evaluate``: the whole capability token."""

    capability: dict[str, Any]
    tool_server: str
    tool_name: str
    parameters: Any = Field(default_factory=dict)
    agent_id: str | None = None
    request_id: str | None = None


class ChioSdkEvaluate(_Body):
    """chio-sdk-python's body of ``POST /v1/evaluate``: the capability by id."""

    capability_id: str
    tool_server: str
    tool_name: str
    parameters: Any = Field(default_factory=dict)
    parameter_hash: str | None = None


class ChioEvaluation(_Body):
    """Answer to the mediated body of ``POST /v1/evaluate`` (a deny is a 200 too)."""

    status: Literal["authorized", "deny"]
    receipt: ChioReceipt
    execution_nonce: dict[str, Any] | None


class ChioDenied(_Body):
    """403 to chio-sdk-python's body of ``POST /v1/evaluate`` on a deny, with the receipt."""

    error: str
    message: str
    guard: str
    reason: str
    receipt: ChioReceipt


class ChioVerifyReceipt(ChioReceipt):
    """Body of ``POST /v1/receipts/verify``: the receipt's fields, flattened, and optional
    expectations."""

    expected_decision: str | None = None
    expected_capability_id: str | None = None


class ChioReceiptReport(_Body):
    """Answer of ``POST /v1/receipts/verify`` (the kernel's report)."""

    signature_valid: bool
    signer_trusted: bool
    receipt_id_valid: bool
    parameter_hash_valid: bool
    receipt_kind: str
    boundary_class: str
    trust_level: str
    result: str
    authorized: bool
    signer_key_hex: str
    ok: bool
    valid: bool
    reason: str | None = None
    decision: str | None = None
    signed_at: int | None = None
    receipt_id: str


class ChioHealth(_Body):
    """Answer of ``GET /chio/health`` and ``GET /chio/live``."""

    status: Literal["healthy", "degraded", "unhealthy"]
    version: str
    receipt_backend: str
    revocation_backend: str


class ChioError(_Body):
    """Every error answer of a Chio kernel route."""

    error: str
    message: str


# -- approvals (the kernel's /approvals routes; see ``_approvals``) ---------------------------


class ApprovalRespond(_Body):
    """Body of ``POST /approvals/{approval_id}/respond``: the kernel's operator-respond shape.
    The approver is the credential the request was authenticated with; a body naming one
    (``approver``, ``token``) is refused."""

    outcome: Literal["approved", "denied"]
    reason: str | None = Field(None, max_length=1000)


class ApprovalRequestView(_Open):
    """A pending approval (the kernel's ``ApprovalRequest``) with its Temporal binding."""

    approval_id: str
    capability_id: str
    tool_server: str
    tool_name: str
    parameter_hash: str
    expires_at: int = Field(description="unix seconds")
    created_at: int = Field(description="unix seconds")
    workflow: dict[str, Any]
    request_receipt_id: str
    request_chio_id: str


class ApprovalList(_Body):
    """Answer to ``GET /approvals/pending`` (the kernel's ``PendingListResponse``)."""

    approvals: list[ApprovalRequestView]
    count: int


class ApprovalResolution(_Open):
    """An answered approval (the kernel's ``ResolvedApproval``), with the approver's name and
    the signed decision receipt."""

    approval_id: str
    outcome: Literal["approved", "denied"]
    resolved_at: int
    approver: str
    receipt: ChioReceipt


class ApprovalState(_Body):
    """Answer to ``GET /approvals/{approval_id}`` (the kernel's ``GetApprovalResponse``)."""

    pending: ApprovalRequestView | None = None
    resolution: ApprovalResolution | None = None
    request: ApprovalRequestView | None = None


class ApprovalResponded(_Body):
    """Answer to ``POST /approvals/{approval_id}/respond`` (the kernel's ``RespondResponse``)
    with who answered, the signed decision receipt, the bound workflow and whether the sidecar
    signalled it."""

    approval_id: str
    outcome: Literal["approved", "denied"]
    resolved_at: int
    approver: str
    receipt: ChioReceipt
    workflow_id: str
    run_id: str
    signalled: bool


# -- budgets: settlement at the realized cost and refunds ----------------------------------------


class ChioCost(_Body):
    """A ``ToolInvocationCost``: what a call cost, in the currency's smallest unit."""

    units: Annotated[int, Field(ge=0, le=2**64 - 1)]
    currency: str
    breakdown: Any = None


class ChioReconcile(_Body):
    """The kernel's body of ``POST /v1/reconcile``: the execution nonce ``/v1/evaluate``
    minted (naming its ``reserved_hold_id``), the exact ``arguments`` it authorized and the
    ``realized_cost``."""

    execution_nonce: dict[str, Any]
    arguments: Any = Field(default_factory=dict)
    realized_cost: ChioCost


class ReceiptReconcile(_Body):
    """The project's body of ``POST /v1/reconcile``: the hold of a decision made on the
    project's ``/v1/evaluate`` (no nonce), named by its receipt id or Chio receipt id."""

    receipt_id: str
    realized_cost: ChioCost


class ChioReconciled(_Body):
    """Answer of ``POST /v1/reconcile``: the settlement's signed receipt (decision allow,
    ``metadata.budget_authority.terminal.disposition`` ``reconciled``)."""

    status: Literal["reconciled"]
    receipt: ChioReceipt


class BudgetReverse(_Body):
    """Body of ``POST /v1/budgets/reverse``: refund the budget charge of one decision.

    A worker credential must name the run the charge was made for (``workflow_id``,
    ``run_id``); operators and administrators may refund any charge."""

    receipt_id: str = Field(description="the decision's receipt id or Chio receipt id")
    workflow_id: str = ""
    run_id: str = ""


class BudgetReversed(_Body):
    """Answer of ``POST /v1/budgets/reverse``. ``refunded`` is False (status
    ``already_reversed``) when the charge had been refunded before: nothing is refunded twice,
    and ``refund_receipt_id`` names the first refund's receipt."""

    status: Literal["reversed", "already_reversed"]
    refunded: bool
    receipt_id: str
    hold_id: str
    capability_id: str
    refunded_units: int
    refunded_invocations: int
    currency: str
    refund_receipt_id: str
    receipt: dict[str, Any] | None = Field(
        default=None, description="the refund's signed Chio receipt (first refund only)"
    )


# -- the operation table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """One route of the API: what the app serves and the document describes."""

    name: str
    method: Literal["GET", "POST"]
    path: str
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    description: str = ""
    errors: tuple[int, ...] = ()
    auth: bool = True
    chio: bool = False
    """A Chio kernel route: errors are ``{error, message}`` and ``auth`` means the control
    token (403 ``chio_control_forbidden``; loopback peers only when no token is set)."""
    chio_requests: tuple[type[BaseModel], ...] = ()
    """Further bodies a project route accepts for the Chio kernel's shape of the same route."""
    chio_responses: tuple[tuple[int, type[BaseModel]], ...] = ()
    """The answers to those bodies."""
    text: str | None = None
    """Media type of a plain-text answer (``response`` is then ``None``)."""

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
        chio_requests=(ChioCreateCapability, ChioMint),
        chio_responses=((200, ChioCapability), (403, ChioError)),
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
        chio_requests=(ChioEvaluate, ChioSdkEvaluate),
        chio_responses=((200, ChioEvaluation), (403, ChioDenied)),
    ),
    Operation(
        name="outcomes",
        method="POST",
        path="/v1/outcomes",
        summary="Sign how one allowed attempt ended (an outcome record) as a Chio "
        "trace_observation receipt",
        request=OutcomeBody,
        response=OutcomeRecord,
        description="the record with its signed receipt (nothing is stored)",
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
        name="livez",
        method="GET",
        path="/livez",
        summary="Liveness: the process answers",
        response=Health,
        description="alive",
        auth=False,
    ),
    Operation(
        name="readyz",
        method="GET",
        path="/readyz",
        summary="Readiness: the store can be written and the signing key is published",
        response=Readiness,
        description="ready",
        errors=(503,),
        auth=False,
    ),
    Operation(
        name="keys_rotate",
        method="POST",
        path="/v1/keys/rotate",
        summary="Rotate to a fresh signing key (admin); earlier public keys stay published",
        response=KeyRotation,
        description="rotated",
        errors=(503,),
    ),
    Operation(
        name="chio_health",
        method="GET",
        path="/chio/health",
        summary="Readiness (Chio kernel shape); 503 when the store cannot be used",
        response=ChioHealth,
        description="healthy",
        errors=(503,),
        auth=False,
        chio=True,
    ),
    Operation(
        name="chio_live",
        method="GET",
        path="/chio/live",
        summary="Liveness (Chio kernel shape)",
        response=ChioHealth,
        description="alive",
        auth=False,
        chio=True,
    ),
    Operation(
        name="chio_mint",
        method="POST",
        path="/v1/capabilities/mint",
        summary="Mint a Chio capability token from scope strings",
        request=ChioMint,
        response=ChioMinted,
        description="minted",
        errors=(400,),
        chio=True,
    ),
    Operation(
        name="chio_validate",
        method="POST",
        path="/v1/capabilities/validate",
        summary="Validate a Chio capability token (issuer, signature, expiry, revocation)",
        request=ChioValidate,
        response=ChioValidation,
        description="the verdict (an invalid token is a 200 with valid false)",
        errors=(400,),
        chio=True,
    ),
    Operation(
        name="chio_release",
        method="POST",
        path="/v1/capabilities/release",
        summary="Revoke a Chio capability (durable; attenuated children follow)",
        request=ChioRelease,
        response=ChioReleased,
        description="released",
        errors=(400,),
        chio=True,
    ),
    Operation(
        name="chio_attenuate",
        method="POST",
        path="/v1/capabilities/attenuate",
        summary="Mint a child token with a strict subset of the parent's scope "
        "(the kernel answers 403 here)",
        request=ChioAttenuate,
        response=ChioCapability,
        description="the child token, with a signed delegation link",
        errors=(400, 403, 404, 409),
        chio=True,
    ),
    Operation(
        name="chio_verify_receipt",
        method="POST",
        path="/v1/receipts/verify",
        summary="Verify a Chio kernel receipt signed by this sidecar",
        request=ChioVerifyReceipt,
        response=ChioReceiptReport,
        description="the report (an invalid receipt is a 200 with valid false)",
        errors=(400,),
        auth=False,
        chio=True,
    ),
    # -- approvals: role operator (``_access.ROUTE_ROLES``) --------------------------------
    Operation(
        name="approvals_pending",
        method="GET",
        path="/approvals/pending",
        summary="List pending approval requests (filters: tool_server, tool_name, "
        "workflow_id, receipt_id, not_expired_at, limit)",
        response=ApprovalList,
        description="pending requests, oldest first",
        errors=(400,),
        chio=True,
    ),
    Operation(
        name="approval_get",
        method="GET",
        path="/approvals/{approval_id}",
        summary="An approval request and, once answered, its resolution",
        response=ApprovalState,
        description="the request or its resolution",
        errors=(404,),
        chio=True,
    ),
    Operation(
        name="approval_respond",
        method="POST",
        path="/approvals/{approval_id}/respond",
        summary="Approve or deny a pending request; the approver is the authenticated "
        "credential. Signs the decision and signals the waiting workflow",
        request=ApprovalRespond,
        response=ApprovalResponded,
        description="answered",
        errors=(400, 404, 409),
        chio=True,
    ),
    Operation(
        name="reconcile",
        method="POST",
        path="/v1/reconcile",
        summary="Settle a budget hold at the call's realized cost (the trusted tool-server "
        "side); a closed hold, another currency or a cost over the hold is refused",
        request=ChioReconcile,
        response=ChioReconciled,
        description="settled",
        errors=(400,),
        chio=True,
        chio_requests=(ReceiptReconcile,),
    ),
    Operation(
        name="budget_reverse",
        method="POST",
        path="/v1/budgets/reverse",
        summary="Refund the budget charge of one decision, exactly once, with a signed receipt",
        request=BudgetReverse,
        response=BudgetReversed,
        description="refunded, or already refunded (nothing refunded twice)",
        errors=(*_BODY_ERRORS, 403, 404),
    ),
    Operation(
        name="metrics",
        method="GET",
        path="/metrics",
        summary="Prometheus metrics: decisions, decision latency, capabilities minted and "
        "revoked, store errors, the signing key id",
        description="text exposition format",
        auth=False,
        text="text/plain",
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


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.name, "summary": op.summary}
    # Who may call it comes from the one access table (``_access.ROUTE_ROLES``).
    roles = roles_for(op.method, op.path)
    if not roles:
        out["security"] = []
    else:
        out["x-chio-roles"] = sorted(role.value for role in roles)
    if op.path_params:
        out["parameters"] = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in op.path_params
        ]
    if op.request is not None:
        bodies = [op.request, *op.chio_requests]
        schema = _ref(op.request) if len(bodies) == 1 else {"oneOf": [_ref(b) for b in bodies]}
        out["requestBody"] = {"required": True, "content": _json(schema)}
    ok: dict[str, Any] = {"description": op.description or "ok"}
    if op.response is not None:
        ok["content"] = _json(_ref(op.response))
    elif op.text is not None:
        ok["content"] = {op.text: {"schema": {"type": "string"}}}
    error = ChioError if op.chio else Error
    # The access middleware's refusals are {error, reason} on every route.
    gate = (401, 403) if roles else ()
    errors = sorted({*op.errors, *gate})

    def shape(code: int) -> dict[str, Any]:
        models = ([Error] if code in gate else []) + ([error] if code in op.errors else [])
        unique = list(dict.fromkeys(models))
        return _ref(unique[0]) if len(unique) == 1 else {"oneOf": [_ref(m) for m in unique]}

    responses: dict[str, Any] = {
        str(op.status): ok,
        **{str(c): {"description": "error", "content": _json(shape(c))} for c in errors},
    }
    for code, model in op.chio_responses:
        responses[str(code)] = {
            "description": f"answer to the Chio kernel's body ({model.__name__})",
            "content": _json(_ref(model)),
        }
    out["responses"] = responses
    return out


@functools.cache
def _document() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (Error, "serialization"),
        (ChioError, "serialization"),
    ]
    for op in OPERATIONS:
        if op.request is not None:
            models.append((op.request, "validation"))
        models.extend((m, "validation") for m in op.chio_requests)
        if op.response is not None:
            models.append((op.response, "serialization"))
        models.extend((m, "serialization") for _, m in op.chio_responses)
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
            "authenticated endpoints take 'Authorization: Bearer <secret>' of a named "
            "credential when credentials are configured (x-chio-roles: the roles that may "
            "call it; 401 missing or wrong credential, 403 a role that may not). "
            "The Chio kernel's routes (chio-api-protect 0.1.2) are served too, with its "
            "bodies, status codes and {error, message} errors; /v1/capabilities and "
            "/v1/evaluate take either the project's body or the kernel's.",
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
