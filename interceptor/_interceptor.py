"""``ChioActivityInterceptor``: evaluates every activity attempt before its body runs.

The root interceptor holds the dependencies (evaluator, argument key) and composes the grant
registry and the run ledger (which holds the sink); the per-activity inbound interceptor holds
only ``next`` and the root, reads the attempt's identity from ``activity.info()`` and ends in
``super().execute_activity``.

Per attempt (regular and local activities, every retry):

1. resolve the grant: registered for (workflow_id, run_id), then for workflow_id, then the
   ``grant_resolver``; an activity-type override may narrow it (never widen it);
2. digest the arguments (keyed HMAC) and convert them to the call's parameters
   (``{"args": [...]}`` as Temporal's payload converter writes them as JSON, or
   ``{"args_digest": ...}`` when they have no JSON form; see ``_parameters``);
3. ask the sidecar to decide and sign, chaining ``prev_hash`` to this worker's previous receipt
   of the run; the sidecar signs the parameters into the step's Chio receipt, or, with
   ``redact_parameters``, only their hash. Parameters are never logged nor put in an error;
4. publish the signed receipt to the sink and append it to the run's ``WorkflowReceipt``;
5. allow -> run the body; deny -> ``ApplicationError(type=DENIED_ERROR_TYPE,
   non_retryable=True)``; sidecar failure -> ``ApplicationError(type=SIDECAR_ERROR_TYPE)``
   (retryable, no receipt, never an allow); sink failure -> ``ApplicationError(type=
   SINK_ERROR_TYPE)`` (retryable, the body does not run);
6. after the body: an outcome record (``StepOutcome``: completed, failed with its error type,
   cancelled, timed out; duration; keyed digest of the result) linked to the decision, signed
   by the evaluator and published off the activity's path (see ``_outcomes``). A sidecar or
   sink failure at step 3 or 4 leaves an unsigned ``GATE_FAILED`` record instead.

With ``temporalio.contrib.opentelemetry.TracingInterceptor`` before this interceptor in the
worker's list, the ``RunActivity`` span's trace and span ids go into the receipt (signed by the
sidecar) and the outcome record (see ``_trace``).

Receipts never enter workflow history: activity results are returned untouched.

Workflow side: a denied activity reaches workflow code as the ``ApplicationError`` itself (not
wrapped in ``ActivityError``), so the seed's ``except ApplicationError`` saga matches it; see
``_workflow_side`` and ``unwrap_denials``.

The root composes two parts, each in its own module: the :class:`GrantRegistry` (grants,
overrides, the resolver, pruning; step 1) and the :class:`RunLedger` (per-run state: the chain
head, the in-process ``WorkflowReceipt``, LRU eviction beyond ``max_runs``, finalize and flush;
step 4; runs never flushed are evicted, and a later flush raises ``UnknownRunError``). The gate
itself, :meth:`ChioActivityInterceptor.before_attempt`, reads as resolve -> evaluate -> record
-> raise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import temporalio.activity
import temporalio.converter
import temporalio.worker
from temporalio.exceptions import ApplicationError

from chio_receipts.interceptor._budget_activity import CURRENT_DECISION
from chio_receipts.interceptor._client import ChioClient
from chio_receipts.interceptor._digest import ArgumentKey, result_digest
from chio_receipts.interceptor._errors import (
    APPROVAL_PENDING_ERROR_TYPE,
    CONFIG_ERROR_TYPE,
    DENIED_ERROR_TYPE,
    SIDECAR_ERROR_TYPE,
    SINK_ERROR_TYPE,
    ChioSidecarError,
    ChioSidecarProtocolError,
    ChioSidecarUnavailable,
    ChioTemporalConfigError,
)
from chio_receipts.interceptor._evaluator import Evaluator
from chio_receipts.interceptor._grant_registry import GrantRegistry, GrantResolution
from chio_receipts.interceptor._grants import ActivityGrantOverride, GrantResolver, WorkflowGrant
from chio_receipts.interceptor._kernel_http import ChioKernelSidecar
from chio_receipts.interceptor._model import EvaluationRequest, SignedReceipt, now_us
from chio_receipts.interceptor._outcomes import (
    SIDECAR_ERROR,
    SIDECAR_UNREACHABLE,
    SINK_REFUSED,
    OutcomeRecorder,
    body_outcome,
    classify_end,
    gate_outcome,
)
from chio_receipts.interceptor._parameters import call_parameters
from chio_receipts.interceptor._receipt import WorkflowReceipt
from chio_receipts.interceptor._run_ledger import RunLedger, RunState
from chio_receipts.interceptor._sdk import AnyClient, evaluator_for
from chio_receipts.interceptor._trace import current_trace_ids
from chio_receipts.interceptor._workflow_side import (
    DenialUnwrappingWorkflowInterceptor,
    _ApprovalsOnly,
)
from chio_receipts.schemas import (
    AsyncCloseable,
    ChioWireError,
    ReceiptSink,
    ReceiptSinkError,
    StepReceipt,
    Verdict,
    approval_state,
    parameter_hash,
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
    pending_approval: int = 0
    """Attempts held for a person's approval (each fails non-retryably; the workflow waits)."""
    sidecar_errors: int = 0
    sink_errors: int = 0
    evicted_runs: int = 0
    outcomes_recorded: int = 0
    """Outcome records queued (bodies that ended, gate failures)."""
    outcomes_published: int = 0
    """Outcome records the sink accepted."""
    outcomes_unsigned: int = 0
    """Outcome records published without a signature because signing failed."""
    outcomes_dropped: int = 0
    """Outcome records dropped: oldest of a full queue or backlog, unencodable, or not made."""
    outcomes_backlogged: int = 0
    """Times a record waited in the backlog because the sink refused it."""
    outcomes_lost: int = 0
    """Outcome records still pending when the interceptor closed."""
    gate_failures: int = 0
    """Attempts refused at the gate with a GATE_FAILED record (sidecar or sink failure)."""


