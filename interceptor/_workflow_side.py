"""Workflow-side part of the interceptor: a deny reaches saga code as ``ApplicationError``.

Temporal hands an activity failure to workflow code as ``ActivityError`` whose ``cause`` is the
activity's ``ApplicationError``. The seed's saga catches ``ApplicationError`` and matches
``exc.type == DENIED_ERROR_TYPE``; so for a denied attempt (and only then) this outbound
interceptor re-raises a copy of the ``ApplicationError`` (type, message, details,
non-retryable flag) with the ``ActivityError`` as its ``__cause__``. It is a pure function of
the failure, so replay stays deterministic. Every other failure is left as Temporal makes it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import temporalio.worker
import temporalio.workflow
from temporalio.exceptions import ActivityError, ApplicationError

from chio_receipts.interceptor._errors import DENIED_ERROR_TYPE

__all__ = ["DenialUnwrappingWorkflowInterceptor"]


class _UnwrappedHandle(temporalio.workflow.ActivityHandle[Any]):
    """Awaits the real activity handle; cancelling it cancels the real handle."""

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        inner: temporalio.workflow.ActivityHandle[Any],
    ) -> None:
        super().__init__(coro)
        self._inner = inner

    def cancel(self, msg: Any | None = None) -> bool:
        # The wrapper keeps awaiting the real handle, which resolves the cancellation the way
        # the activity's cancellation type says.
        return self._inner.cancel(msg)


def _unwrap(inner: temporalio.workflow.ActivityHandle[Any]) -> _UnwrappedHandle:
    async def run() -> Any:
        try:
            return await inner
        except ActivityError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type == DENIED_ERROR_TYPE:
                raise ApplicationError(
                    cause.message,
                    *cause.details,
                    type=cause.type,
                    non_retryable=cause.non_retryable,
                ) from exc
            raise

    return _UnwrappedHandle(run(), inner)


class _Outbound(temporalio.worker.WorkflowOutboundInterceptor):
    def start_activity(
        self, input: temporalio.worker.StartActivityInput
    ) -> temporalio.workflow.ActivityHandle[Any]:
        return _unwrap(super().start_activity(input))

    def start_local_activity(
        self, input: temporalio.worker.StartLocalActivityInput
    ) -> temporalio.workflow.ActivityHandle[Any]:
        return _unwrap(super().start_local_activity(input))


class DenialUnwrappingWorkflowInterceptor(temporalio.worker.WorkflowInboundInterceptor):
    """Workflow inbound interceptor installing the denial-unwrapping outbound interceptor."""

    def init(self, outbound: temporalio.worker.WorkflowOutboundInterceptor) -> None:
        super().init(_Outbound(outbound))
