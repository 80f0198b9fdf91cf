"""``ChioActivityInterceptor``: evaluates every activity attempt before its body runs.

The root interceptor holds the dependencies (evaluator, argument key, sink, grants) and the
per-run state; the per-activity inbound interceptor holds only ``next`` and the root, reads the
attempt's identity from ``activity.info()`` and ends in ``super().execute_activity``.

Per attempt (regular and local activities, every retry):

1. resolve the grant: registered for (workflow_id, run_id), then for workflow_id, then the
   ``grant_resolver``; an activity-type override may narrow it (never widen it);
2. digest the arguments (keyed HMAC; the arguments themselves go nowhere);
3. ask the sidecar to decide and sign, chaining ``prev_hash`` to this worker's previous receipt
   of the run;
4. publish the signed receipt to the sink and append it to the run's ``WorkflowReceipt``;
5. allow -> run the body; deny -> ``ApplicationError(type=DENIED_ERROR_TYPE,
   non_retryable=True)``; sidecar failure -> ``ApplicationError(type=SIDECAR_ERROR_TYPE)``
   (retryable, no receipt, never an allow); sink failure -> ``ApplicationError(type=
   SINK_ERROR_TYPE)`` (retryable, the body does not run).

Receipts never enter workflow history: activity results are returned untouched.

Workflow side: a denied activity reaches workflow code as the ``ApplicationError`` itself (not
wrapped in ``ActivityError``), so the seed's ``except ApplicationError`` saga matches it; see
``_workflow_side`` and ``unwrap_denials``.

Memory: per-run state (the in-process ``WorkflowReceipt`` and the chain head) lives until
``flush_workflow_receipt``; runs that are never flushed are evicted least-recently-used beyond
``max_runs`` (their receipts already went to the sink; only the in-process envelope is lost,
and a later flush raises ``UnknownRunError``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import temporalio.activity
import temporalio.converter
import temporalio.worker
from temporalio.exceptions import ApplicationError

from chio_receipts.interceptor._client import ChioClient
from chio_receipts.interceptor._digest import ArgumentKey, argument_digest
from chio_receipts.interceptor._errors import (
    CONFIG_ERROR_TYPE,
    DENIED_ERROR_TYPE,
    SIDECAR_ERROR_TYPE,
    SINK_ERROR_TYPE,
    ChioSidecarError,
    ChioSidecarProtocolError,
    ChioTemporalConfigError,
    ChioTemporalError,
    UnknownRunError,
)
from chio_receipts.interceptor._evaluator import Evaluator
from chio_receipts.interceptor._grants import ActivityGrantOverride, GrantResolver, WorkflowGrant
from chio_receipts.interceptor._model import (
    EvaluationRequest,
    SignedReceipt,
    is_subset,
    now_us,
    uuid7,
)
from chio_receipts.interceptor._receipt import WorkflowReceipt, WorkflowStepReceipt, parse_outcome
from chio_receipts.interceptor._workflow_side import DenialUnwrappingWorkflowInterceptor
from chio_receipts.schemas import (
    CompletionSource,
    ReceiptSink,
    ReceiptSinkError,
    RunCompletion,
    Verdict,
    receipt_hash,
)

__all__ = ["ChioActivityInterceptor", "InterceptorStats"]

_log = logging.getLogger(__name__)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def _us(value: datetime | None) -> int:
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICRO


@dataclass(slots=True)
class InterceptorStats:
    """Counters of one interceptor (monotonic; read them for metrics)."""

    evaluations: int = 0
    allowed: int = 0
    denied: int = 0
    sidecar_errors: int = 0
    sink_errors: int = 0
    evicted_runs: int = 0


@dataclass(slots=True)
class _Run:
    receipt: WorkflowReceipt
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_hash: bytes = b""
    completion: RunCompletion | None = None
    completion_task: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class _Resolution:
    grant: WorkflowGrant | None
    deny_reason: str | None = None
    config_error: bool = False


class ChioActivityInterceptor(temporalio.worker.Interceptor):
    """Worker interceptor gating every activity attempt through the chio sidecar.

    ``chio_client`` (a :class:`ChioClient`) or ``sidecar_url`` (a client is made and owned) or
    ``evaluator`` (any :class:`Evaluator`) supplies decisions. Tool server of an attempt =
    ``activity_tool_server_map.get(activity_type, default_tool_server)``. ``receipt_sink`` gets
    every step receipt as it is made, completion events and flushed envelopes.

    Keyword-only extras: ``argument_key`` (HMAC key for argument digests; a random per-process
    key when omitted, so digests only compare within the process), ``grant_resolver`` (fallback
    grant lookup from ``activity.Info``), ``identity`` (worker identity in receipts),
    ``max_runs`` (bound of in-process run state), ``payload_converter`` (canonical argument
    encoding; Temporal's default converter when omitted), ``unwrap_denials`` (workflow code
    sees a denied activity as the ``ApplicationError`` itself rather than wrapped in
    ``ActivityError``, so the seed's ``except ApplicationError`` saga matches it; default on).

    There is deliberately no ``scope_map``: scope travels with the grant's capability.
    """

    def __init__(
        self,
        *,
        chio_client: ChioClient | None = None,
        sidecar_url: str | None = None,
        default_tool_server: str = "default",
        activity_tool_server_map: Mapping[str, str] | None = None,
        receipt_sink: ReceiptSink | None = None,
        evaluator: Evaluator | None = None,
        argument_key: ArgumentKey | None = None,
        grant_resolver: GrantResolver | None = None,
        identity: str | None = None,
        max_runs: int = 10_000,
        payload_converter: temporalio.converter.PayloadConverter | None = None,
        unwrap_denials: bool = True,
    ) -> None:
        self._owned_client: ChioClient | None = None
        if evaluator is not None:
            self._evaluator = evaluator
        elif chio_client is not None:
            self._evaluator = chio_client.evaluator
        elif sidecar_url is not None:
            self._owned_client = ChioClient(sidecar_url)
            self._evaluator = self._owned_client.evaluator
        else:
            raise ChioTemporalConfigError(
                "ChioActivityInterceptor needs chio_client=, sidecar_url= or evaluator="
            )
        if max_runs < 1:
            raise ChioTemporalConfigError("max_runs must be at least 1")
        self.sidecar_url = sidecar_url
        self.default_tool_server = default_tool_server
        self.activity_tool_server_map: dict[str, str] = dict(activity_tool_server_map or {})
        self.receipt_sink = receipt_sink
        self.identity = identity or f"{os.getpid()}@{socket.gethostname()}"
        self.stats = InterceptorStats()
        self._unwrap_denials = unwrap_denials
        if argument_key is None:
            _log.info(
                "no argument_key configured: argument digests use a random per-process key and "
                "compare only within this process"
            )
        self._argument_key = argument_key or ArgumentKey.generate()
        # None = Temporal's default converter, which canonical_arguments can skip for plain JSON.
        self._converter = payload_converter
        self._resolver = grant_resolver
        self._grants: dict[tuple[str, str | None], WorkflowGrant] = {}
        self._prune_grants_at = 1024
        self._overrides: dict[str, ActivityGrantOverride] = {}
        self._runs: OrderedDict[tuple[str, str], _Run] = OrderedDict()
        self._max_runs = max_runs
        # Guards the dicts above: finalize_workflow may be called from a sync activity's thread.
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"ChioActivityInterceptor(evaluator={self._evaluator!r}, "
            f"default_tool_server={self.default_tool_server!r}, runs={len(self._runs)})"
        )

    # -- Temporal hook -------------------------------------------------------------------------

    def intercept_activity(
        self, next: temporalio.worker.ActivityInboundInterceptor
    ) -> temporalio.worker.ActivityInboundInterceptor:
        """Wrap every activity with the gate."""
        return _ActivityInbound(next, self)

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[temporalio.worker.WorkflowInboundInterceptor] | None:
        """Unwrap denials for workflow code (see ``unwrap_denials``)."""
        return DenialUnwrappingWorkflowInterceptor if self._unwrap_denials else None

    # -- grants ----------------------------------------------------------------------------------

    def register_workflow_grant(self, grant: WorkflowGrant) -> None:
        """Register ``grant`` for its workflow_id (and run_id, if pinned). Replaces an earlier
        grant for the same key. Grants whose capability expired are pruned as the table grows."""
        with self._lock:
            self._grants[(grant.workflow_id, grant.run_id)] = grant
            if len(self._grants) > self._prune_grants_at:
                # Grants are registered per workflow and never flushed: drop expired ones
                # whenever the table doubles, so a long-lived worker stays bounded.
                now = now_us()
                for key in [k for k, g in self._grants.items() if g.token.expired(now)]:
                    del self._grants[key]
                self._prune_grants_at = max(1024, 2 * len(self._grants))

    def unregister_workflow_grant(self, workflow_id: str, run_id: str | None = None) -> None:
        """Forget a registered grant (no error if absent)."""
        with self._lock:
            self._grants.pop((workflow_id, run_id), None)

    def register_activity_grant_override(
        self, activity_type: str, fn: ActivityGrantOverride
    ) -> None:
        """Register ``fn(activity.Info) -> WorkflowGrant | None`` for ``activity_type``.

        The returned grant's scope must be a subset of the workflow grant's; otherwise the attempt
        is denied with a receipt and fails with a non-retryable ``ChioTemporalConfigError``.
        """
        if not callable(fn):
            raise ChioTemporalConfigError("a grant override must be callable")
        with self._lock:
            self._overrides[activity_type] = fn

    def tool_server_for(self, activity_type: str) -> str:
        """The tool server an activity type maps to."""
        return self.activity_tool_server_map.get(activity_type, self.default_tool_server)

    def workflow_grant_for(self, workflow_id: str, run_id: str | None) -> WorkflowGrant | None:
        """The registered grant for this run: pinned to the run first, then to the workflow."""
        with self._lock:
            if run_id is not None:
                grant = self._grants.get((workflow_id, run_id))
                if grant is not None:
                    return grant
            return self._grants.get((workflow_id, None))

    def _resolve(self, info: temporalio.activity.Info) -> _Resolution:
        workflow_id = info.workflow_id or ""
        base = self.workflow_grant_for(workflow_id, info.workflow_run_id)
        if base is None and self._resolver is not None:
            base = self._resolver(info)
        if base is None:
            return _Resolution(
                None,
                f"no WorkflowGrant for workflow {workflow_id!r} run {info.workflow_run_id!r}: "
                "register one with interceptor.register_workflow_grant(WorkflowGrant("
                "workflow_id=..., token=...)) before starting the workflow, or pass "
                "grant_resolver= to ChioActivityInterceptor",
            )
        override = self._overrides.get(info.activity_type)
        if override is None:
            return _Resolution(base)
        narrowed = override(info)
        if narrowed is None:
            return _Resolution(base)
        if not narrowed.scope or not is_subset(narrowed.scope, base.scope):
            extra = sorted(set(narrowed.scope) - set(base.scope))
            return _Resolution(
                narrowed,
                f"grant override for activity type {info.activity_type!r} has scope "
                f"{list(narrowed.scope)} which is not a subset of the workflow grant's "
                f"{list(base.scope)} (outside it: {extra})",
                config_error=True,
            )
        return _Resolution(narrowed)

    # -- run state -------------------------------------------------------------------------------

    def _run(self, namespace: str, workflow_id: str, run_id: str, *, create: bool) -> _Run | None:
        key = (workflow_id, run_id)
        with self._lock:
            run = self._runs.get(key)
            if run is not None:
                self._runs.move_to_end(key)
                return run
            if not create:
                return None
            run = _Run(
                WorkflowReceipt(
                    workflow_id=workflow_id, run_id=run_id, namespace=namespace, started_at=0
                )
            )
            self._runs[key] = run
            while len(self._runs) > self._max_runs:
                (old_wf, old_run), _ = self._runs.popitem(last=False)
                self.stats.evicted_runs += 1
                _log.warning(
                    "evicted in-process receipt state of run %s/%s (max_runs=%d); its receipts "
                    "already went to the sink",
                    old_wf,
                    old_run,
                    self._max_runs,
                )
            return run

    def workflow_receipt(self, *, workflow_id: str, run_id: str) -> WorkflowReceipt:
        """The in-flight :class:`WorkflowReceipt` of a run (``UnknownRunError`` if none)."""
        run = self._run("", workflow_id, run_id, create=False)
        if run is None:
            raise self._unknown(workflow_id, run_id)
        return run.receipt

    def _unknown(self, workflow_id: str, run_id: str) -> UnknownRunError:
        return UnknownRunError(
            f"no workflow receipt held for workflow_id={workflow_id!r} run_id={run_id!r}: this "
            "worker never executed an activity of that run, it was already flushed, or it was "
            f"evicted (more than max_runs={self._max_runs} unflushed runs)"
        )

    # -- the gate ----------------------------------------------------------------------------------

    async def before_attempt(self, info: temporalio.activity.Info, args: Sequence[Any]) -> None:
        """Evaluate one attempt; returns when it may run, raises ``ApplicationError`` if not."""
        started_at = now_us()
        workflow_id = info.workflow_id or ""
        run_id = info.workflow_run_id or ""
        resolution = self._resolve(info)
        grant = resolution.grant
        digest = argument_digest(self._argument_key, args, self._converter)
        run = self._run(info.namespace, workflow_id, run_id, create=True)
        assert run is not None  # noqa: S101 - create=True always returns a run
        async with run.lock:
            request = EvaluationRequest(
                capability_id=grant.capability_id if grant else "",
                tool_server=self.tool_server_for(info.activity_type),
                tool=info.activity_type,
                namespace=info.namespace,
                workflow_id=workflow_id,
                run_id=run_id,
                workflow_type=info.workflow_type or "",
                task_queue=info.task_queue,
                activity_id=info.activity_id,
                activity_type=info.activity_type,
                attempt=info.attempt,
                is_local=info.is_local,
                argument_digest=digest,
                argument_key_id=self._argument_key.key_id,
                scheduled_at=_us(info.current_attempt_scheduled_time),
                started_at=started_at,
                worker_identity=self.identity,
                prev_hash=run.last_hash,
                deny_reason=resolution.deny_reason,
            )
            self.stats.evaluations += 1
            try:
                signed = await self._evaluator.evaluate(request)
                self._check(request, signed)
            except ChioSidecarError as exc:
                self.stats.sidecar_errors += 1
                raise ApplicationError(
                    f"policy sidecar failed, the attempt will be retried: {exc}",
                    {"activity_type": info.activity_type, "error": type(exc).__name__},
                    type=SIDECAR_ERROR_TYPE,
                    non_retryable=False,
                ) from exc
            receipt = signed.receipt
            if self.receipt_sink is not None:
                try:
                    await self.receipt_sink.publish_step(receipt, signed.body)
                except ReceiptSinkError as exc:
                    self.stats.sink_errors += 1
                    raise ApplicationError(
                        f"receipt sink refused receipt {receipt.receipt_id}; the attempt will be "
                        f"retried: {exc}",
                        {"receipt_id": receipt.receipt_id},
                        type=SINK_ERROR_TYPE,
                        non_retryable=False,
                    ) from exc
            run.last_hash = receipt_hash(signed.body)
            run.receipt.add_step(WorkflowStepReceipt(receipt=receipt, body=signed.body))
        if receipt.verdict is Verdict.ALLOW:
            self.stats.allowed += 1
            return
        self.stats.denied += 1
        details = {
            "receipt_id": receipt.receipt_id,
            "reason": receipt.reason,
            "verdict": receipt.verdict.value,
            "activity_type": info.activity_type,
            "capability_id": receipt.capability_id,
        }
        if resolution.config_error:
            raise ApplicationError(
                f"misconfigured grant override: {receipt.reason}",
                details,
                type=CONFIG_ERROR_TYPE,
                non_retryable=True,
            )
        raise ApplicationError(
            f"capability denied: {receipt.reason}",
            details,
            type=DENIED_ERROR_TYPE,
            non_retryable=True,
        )

    @staticmethod
    def _check(request: EvaluationRequest, signed: SignedReceipt) -> None:
        receipt = signed.receipt
        if not request.matches(receipt):
            raise ChioSidecarProtocolError("the sidecar's receipt does not match the request")
        if request.deny_reason is not None and receipt.verdict is not Verdict.DENY:
            raise ChioSidecarProtocolError("the sidecar allowed an attempt the worker denied")
        if receipt.verdict not in (Verdict.ALLOW, Verdict.DENY):
            raise ChioSidecarProtocolError(f"the sidecar answered verdict {receipt.verdict}")

    # -- aggregation -------------------------------------------------------------------------------

    def finalize_workflow(
        self,
        *,
        workflow_id: str,
        run_id: str,
        outcome: str = "success",
        parent_workflow_ids: Sequence[str] = (),
    ) -> None:
        """Mark a run completed (``"success"`` | ``"failure"`` | ``"cancelled"``).

        Emits a ``RunCompletion`` (source FINALIZE) to the sink: on a tracked task when called
        on the event loop, otherwise at the next :meth:`flush_workflow_receipt`. Finalizing
        twice with the same outcome is a no-op; with another outcome it is an error.
        """
        kind = parse_outcome(outcome)
        run = self._run("", workflow_id, run_id, create=True)
        assert run is not None  # noqa: S101 - create=True always returns a run
        with self._lock:
            wr = run.receipt
            if wr.completed:
                if wr.outcome is not kind:
                    raise ChioTemporalError(
                        f"run {workflow_id}/{run_id} was already finalized as "
                        f"{wr.outcome.value.lower()}, not {outcome}"
                    )
                return
            now = now_us()
            wr.finalize(kind, now)
            if parent_workflow_ids:
                wr.parent_workflow_ids = tuple(parent_workflow_ids)
            run.completion = RunCompletion(
                event_id=uuid7(),
                namespace=wr.namespace,
                workflow_id=workflow_id,
                run_id=run_id,
                workflow_type=wr.workflow_type,
                task_queue=wr.task_queue,
                outcome=kind,
                started_at=wr.started_at,
                closed_at=now,
                parent_workflow_ids=wr.parent_workflow_ids,
                expected_steps=None,
                source=CompletionSource.FINALIZE,
                emitted_at=now,
            )
        if self.receipt_sink is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the loop: published by flush_workflow_receipt
        task = asyncio.create_task(self._publish_completion(run))
        run.completion_task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("publishing a run completion failed", exc_info=task.exception())

    async def _publish_completion(self, run: _Run) -> None:
        event, run.completion = run.completion, None
        if event is not None and self.receipt_sink is not None:
            published = False
            try:
                await self.receipt_sink.publish_completion(event)
                published = True
            finally:
                if not published:
                    run.completion = event  # kept for the flush to retry

    async def flush_workflow_receipt(self, *, workflow_id: str, run_id: str) -> dict[str, Any]:
        """Build the run's ``chio-temporal/v1`` envelope, hand it to the sink, free the run.

        Raises :class:`UnknownRunError` for a run this worker does not hold, and the sink's
        ``ReceiptSinkError`` if it refuses (the run is then kept, so the flush can be retried).
        """
        run = self._run("", workflow_id, run_id, create=False)
        if run is None:
            raise self._unknown(workflow_id, run_id)
        async with run.lock:
            task = run.completion_task
            if task is not None:
                run.completion_task = None
                try:
                    await task
                except ReceiptSinkError:
                    _log.warning("retrying the completion of %s/%s at flush", workflow_id, run_id)
            if run.completion is not None:
                await self._publish_completion(run)
            envelope = run.receipt.to_envelope()
            if self.receipt_sink is not None:
                await self.receipt_sink.publish_envelope(envelope)
            with self._lock:
                if self._runs.get((workflow_id, run_id)) is run:
                    del self._runs[(workflow_id, run_id)]
        return envelope

    @property
    def open_runs(self) -> int:
        """Number of runs held in process (bounded by ``max_runs``)."""
        return len(self._runs)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for pending completion publishes and close a client this interceptor made."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._owned_client is not None:
            await self._owned_client.aclose()


class _ActivityInbound(temporalio.worker.ActivityInboundInterceptor):
    """Per-activity gate: holds only ``next`` and the root interceptor."""

    def __init__(
        self, next: temporalio.worker.ActivityInboundInterceptor, root: ChioActivityInterceptor
    ) -> None:
        super().__init__(next)
        self._root = root

    async def execute_activity(self, input: temporalio.worker.ExecuteActivityInput) -> Any:
        await self._root.before_attempt(temporalio.activity.info(), input.args)
        return await super().execute_activity(input)
