"""Workflow-side part of the interceptor: denials reach saga code as ``ApplicationError``, and
an activity held for a person's approval waits for the decision without burning retries.

**Denials.** Temporal hands an activity failure to workflow code as ``ActivityError`` whose
``cause`` is the activity's ``ApplicationError``. The seed's saga catches ``ApplicationError``
and matches ``exc.type == DENIED_ERROR_TYPE``; so for a denied attempt (and only then) the
outbound interceptor re-raises a copy of the ``ApplicationError`` (type, message, details,
non-retryable flag) with the ``ActivityError`` as its ``__cause__`` (``unwrap_denials``).

**Approvals.** An attempt the sidecar holds for approval fails with the non-retryable
``ApplicationError`` of type :data:`APPROVAL_PENDING_ERROR_TYPE` (details: the approval id and
the pending receipt's id), so Temporal does not retry it. The outbound interceptor catches it,
waits (``workflow.wait_condition``) for the :data:`~chio_receipts.schemas.APPROVAL_SIGNAL`
signal carrying the decision for that approval id (the handler is registered by the inbound
interceptor when the run starts), then schedules the activity again, once, with the same input.
The sidecar decides that new attempt: an approved call is allowed (the approval is used), a
rejected one is denied and reaches workflow code as ``ChioCapabilityDenied``. The signal carries
no authority: whatever it says, the sidecar's record of the answer decides the re-run.

Everything here is a pure function of history (signals, activity results), so replay is
deterministic. Local activities are handled the same way.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import temporalio.worker
import temporalio.workflow
from temporalio.exceptions import ActivityError, ApplicationError

from chio_receipts.interceptor._errors import APPROVAL_PENDING_ERROR_TYPE, DENIED_ERROR_TYPE
from chio_receipts.schemas import APPROVAL_SIGNAL

__all__ = [
    "ApprovalWaitingWorkflowInterceptor",
    "DenialUnwrappingWorkflowInterceptor",
    "approval_id_of",
]


def approval_id_of(error: ApplicationError) -> str | None:
    """The approval id a ``ChioApprovalPending`` error names (None for any other error)."""
    if error.type != APPROVAL_PENDING_ERROR_TYPE or not error.details:
        return None
    first = error.details[0]
    if isinstance(first, Mapping) and isinstance(first.get("approval_id"), str):
        return str(first["approval_id"])
    return None


class _Handle(temporalio.workflow.ActivityHandle[Any]):
    """Awaits the real activity handle (scheduled again after an approval); cancelling it
    cancels the current real handle, or ends the wait for a decision."""

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        inner: temporalio.workflow.ActivityHandle[Any],
    ) -> None:
        super().__init__(coro)
        self.inner = inner

    def cancel(self, msg: Any | None = None) -> bool:
        # The wrapper keeps awaiting the real handle, which resolves the cancellation the way
        # the activity's cancellation type says; while waiting for a decision, the wait ends.
        if not self.inner.done():
            return self.inner.cancel(msg)
        return super().cancel(msg)


def _wrap(
    start: Callable[[], temporalio.workflow.ActivityHandle[Any]],
    decisions: dict[str, Mapping[str, Any]] | None,
    unwrap: bool,
) -> temporalio.workflow.ActivityHandle[Any]:
    async def run() -> Any:
        while True:
            try:
                return await handle.inner
            except (ActivityError, ApplicationError) as exc:
                # A regular activity's failure is an ActivityError caused by the activity's
                # ApplicationError; a local activity's may arrive as the ApplicationError.
                cause = exc.cause if isinstance(exc, ActivityError) else exc
                if not isinstance(cause, ApplicationError):
                    raise
                approval_id = approval_id_of(cause) if decisions is not None else None
                if approval_id is not None and decisions is not None:
                    await temporalio.workflow.wait_condition(
                        functools.partial(operator.contains, decisions, approval_id)
                    )
                    handle.inner = start()
                    continue
                if unwrap and cause.type == DENIED_ERROR_TYPE and cause is not exc:
                    raise ApplicationError(
                        cause.message,
                        *cause.details,
                        type=cause.type,
                        non_retryable=cause.non_retryable,
                    ) from exc
                raise

    handle = _Handle(run(), start())
    return handle


class _Outbound(temporalio.worker.WorkflowOutboundInterceptor):
    def __init__(
        self,
        next: temporalio.worker.WorkflowOutboundInterceptor,
        decisions: dict[str, Mapping[str, Any]] | None,
        unwrap: bool,
    ) -> None:
        super().__init__(next)
        self._decisions = decisions
        self._unwrap = unwrap

    def start_activity(
        self, input: temporalio.worker.StartActivityInput
    ) -> temporalio.workflow.ActivityHandle[Any]:
        return _wrap(
            lambda: super(_Outbound, self).start_activity(input), self._decisions, self._unwrap
        )

    def start_local_activity(
        self, input: temporalio.worker.StartLocalActivityInput
    ) -> temporalio.workflow.ActivityHandle[Any]:
        return _wrap(
            lambda: super(_Outbound, self).start_local_activity(input),
            self._decisions,
            self._unwrap,
        )


class ApprovalWaitingWorkflowInterceptor(temporalio.worker.WorkflowInboundInterceptor):
    """Workflow inbound interceptor: registers the approval signal's handler when the run
    starts, and installs the outbound interceptor that waits for decisions (and, with
    :attr:`unwrap_denials`, unwraps denials)."""

    unwrap_denials = True
    wait_for_approvals = True

    def init(self, outbound: temporalio.worker.WorkflowOutboundInterceptor) -> None:
        self._decisions: dict[str, Mapping[str, Any]] = {}
        decisions = self._decisions if self.wait_for_approvals else None
        super().init(_Outbound(outbound, decisions, self.unwrap_denials))

    async def execute_workflow(self, input: temporalio.worker.ExecuteWorkflowInput) -> Any:
        if self.wait_for_approvals:
            temporalio.workflow.set_signal_handler(APPROVAL_SIGNAL, self._on_decision)
        return await super().execute_workflow(input)

    def _on_decision(self, decision: Any) -> None:
        """A person's decision (``{"approval_id", "outcome", "approver", "reason",
        "receipt"}``); the first one for an approval id is kept."""
        if isinstance(decision, Mapping) and isinstance(decision.get("approval_id"), str):
            self._decisions.setdefault(str(decision["approval_id"]), dict(decision))


class DenialUnwrappingWorkflowInterceptor(ApprovalWaitingWorkflowInterceptor):
    """Unwraps denials and waits for approvals (the default)."""


class _ApprovalsOnly(ApprovalWaitingWorkflowInterceptor):
    unwrap_denials = False
