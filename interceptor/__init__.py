"""Worker-side surface: gate every Temporal activity attempt through a policy sidecar.

``ChioActivityInterceptor`` evaluates each attempt (regular and local activities, every retry)
against the capability of the run's ``WorkflowGrant`` before the body runs, publishes the signed
``StepReceipt`` to a ``ReceiptSink`` and aggregates the run's steps into a ``WorkflowReceipt``
(``chio-temporal/v1`` envelope). After the body, an outcome record (``StepOutcome``) says how it
ended, signed by the evaluator and published off the activity's path. A deny fails the attempt
with a non-retryable ``ApplicationError(type=DENIED_ERROR_TYPE)``; a sidecar failure with a
retryable ``ApplicationError(type=SIDECAR_ERROR_TYPE)``, never an allow.

``chio_client=`` is the seed's ``chio_sdk.ChioClient`` or this package's own ``ChioClient``;
``WorkflowGrant.token`` a ``chio_sdk.models.CapabilityToken`` or the project's; ``scope_for``
builds a ``chio_sdk.models.ChioScope`` (grants on server ``"*"``). The seed's import path,
``chio_temporal``, re-exports this package's public surface.

``reverse_budget_charge`` is a ready activity for saga compensation: it refunds the budget
charge of a decision (``current_receipt_id()`` inside the activity that was charged) exactly
once, and the refund leaves a signed receipt (see ``_budget_activity``).

The sidecar itself (``LocalSidecar``, its HTTP app and server) is ``chio_receipts.sidecar``; this
package talks to any :class:`Evaluator` and imports no web server.
"""

from __future__ import annotations

from chio_receipts.interceptor._budget_activity import (
    BUDGET_REFUSED_ERROR_TYPE,
    BudgetRefund,
    BudgetReversal,
    current_receipt_id,
    reverse_budget_charge,
)
from chio_receipts.interceptor._client import ChioClient
from chio_receipts.interceptor._digest import (
    ArgumentKey,
    argument_digest,
    canonical_arguments,
    result_digest,
)
from chio_receipts.interceptor._errors import (
    APPROVAL_PENDING_ERROR_TYPE,
    CONFIG_ERROR_TYPE,
    DENIED_ERROR_TYPE,
    SIDECAR_ERROR_TYPE,
    SINK_ERROR_TYPE,
    ChioSidecarError,
    ChioSidecarProtocolError,
    ChioSidecarRejected,
    ChioSidecarUnavailable,
    ChioTemporalConfigError,
    ChioTemporalError,
    ScopeWidening,
    UnknownCapability,
    UnknownRunError,
)
from chio_receipts.interceptor._evaluator import Evaluator
from chio_receipts.interceptor._grants import ActivityGrantOverride, GrantResolver, WorkflowGrant
from chio_receipts.interceptor._interceptor import ChioActivityInterceptor, InterceptorStats
from chio_receipts.interceptor._kernel_http import ChioKernelSidecar
from chio_receipts.interceptor._model import (
    CapabilityToken,
    EvaluationRequest,
    Scope,
    SignedReceipt,
    uuid7,
)
from chio_receipts.interceptor._outcomes import (
    SIDECAR_ERROR,
    SIDECAR_UNREACHABLE,
    SINK_REFUSED,
    OutcomeSink,
    classify_end,
)
from chio_receipts.interceptor._receipt import (
    ENVELOPE_KEYS,
    WorkflowReceipt,
    WorkflowStepReceipt,
    envelope_to_json,
)
from chio_receipts.interceptor._scope import raw_token, scope_for, tool_names
from chio_receipts.interceptor._sidecar_http import HttpSidecar
from chio_receipts.interceptor._sink import InMemoryReceiptSink
from chio_receipts.interceptor._worker import build_chio_worker
from chio_receipts.schemas import verify_receipt

__all__ = [
    "APPROVAL_PENDING_ERROR_TYPE",
    "BUDGET_REFUSED_ERROR_TYPE",
    "CONFIG_ERROR_TYPE",
    "DENIED_ERROR_TYPE",
    "ENVELOPE_KEYS",
    "SIDECAR_ERROR",
    "SIDECAR_ERROR_TYPE",
    "SIDECAR_UNREACHABLE",
    "SINK_ERROR_TYPE",
    "SINK_REFUSED",
    "ActivityGrantOverride",
    "ArgumentKey",
    "BudgetRefund",
    "BudgetReversal",
    "CapabilityToken",
    "ChioActivityInterceptor",
    "ChioClient",
    "ChioKernelSidecar",
    "ChioSidecarError",
    "ChioSidecarProtocolError",
    "ChioSidecarRejected",
    "ChioSidecarUnavailable",
    "ChioTemporalConfigError",
    "ChioTemporalError",
    "EvaluationRequest",
    "Evaluator",
    "GrantResolver",
    "HttpSidecar",
    "InMemoryReceiptSink",
    "InterceptorStats",
    "OutcomeSink",
    "Scope",
    "ScopeWidening",
    "SignedReceipt",
    "UnknownCapability",
    "UnknownRunError",
    "WorkflowGrant",
    "WorkflowReceipt",
    "WorkflowStepReceipt",
    "argument_digest",
    "build_chio_worker",
    "canonical_arguments",
    "classify_end",
    "current_receipt_id",
    "envelope_to_json",
    "raw_token",
    "result_digest",
    "reverse_budget_charge",
    "scope_for",
    "tool_names",
    "uuid7",
    "verify_receipt",
]
