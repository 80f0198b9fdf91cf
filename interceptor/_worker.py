"""``build_chio_worker``: mint (or fetch) a capability, build the interceptor, the worker."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import temporalio.client
import temporalio.worker

from chio_receipts.interceptor._errors import ChioTemporalConfigError
from chio_receipts.interceptor._grants import WorkflowGrant
from chio_receipts.interceptor._interceptor import ChioActivityInterceptor
from chio_receipts.interceptor._scope import AnyToken, ScopeLike
from chio_receipts.interceptor._sdk import AnyClient, mint_token
from chio_receipts.schemas import ReceiptSink

__all__ = ["build_chio_worker"]


async def build_chio_worker(
    client: temporalio.client.Client,
    *,
    task_queue: str,
    activities: Sequence[Callable[..., Any]] = (),
    workflows: Sequence[type] = (),
    chio_client: AnyClient,
    workflow_id: str,
    capability_id: str | None = None,
    scope: ScopeLike | None = None,
    subject: str | None = None,
    ttl_seconds: float = 3600,
    default_tool_server: str = "default",
    activity_tool_server_map: Mapping[str, str] | None = None,
    receipt_sink: ReceiptSink | None = None,
    run_id: str | None = None,
    tool_server: str | None = None,
    sidecar_url: str | None = None,
    interceptor_options: Mapping[str, Any] | None = None,
    **worker_options: Any,
) -> tuple[temporalio.worker.Worker, ChioActivityInterceptor, WorkflowGrant]:
    """Build ``(worker, interceptor, grant)`` in one call.

    ``chio_client`` is a ``chio_sdk.ChioClient`` or the project's ``ChioClient`` (with the
    SDK's, ``sidecar_url`` names the sidecar the interceptor evaluates against; default: the
    client's URL). Pass either ``capability_id`` (a capability minted earlier; fetched from the
    sidecar as the project's token) or ``scope`` (``scope_for(...)`` or tool names) +
    ``subject`` (the builder mints one with ``chio_client.create_capability`` for
    ``ttl_seconds``), not both. The grant is pinned to ``workflow_id`` (and ``run_id`` if
    given) and registered on the interceptor. ``interceptor_options`` go to
    :class:`ChioActivityInterceptor` (for example ``argument_key=``); other keyword arguments
    go to ``temporalio.worker.Worker``. A ``TracingInterceptor`` among ``interceptors=`` is put
    before the gate, so receipts and outcome records carry the attempt's trace context.
    """
    if (capability_id is None) == (scope is None):
        raise ChioTemporalConfigError(
            "build_chio_worker needs either capability_id= or scope= (with subject=), not both"
        )
    if scope is not None and not subject:
        raise ChioTemporalConfigError("build_chio_worker: scope= needs subject=")
    options = dict(interceptor_options or {})
    options.setdefault("identity", client.identity)
    interceptor = ChioActivityInterceptor(
        chio_client=chio_client,
        sidecar_url=sidecar_url,
        default_tool_server=default_tool_server,
        activity_tool_server_map=activity_tool_server_map,
        receipt_sink=receipt_sink,
        **options,
    )
    try:
        token = await _grant_token(
            interceptor, chio_client, capability_id, scope, subject, ttl_seconds
        )
        grant = WorkflowGrant(
            workflow_id=workflow_id,
            token=token,
            tool_server=tool_server or default_tool_server,
            run_id=run_id,
        )
        interceptor.register_workflow_grant(grant)
        extra = list(worker_options.pop("interceptors", ()))
        worker = temporalio.worker.Worker(
            client,
            task_queue=task_queue,
            activities=list(activities),
            workflows=list(workflows),
            interceptors=_ordered(interceptor, extra),
            **worker_options,
        )
    except BaseException:
        await interceptor.aclose()
        raise
    return worker, interceptor, grant


def _ordered(interceptor: ChioActivityInterceptor, extra: Sequence[Any]) -> list[Any]:
    """The worker's interceptors: OpenTelemetry's ``TracingInterceptor`` first (so attempts run
    inside its ``RunActivity`` span and receipts carry its ids), then the gate, then the rest."""
    tracing = [i for i in extra if type(i).__module__.startswith(_TRACING_MODULE)]
    rest = [i for i in extra if not type(i).__module__.startswith(_TRACING_MODULE)]
    return [*tracing, interceptor, *rest]


_TRACING_MODULE = "temporalio.contrib.opentelemetry"


async def _grant_token(
    interceptor: ChioActivityInterceptor,
    chio_client: AnyClient,
    capability_id: str | None,
    scope: ScopeLike | None,
    subject: str | None,
    ttl_seconds: float,
) -> AnyToken:
    """The grant's token: fetched by id from the interceptor's sidecar, or minted."""
    if capability_id is not None:
        return await interceptor.evaluator.get_capability(capability_id)
    if scope is None or not subject:
        raise ChioTemporalConfigError("build_chio_worker: scope= needs subject=")
    return await mint_token(chio_client, subject, scope, ttl_seconds)
