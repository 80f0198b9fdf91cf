"""Errors of the interceptor package, and the ``ApplicationError`` types activities fail with.

    schemas.ChioReceiptsError              the project's root (``retriable``, ``is_retriable``)
    └── ChioTemporalError                  base of every error raised by this package
        ├── ChioTemporalConfigError        misconfiguration: a wider or disjoint attenuation, an
        │   │                              override wider than its workflow grant, bad arguments
        │   └── ScopeWidening              an attenuation asked for tools its parent does not
        │                                  allow
        ├── UnknownRunError                flush of a run this interceptor does not hold
        └── ChioSidecarError               talking to the policy sidecar failed
            ├── ChioSidecarUnavailable     unreachable, timed out, or answered 5xx (retriable)
            ├── ChioSidecarRejected        the sidecar refused the request (4xx: unknown or
            │                              revoked capability, invalid request, credentials)
            │   └── UnknownCapability      no capability with that id
            └── ChioSidecarProtocolError   an answer that does not decode or does not match the
                                           request (for example a body that is not the receipt)

Only ``ChioSidecarUnavailable`` is retriable; code that branches on it reads
``schemas.is_retriable``.

Inside an activity attempt these surface to Temporal as ``ApplicationError`` with a ``type`` the
workflow can match on: :data:`DENIED_ERROR_TYPE` (non-retryable), :data:`SIDECAR_ERROR_TYPE`
(retryable), :data:`SINK_ERROR_TYPE` (retryable), :data:`CONFIG_ERROR_TYPE` (non-retryable) and
:data:`APPROVAL_PENDING_ERROR_TYPE` (non-retryable; handled by the workflow-side interceptor).
"""

from __future__ import annotations

from chio_receipts.schemas import ChioReceiptsError

__all__ = [
    "APPROVAL_PENDING_ERROR_TYPE",
    "CONFIG_ERROR_TYPE",
    "DENIED_ERROR_TYPE",
    "SIDECAR_ERROR_TYPE",
    "SINK_ERROR_TYPE",
    "ChioSidecarError",
    "ChioSidecarProtocolError",
    "ChioSidecarRejected",
    "ChioSidecarUnavailable",
    "ChioTemporalConfigError",
    "ChioTemporalError",
    "ScopeWidening",
    "UnknownCapability",
    "UnknownRunError",
]

DENIED_ERROR_TYPE = "ChioCapabilityDenied"
"""``ApplicationError.type`` of a denied attempt (non-retryable); saga code matches on it."""

SIDECAR_ERROR_TYPE = "ChioSidecarError"
"""``ApplicationError.type`` when the sidecar could not decide (retryable, never an allow)."""

SINK_ERROR_TYPE = "ChioReceiptSinkError"
"""``ApplicationError.type`` when the receipt sink refused a receipt (retryable; body not run)."""

CONFIG_ERROR_TYPE = "ChioTemporalConfigError"
"""``ApplicationError.type`` of a misconfigured grant override (non-retryable)."""

APPROVAL_PENDING_ERROR_TYPE = "ChioApprovalPending"
"""``ApplicationError.type`` of an attempt held for a person's approval (non-retryable; details:
``{"approval_id", "receipt_id", "chio_receipt_id"}``). The workflow-side interceptor catches it,
waits for the decision signal and schedules the activity again; workflow code never sees it."""


class ChioTemporalError(ChioReceiptsError):
    """Base of every error raised by the interceptor package."""


class ChioTemporalConfigError(ChioTemporalError):
    """The interceptor, a grant or an override is misconfigured (retrying cannot help)."""


class ScopeWidening(ChioTemporalConfigError):
    """An attenuation would widen (or leave) its parent's scope."""


class UnknownRunError(ChioTemporalError, KeyError):
    """No in-process receipt is held for this (workflow_id, run_id)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ChioSidecarError(ChioTemporalError):
    """Base of failures talking to the policy sidecar."""


class ChioSidecarUnavailable(ChioSidecarError):
    """The sidecar is unreachable, timed out or failed (5xx): retry later."""

    retriable = True


class ChioSidecarRejected(ChioSidecarError):
    """The sidecar answered 4xx: the request itself is wrong."""

    def __init__(self, message: str, *, status: int = 400, error: str = "rejected") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class UnknownCapability(ChioSidecarRejected):
    """The sidecar has no capability with this id."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=404, error="unknown_capability")


class ChioSidecarProtocolError(ChioSidecarError):
    """The sidecar's answer is malformed or does not match the request."""