class ChioActivityInterceptor(AsyncCloseable, temporalio.worker.Interceptor):
    """Worker interceptor gating every activity attempt through the chio sidecar.

    ``chio_client`` (a ``chio_sdk.ChioClient``, the seed's, or the project's
    :class:`ChioClient`; see :func:`~chio_receipts.interceptor._sdk.evaluator_for`: with the
    SDK's client, decisions come from the sidecar at ``sidecar_url``, else at the client's URL)
    or ``sidecar_url`` alone (a client is made and owned) or ``evaluator`` (any
    :class:`Evaluator`) supplies decisions. Tool server of an attempt =
    ``activity_tool_server_map.get(activity_type, default_tool_server)``. ``receipt_sink`` gets
    every step receipt as it is made, completion events and flushed envelopes.

    Keyword-only extras: ``argument_key`` (HMAC key for argument digests; a random per-process
    key when omitted, so digests only compare within the process), ``grant_resolver`` (fallback
    grant lookup from ``activity.Info``), ``identity`` (worker identity in receipts),
    ``max_runs`` (bound of in-process run state), ``payload_converter`` (canonical argument
    encoding; Temporal's default converter when omitted), ``unwrap_denials`` (workflow code
    sees a denied activity as the ``ApplicationError`` itself rather than wrapped in
    ``ActivityError``, so the seed's ``except ApplicationError`` saga matches it; default on),
    ``redact_parameters`` (the sidecar signs only the hash of each call's parameters, so no
    argument value leaves the worker inside a receipt; default off, so the receipt carries the
    parameters and a verifier can check their hash), ``record_outcomes`` (an outcome record per
    attempt whose body ran, and per gate failure; default on), ``outcome_queue_size`` and
    ``outcome_backlog_size`` (bounds of the outcome queue and of the backlog kept while the sink
    refuses), ``outcome_drain_timeout`` (seconds :meth:`aclose` waits for pending outcomes).

    There is deliberately no ``scope_map``: scope travels with the grant's capability.
    """

    def __init__(
        self,
        *,
        chio_client: AnyClient | None = None,
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
        redact_parameters: bool = False,
        record_outcomes: bool = True,
        outcome_queue_size: int = 10_000,
        outcome_backlog_size: int = 1_000,
        outcome_drain_timeout: float = 5.0,
    ) -> None:
        self._owned: AsyncCloseable | None = None
        if evaluator is not None:
            self._evaluator = evaluator
        elif chio_client is not None:
            self._evaluator, self._owned = evaluator_for(chio_client, sidecar_url)
        elif sidecar_url is not None:
            self._owned = owned = ChioClient(sidecar_url)
            self._evaluator = owned.evaluator
        else:
            raise ChioTemporalConfigError(
                "ChioActivityInterceptor needs chio_client=, sidecar_url= or evaluator="
            )
        if max_runs < 1:
            raise ChioTemporalConfigError("max_runs must be at least 1")
        if outcome_queue_size < 1 or outcome_backlog_size < 1:
            raise ChioTemporalConfigError(
                "outcome_queue_size and outcome_backlog_size must be at least 1"
            )
        self.sidecar_url = sidecar_url
        self.default_tool_server = default_tool_server
        self.activity_tool_server_map: dict[str, str] = dict(activity_tool_server_map or {})
        self.identity = identity or f"{os.getpid()}@{socket.gethostname()}"
        self.stats = InterceptorStats()
        self._unwrap_denials = unwrap_denials
        self.redact_parameters = redact_parameters
        if argument_key is None:
            _log.info(
                "no argument_key configured: argument digests use a random per-process key and "
                "compare only within this process"
            )
        self._argument_key = argument_key or ArgumentKey.generate()
        # None = Temporal's default converter, which canonical_arguments can skip for plain JSON.
        self._converter = payload_converter
        self._grants = GrantRegistry(grant_resolver)
        self._runs = RunLedger(max_runs=max_runs, sink=receipt_sink, on_evict=self._count_eviction)
        self.record_outcomes = record_outcomes
        self._outcome_drain_timeout = outcome_drain_timeout
        self._outcomes = OutcomeRecorder(
            signer=getattr(self._evaluator, "record_outcome", None),
            sink=lambda: self._runs.sink,
            stats=self.stats,
            max_queue=outcome_queue_size,
            max_backlog=outcome_backlog_size,
        )

    def __repr__(self) -> str:
        return (
            f"ChioActivityInterceptor(evaluator={self._evaluator!r}, "
            f"default_tool_server={self.default_tool_server!r}, runs={len(self._runs)})"
        )

    @property
    def evaluator(self) -> Evaluator:
        """The evaluator this interceptor asks for decisions."""
        return self._evaluator

    @property
    def receipt_sink(self) -> ReceiptSink | None:
        """Where step receipts, completion events and flushed envelopes go."""
        return self._runs.sink

    @receipt_sink.setter
    def receipt_sink(self, sink: ReceiptSink | None) -> None:
        self._runs.sink = sink

    def _count_eviction(self) -> None:
        self.stats.evicted_runs += 1

    # -- Temporal hook -------------------------------------------------------------------------

    def intercept_activity(
        self, next: temporalio.worker.ActivityInboundInterceptor
    ) -> temporalio.worker.ActivityInboundInterceptor:
        """Wrap every activity with the gate."""
        return _ActivityInbound(next, self)

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[temporalio.worker.WorkflowInboundInterceptor] | None:
        """Wait for approval decisions, and unwrap denials for workflow code (see
        ``unwrap_denials``)."""
        return DenialUnwrappingWorkflowInterceptor if self._unwrap_denials else _ApprovalsOnly

    # -- grants (the GrantRegistry) --------------------------------------------------------------

    def register_workflow_grant(self, grant: WorkflowGrant) -> None:
        """Register ``grant`` for its workflow_id (and run_id, if pinned). Replaces an earlier
        grant for the same key. Grants whose capability expired are pruned as the table grows."""
        self._grants.register(grant)

    def unregister_workflow_grant(self, workflow_id: str, run_id: str | None = None) -> None:
        """Forget a registered grant (no error if absent)."""
        self._grants.unregister(workflow_id, run_id)

    def register_activity_grant_override(
        self, activity_type: str, fn: ActivityGrantOverride
    ) -> None:
        """Register ``fn(activity.Info) -> WorkflowGrant | None`` for ``activity_type``.

        The returned grant's scope must be a subset of the workflow grant's; otherwise the attempt
        is denied with a receipt and fails with a non-retryable ``ChioTemporalConfigError``.
        """
        self._grants.register_override(activity_type, fn)

    def workflow_grant_for(self, workflow_id: str, run_id: str | None) -> WorkflowGrant | None:
        """The registered grant for this run: pinned to the run first, then to the workflow."""
        return self._grants.grant_for(workflow_id, run_id)

    def tool_server_for(self, activity_type: str) -> str:
        """The tool server an activity type maps to."""
        return self.activity_tool_server_map.get(activity_type, self.default_tool_server)

    # -- the gate --------------------------------------------------------------------------------

    async def before_attempt(
        self,
        info: temporalio.activity.Info,
        args: Sequence[Any],
        trace: tuple[str, str] | None = None,
    ) -> SignedReceipt:
        """Evaluate one attempt; returns its allow when it may run, raises ``ApplicationError``
        if not. ``trace`` is ``(trace_id, span_id)`` (default: the current OpenTelemetry span's
        ids, empty without one)."""
        started_at = now_us()
        trace_id, span_id = current_trace_ids() if trace is None else trace
        resolution = self._grants.resolve(info)
        self._present(resolution.grant)
        run = self._runs.open(info.namespace, info.workflow_id or "", info.workflow_run_id or "")
        async with run.lock:  # one attempt of a run at a time: receipts chain in order
            request, sent_hash = self._request(
                info, args, resolution, run.last_hash, started_at, (trace_id, span_id)
            )
            signed = await self._evaluate(request, sent_hash)
            await self._record(run, signed, request)
        self._raise_unless_allowed(signed.receipt, resolution)
        return signed

    def after_attempt(
        self,
        info: temporalio.activity.Info,
        decision: SignedReceipt,
        *,
        body_started_ns: int,
        exc: BaseException | None = None,
        result: Any = None,
        heartbeat_gap_ns: int | None = None,
    ) -> None:
        """Queue the outcome record of an allowed attempt whose body ended (returns at once).

        ``body_started_ns`` is :func:`time.perf_counter_ns` when the body started; ``exc`` what
        it raised, else ``result`` what it returned (only its keyed digest is kept);
        ``heartbeat_gap_ns`` the longest the body went without a heartbeat, when watched. It
        never raises: the activity's own result or error is what Temporal gets."""
        if not self.record_outcomes:
            return
        try:
            self._queue_outcome(info, decision, body_started_ns, exc, result, heartbeat_gap_ns)
        except Exception as problem:  # noqa: BLE001 - an outcome never changes the attempt
            self.stats.outcomes_dropped += 1
            _log.warning("outcome record not made (%s)", type(problem).__name__)

    def _queue_outcome(
        self,
        info: temporalio.activity.Info,
        decision: SignedReceipt,
        body_started_ns: int,
        exc: BaseException | None,
        result: Any,
        heartbeat_gap_ns: int | None,
    ) -> None:
        elapsed_us = (time.perf_counter_ns() - body_started_ns) // 1000
        cancellation = None
        if exc is not None:
            with contextlib.suppress(RuntimeError):
                cancellation = temporalio.activity.cancellation_details()
        status, error_type = classify_end(
            exc,
            cancellation=cancellation,
            elapsed_us=elapsed_us,
            start_to_close=info.start_to_close_timeout,
            heartbeat=info.heartbeat_timeout,
            schedule_to_close=info.schedule_to_close_timeout,
            heartbeat_gap_us=None if heartbeat_gap_ns is None else heartbeat_gap_ns // 1000,
        )
        digest = ""
        if exc is None:
            digest = result_digest(self._argument_key, result, self._converter)
        outcome = functools.partial(  # built by the background task, off the activity's path
            body_outcome,
            decision.receipt,
            status=status,
            error_type=error_type,
            ended_at=now_us(),
            duration_us=elapsed_us,
            result_digest=digest,
            result_key_id=self._argument_key.key_id,
        )
        self._outcomes.submit(outcome, decision=decision.receipt, sign=True)

    def _gate_failed(self, request: EvaluationRequest, reason: str) -> None:
        """Queue the unsigned GATE_FAILED record of an attempt refused before its body ran."""
        if not self.record_outcomes:
            return
        self.stats.gate_failures += 1
        try:
            outcome = gate_outcome(request, reason, ended_at=now_us())
            self._outcomes.submit(outcome, decision=None, sign=False)
        except Exception as problem:  # noqa: BLE001 - the gate's own error is what is raised
            self.stats.outcomes_dropped += 1
            _log.warning("gate-failure record not made (%s)", type(problem).__name__)

    async def flush_outcomes(self, wait_s: float = 5.0) -> bool:
        """Wait until every outcome record queued so far is accepted by the sink (tests,
        benchmarks, orderly shutdown); False after ``wait_s`` seconds."""
        return await self._outcomes.flush(wait_s)

    def _present(self, grant: WorkflowGrant | None) -> None:
        """Give a kernel-mediated evaluator the grant's raw signed token, which it presents."""
        evaluator = self._evaluator
        if (
            grant is not None
            and grant.raw_token is not None
            and isinstance(evaluator, ChioKernelSidecar)
            and evaluator.raw_token(grant.capability_id) is None
        ):
            evaluator.add_token(grant.raw_token, trust_issuer=False)

    def _request(
        self,
        info: temporalio.activity.Info,
        args: Sequence[Any],
        resolution: GrantResolution,
        prev_hash: bytes,
        started_at: int,
        trace: tuple[str, str] = ("", ""),
    ) -> tuple[EvaluationRequest, str]:
        """The attempt's evaluation request, and the ``parameter_hash`` of its parameters."""
        grant = resolution.grant
        digest, parameters, sent_hash = call_parameters(self._argument_key, args, self._converter)
        request = EvaluationRequest(
            capability_id=grant.capability_id if grant else "",
            tool_server=self.tool_server_for(info.activity_type),
            tool=info.activity_type,
            namespace=info.namespace,
            workflow_id=info.workflow_id or "",
            run_id=info.workflow_run_id or "",
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
            prev_hash=prev_hash,
            deny_reason=resolution.deny_reason,
            parameters=parameters,
            redact_parameters=self.redact_parameters,
            trace_id=trace[0],
            span_id=trace[1],
        )
        return request, sent_hash

    async def _evaluate(
        self, request: EvaluationRequest, sent_hash: str | None = None
    ) -> SignedReceipt:
        """The sidecar's signed decision; a sidecar failure is a retryable error, never an
        allow."""
        self.stats.evaluations += 1
        try:
            signed = await self._evaluator.evaluate(request)
            _check_answer(request, signed.receipt, sent_hash)
        except ChioSidecarError as exc:
            self.stats.sidecar_errors += 1
            unreachable = isinstance(exc, ChioSidecarUnavailable)
            self._gate_failed(request, SIDECAR_UNREACHABLE if unreachable else SIDECAR_ERROR)
            raise ApplicationError(
                f"policy sidecar failed, the attempt will be retried: {exc}",
                {"activity_type": request.activity_type, "error": type(exc).__name__},
                type=SIDECAR_ERROR_TYPE,
                non_retryable=False,
            ) from exc
        return signed

    async def _record(
        self, run: RunState, signed: SignedReceipt, request: EvaluationRequest
    ) -> None:
        """Publish the receipt and add it to the run; a refusing sink fails the attempt
        (retryable) before its body runs."""
        try:
            await self._runs.record(run, signed)
        except ReceiptSinkError as exc:
            self.stats.sink_errors += 1
            self._gate_failed(request, SINK_REFUSED)
            receipt_id = signed.receipt.receipt_id
            raise ApplicationError(
                f"receipt sink refused receipt {receipt_id}; the attempt will be retried: {exc}",
                {"receipt_id": receipt_id},
                type=SINK_ERROR_TYPE,
                non_retryable=False,
            ) from exc

    def _raise_unless_allowed(self, receipt: StepReceipt, resolution: GrantResolution) -> None:
        """Return for an allow; a deny fails the attempt for good."""
        if receipt.verdict is Verdict.ALLOW:
            self.stats.allowed += 1
            return
        if receipt.verdict is Verdict.PENDING_APPROVAL:
            self.stats.pending_approval += 1
            raise ApplicationError(
                f"approval required: {receipt.reason}",
                {
                    "approval_id": _approval_id(receipt),
                    "receipt_id": receipt.receipt_id,
                    "chio_receipt_id": _chio_id(receipt),
                    "activity_type": receipt.activity_type,
                },
                type=APPROVAL_PENDING_ERROR_TYPE,
                non_retryable=True,
            )
        self.stats.denied += 1
        details = {
            "receipt_id": receipt.receipt_id,
            "reason": receipt.reason,
            "verdict": receipt.verdict.value,
            "activity_type": receipt.activity_type,
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

    # -- runs (the RunLedger) --------------------------------------------------------------------

    def workflow_receipt(self, *, workflow_id: str, run_id: str) -> WorkflowReceipt:
        """The in-flight :class:`WorkflowReceipt` of a run (``UnknownRunError`` if none)."""
        return self._runs.get(workflow_id, run_id).receipt

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
        self._runs.finalize(workflow_id, run_id, outcome, parent_workflow_ids)

    async def flush_workflow_receipt(self, *, workflow_id: str, run_id: str) -> dict[str, Any]:
        """Build the run's ``chio-temporal/v1`` envelope, hand it to the sink, free the run.

        Raises :class:`UnknownRunError` for a run this worker does not hold, and the sink's
        ``ReceiptSinkError`` if it refuses (the run is then kept, so the flush can be retried).
        """
        return await self._runs.flush(workflow_id, run_id)

    @property
    def open_runs(self) -> int:
        """Number of runs held in process (bounded by ``max_runs``)."""
        return len(self._runs)

    # -- lifecycle -------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Drain pending outcome records (for at most ``outcome_drain_timeout``), wait for
        pending completion publishes and close a client this interceptor made."""
        await self._outcomes.aclose(self._outcome_drain_timeout)
        await self._runs.aclose()
        if self._owned is not None:
            await self._owned.aclose()


def _check_answer(
    request: EvaluationRequest, receipt: StepReceipt, sent_hash: str | None = None
) -> None:
    """Refuse a sidecar answer that is not a receipt of this request with a possible verdict."""
    if not request.matches(receipt):
        raise ChioSidecarProtocolError("the sidecar's receipt does not match the request")
    if request.deny_reason is not None and receipt.verdict is not Verdict.DENY:
        raise ChioSidecarProtocolError("the sidecar allowed an attempt the worker denied")
    if receipt.verdict not in (Verdict.ALLOW, Verdict.DENY, Verdict.PENDING_APPROVAL):
        raise ChioSidecarProtocolError(f"the sidecar answered verdict {receipt.verdict}")
    if receipt.chio_receipt:
        _check_parameters(request, receipt.chio_receipt, sent_hash)
    if receipt.verdict is Verdict.PENDING_APPROVAL and not _approval_id(receipt):
        raise ChioSidecarProtocolError("the sidecar held the attempt without an approval id")


def _chio_json(receipt: StepReceipt) -> dict[str, Any]:
    try:
        found = json.loads(receipt.chio_receipt) if receipt.chio_receipt else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _approval_id(receipt: StepReceipt) -> str:
    """The approval id a held attempt's Chio receipt names (empty if none)."""
    approval = approval_state(_chio_json(receipt))
    value = approval.get("approval_id") if approval is not None else None
    return value if isinstance(value, str) else ""


def _chio_id(receipt: StepReceipt) -> str:
    value = _chio_json(receipt).get("id")
    return value if isinstance(value, str) else ""


def _check_parameters(
    request: EvaluationRequest, chio_receipt: str, sent_hash: str | None = None
) -> None:
    """Refuse a Chio receipt that signs other parameters than the ones sent, or carries them
    when the worker asked for redaction (the messages never quote parameters)."""
    try:
        receipt = json.loads(chio_receipt)
        action = receipt["action"]
        mode = receipt.get("redaction_mode", "none")
        signed_hash = action["parameter_hash"]
        if sent_hash is None:  # the hash of the parameters sent, unless the caller kept it
            sent_hash = parameter_hash(request.parameters)
    except (ValueError, KeyError, TypeError, AttributeError, ChioWireError):
        raise ChioSidecarProtocolError(
            "the sidecar's Chio receipt has no readable action"
        ) from None
    if signed_hash != sent_hash:
        raise ChioSidecarProtocolError("the sidecar's Chio receipt signs other parameters")
    if request.redact_parameters and (mode == "none" or action.get("parameters") not in ({}, None)):
        raise ChioSidecarProtocolError("the sidecar did not redact the parameters")


class _Heartbeats(temporalio.worker.ActivityOutboundInterceptor):
    """Watches an attempt's heartbeats: the longest silence tells a heartbeat timeout apart."""

    def __init__(self, next: temporalio.worker.ActivityOutboundInterceptor) -> None:
        super().__init__(next)
        self.last_ns = 0
        self.max_gap_ns = 0

    def heartbeat(self, *details: Any) -> None:
        now = time.perf_counter_ns()
        if self.last_ns:
            self.max_gap_ns = max(self.max_gap_ns, now - self.last_ns)
        self.last_ns = now
        super().heartbeat(*details)

    def gap_until(self, now_ns: int) -> int:
        """The longest silence up to ``now_ns``, the current one included."""
        return max(self.max_gap_ns, now_ns - self.last_ns)


class _ActivityInbound(temporalio.worker.ActivityInboundInterceptor):
    """Per-activity gate: holds only ``next``, the root interceptor and the heartbeat watch."""

    def __init__(
        self, next: temporalio.worker.ActivityInboundInterceptor, root: ChioActivityInterceptor
    ) -> None:
        super().__init__(next)
        self._root = root
        self._beats: _Heartbeats | None = None

    def init(self, outbound: temporalio.worker.ActivityOutboundInterceptor) -> None:
        self._beats = _Heartbeats(outbound)
        super().init(self._beats)

    async def execute_activity(self, input: temporalio.worker.ExecuteActivityInput) -> Any:
        root = self._root
        info = temporalio.activity.info()
        decision = await root.before_attempt(info, input.args)
        started = time.perf_counter_ns()
        beats = self._beats
        if beats is not None:
            beats.last_ns = started
        # The body can read its decision's receipt id (current_receipt_id, for budget refunds).
        CURRENT_DECISION.set(decision.receipt)
        try:
            result = await super().execute_activity(input)
        except BaseException as exc:
            gap = beats.gap_until(time.perf_counter_ns()) if beats is not None else None
            root.after_attempt(
                info, decision, body_started_ns=started, exc=exc, heartbeat_gap_ns=gap
            )
            raise
        root.after_attempt(info, decision, body_started_ns=started, result=result)
        return result
