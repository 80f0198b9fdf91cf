"""The pure parts of outcome records: how a body ended, the records, the bounded background
path (queue overflow, unsigned fallback, the backlog while the sink refuses), result digests and
the trace context."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
import temporalio.converter
import temporalio.exceptions
from opentelemetry.sdk.trace import TracerProvider
from temporalio.activity import ActivityCancellationDetails
from temporalio.exceptions import ApplicationError

from chio_receipts.interceptor import (
    ArgumentKey,
    ChioActivityInterceptor,
    InMemoryReceiptSink,
    InterceptorStats,
    result_digest,
)
from chio_receipts.interceptor._outcomes import (
    OutcomeRecorder,
    body_outcome,
    classify_end,
    gate_outcome,
    server_timeout,
    timeout_kind,
)
from chio_receipts.interceptor._trace import current_trace_ids
from chio_receipts.schemas import (
    EvaluationRequest,
    ReceiptSinkError,
    SignedReceipt,
    StepOutcome,
    StepReceipt,
    StepStatus,
    Verdict,
    step_body,
    uuid7,
)
from chio_receipts.sidecar import LocalSidecar

pytestmark = pytest.mark.unit

S2C = timedelta(seconds=10)


# -- how a body ended ----------------------------------------------------------------------------


def test_a_returned_body_is_completed() -> None:
    assert classify_end(None) == (StepStatus.COMPLETED, "")


def test_a_failure_is_named_by_its_type_never_its_message() -> None:
    secret = "card 4111-1111 declined for customer 42"
    typed = ApplicationError(secret, type="CardDeclined", non_retryable=True)
    assert classify_end(typed) == (StepStatus.FAILED, "CardDeclined")
    assert classify_end(ApplicationError(secret)) == (StepStatus.FAILED, "ApplicationError")
    assert classify_end(ValueError(secret)) == (StepStatus.FAILED, "ValueError")
    assert classify_end(KeyError(secret)) == (StepStatus.FAILED, "KeyError")


def test_cancellations_are_cancelled_with_their_reason() -> None:
    requested = ActivityCancellationDetails(cancel_requested=True)
    shutdown = ActivityCancellationDetails(worker_shutdown=True)
    assert classify_end(asyncio.CancelledError()) == (StepStatus.CANCELLED, "")
    assert classify_end(asyncio.CancelledError(), cancellation=requested) == (
        StepStatus.CANCELLED,
        "",
    )
    temporal = temporalio.exceptions.CancelledError("Cancelled")
    assert classify_end(temporal, cancellation=shutdown) == (
        StepStatus.CANCELLED,
        "worker_shutdown",
    )
    paused = ActivityCancellationDetails(paused=True)
    assert classify_end(asyncio.CancelledError(), cancellation=paused)[1] == "paused"


def test_a_timed_out_cancellation_names_the_timeout() -> None:
    timed_out = ActivityCancellationDetails(timed_out=True)
    ran_out = classify_end(
        asyncio.CancelledError(),
        cancellation=timed_out,
        elapsed_us=9_950_000,
        start_to_close=S2C,
        heartbeat=timedelta(seconds=2),
    )
    assert ran_out == (StepStatus.TIMED_OUT, "start_to_close")
    silent = classify_end(
        asyncio.CancelledError(),
        cancellation=timed_out,
        elapsed_us=2_500_000,
        start_to_close=S2C,
        heartbeat=timedelta(seconds=2),
    )
    assert silent == (StepStatus.TIMED_OUT, "heartbeat")


def test_a_not_found_cancellation_is_a_timeout_only_with_proof() -> None:
    gone = ActivityCancellationDetails(not_found=True)
    hb = timedelta(seconds=1)
    overran = classify_end(
        asyncio.CancelledError(), cancellation=gone, elapsed_us=2_100_000, start_to_close=S2C / 5
    )
    assert overran == (StepStatus.TIMED_OUT, "start_to_close")
    silent = classify_end(
        asyncio.CancelledError(),
        cancellation=gone,
        elapsed_us=3_000_000,
        start_to_close=S2C,
        heartbeat=hb,
        heartbeat_gap_us=2_500_000,
    )
    assert silent == (StepStatus.TIMED_OUT, "heartbeat")
    # Heartbeating steadily, within its timeouts: the run closed, not a timeout.
    closed = classify_end(
        asyncio.CancelledError(),
        cancellation=gone,
        elapsed_us=3_000_000,
        start_to_close=S2C,
        heartbeat=hb,
        heartbeat_gap_us=100_000,
    )
    assert closed == (StepStatus.CANCELLED, "not_found")
    assert server_timeout(5, start_to_close=None, heartbeat=hb, heartbeat_gap_us=None) == ""


@pytest.mark.parametrize(
    ("elapsed", "kw", "kind"),
    [
        (9_000_000, {"start_to_close": S2C}, "start_to_close"),
        (1_000_000, {"start_to_close": S2C}, "start_to_close"),
        (1_000_000, {"start_to_close": S2C, "heartbeat": timedelta(seconds=1)}, "heartbeat"),
        (1_000_000, {"schedule_to_close": S2C}, "schedule_to_close"),
        (1_000_000, {}, ""),
    ],
)
def test_timeout_kind(elapsed: int, kw: dict[str, Any], kind: str) -> None:
    args: dict[str, Any] = {"start_to_close": None, "heartbeat": None, "schedule_to_close": None}
    assert timeout_kind(elapsed, **{**args, **kw}) == kind


# -- the records ---------------------------------------------------------------------------------


def _receipt(**kw: Any) -> StepReceipt:
    request = EvaluationRequest(
        capability_id="cap-1",
        tool_server="payments",
        tool="charge",
        namespace="default",
        workflow_id="wf",
        run_id="run",
        workflow_type="Pay",
        task_queue="tq",
        activity_id="3",
        activity_type="charge",
        attempt=2,
        is_local=True,
        started_at=100,
        worker_identity="w@h",
        trace_id="1" * 32,
        span_id="2" * 16,
        **kw,
    )
    return request.step(
        receipt_id=uuid7(), token=None, verdict=Verdict.ALLOW, reason="ok", evaluated_at=101
    )


def test_a_body_outcome_is_linked_to_its_decision() -> None:
    receipt = _receipt()
    outcome = body_outcome(
        receipt,
        status=StepStatus.COMPLETED,
        error_type="",
        ended_at=500,
        duration_us=350,
        result_digest="ab" * 32,
        result_key_id="args-1",
    )
    assert outcome.decision_receipt_id == receipt.receipt_id
    assert (outcome.activity_id, outcome.attempt, outcome.is_local) == ("3", 2, True)
    assert (outcome.capability_id, outcome.tool_server, outcome.tool) == (
        "cap-1",
        "payments",
        "charge",
    )
    assert (outcome.trace_id, outcome.span_id) == ("1" * 32, "2" * 16)
    assert (outcome.started_at, outcome.ended_at, outcome.duration_us) == (100, 500, 350)
    assert outcome.run_key == receipt.run_key
    failed = body_outcome(
        receipt, status=StepStatus.FAILED, error_type="X", ended_at=1, duration_us=-5
    )
    assert (failed.result_digest, failed.result_key_id, failed.duration_us) == ("", "", 0)


def test_a_gate_outcome_has_no_decision() -> None:
    request = EvaluationRequest(
        capability_id="cap-1", tool_server="s", tool="t", workflow_id="wf", attempt=3
    )
    outcome = gate_outcome(request, "sidecar_unreachable", ended_at=9)
    assert outcome.status is StepStatus.GATE_FAILED
    assert (outcome.decision_receipt_id, outcome.capability_id) == ("", "")
    assert (outcome.error_type, outcome.duration_us, outcome.attempt) == (
        "sidecar_unreachable",
        0,
        3,
    )
    assert not outcome.chio_receipt


# -- result digests ------------------------------------------------------------------------------


def test_the_result_digest_is_the_keyed_hmac_of_the_payload_framing() -> None:
    key = ArgumentKey.from_hex("args-1", "ab" * 32)
    result = {"order": "secret-order-123", "amount": 5}
    [payload] = temporalio.converter.default().payload_converter.to_payloads([result])
    framed = bytearray(b"chio-args-v1")
    for part in (
        (1).to_bytes(4, "big"),
        *(x for k in sorted(payload.metadata) for x in (k.encode(), payload.metadata[k])),
        b"",
        payload.data,
    ):
        framed += len(part).to_bytes(4, "big") + part
    expected = hmac.new(bytes.fromhex("ab" * 32), bytes(framed), hashlib.sha256).hexdigest()
    assert result_digest(key, result) == expected
    assert result_digest(key, None) == ""
    assert result_digest(key, "x") != result_digest(ArgumentKey.generate(), "x")


# -- trace context -------------------------------------------------------------------------------


def test_trace_ids_come_from_the_current_span_only() -> None:
    assert current_trace_ids() == ("", "")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("RunActivity:x") as span:
        context = span.get_span_context()
        assert current_trace_ids() == (
            f"{context.trace_id:032x}",
            f"{context.span_id:016x}",
        )
    assert current_trace_ids() == ("", "")


# -- the background path -------------------------------------------------------------------------


class _Sink:
    def __init__(self) -> None:
        self.outcomes: list[StepOutcome] = []
        self.refuse = False
        self.calls = 0

    async def publish_outcome(self, outcome: StepOutcome) -> None:
        self.calls += 1
        if self.refuse:
            raise ReceiptSinkError("spool full")
        self.outcomes.append(outcome)


def _outcome(n: int) -> StepOutcome:
    return body_outcome(
        _receipt(), status=StepStatus.COMPLETED, error_type=str(n), ended_at=n, duration_us=n
    )


async def _sign(outcome: StepOutcome) -> StepOutcome:
    return outcome.__class__(**{**_fields(outcome), "chio_receipt": "{}"})


def _fields(outcome: StepOutcome) -> dict[str, Any]:
    return {name: getattr(outcome, name) for name in outcome.__dataclass_fields__}


async def test_a_full_queue_drops_the_oldest_and_counts_it() -> None:
    sink, stats = _Sink(), InterceptorStats()
    recorder = OutcomeRecorder(signer=_sign, sink=lambda: sink, stats=stats, max_queue=3)
    for n in range(5):  # no await in between: the background task has not run yet
        recorder.submit(_outcome(n), decision=None, sign=True)
    assert stats.outcomes_dropped == 2
    assert await recorder.flush(5)
    assert [o.error_type for o in sink.outcomes] == ["2", "3", "4"]
    assert all(o.chio_receipt == "{}" for o in sink.outcomes)
    assert (stats.outcomes_recorded, stats.outcomes_published) == (5, 3)


async def test_submit_never_waits_for_a_stuck_signer() -> None:
    sink, stats = _Sink(), InterceptorStats()
    release = asyncio.Event()

    async def stuck(outcome: StepOutcome) -> StepOutcome:
        await release.wait()
        return outcome

    recorder = OutcomeRecorder(signer=stuck, sink=lambda: sink, stats=stats)
    recorder.submit(_outcome(1), decision=None, sign=True)
    await asyncio.sleep(0.05)
    recorder.submit(_outcome(2), decision=None, sign=True)  # returns while the first is stuck
    assert not await recorder.flush(0.1)
    assert sink.outcomes == []
    release.set()
    assert await recorder.flush(5)
    assert [o.error_type for o in sink.outcomes] == ["1", "2"]


async def test_a_failed_signature_publishes_the_record_unsigned() -> None:
    sink, stats = _Sink(), InterceptorStats()

    async def down(outcome: StepOutcome) -> StepOutcome:
        raise ConnectionError("sidecar down")

    recorder = OutcomeRecorder(signer=down, sink=lambda: sink, stats=stats)
    recorder.submit(_outcome(1), decision=None, sign=True)
    assert await recorder.flush(5)
    assert [o.chio_receipt for o in sink.outcomes] == [""]
    assert stats.outcomes_unsigned == 1


async def test_a_refusing_sink_keeps_records_until_it_accepts_again() -> None:
    sink, stats = _Sink(), InterceptorStats()
    sink.refuse = True
    recorder = OutcomeRecorder(
        signer=None, sink=lambda: sink, stats=stats, max_backlog=2, retry_interval=0.02
    )
    for n in range(3):
        recorder.submit(_outcome(n), decision=None, sign=False)
    await asyncio.sleep(0.1)
    assert sink.outcomes == []
    assert recorder.pending == 2  # the backlog is bounded: the oldest went
    assert stats.outcomes_dropped == 1
    sink.refuse = False
    assert await recorder.flush(5)
    assert [o.error_type for o in sink.outcomes] == ["1", "2"]


async def test_close_drains_for_its_timeout_and_counts_what_is_left() -> None:
    sink, stats = _Sink(), InterceptorStats()
    sink.refuse = True
    recorder = OutcomeRecorder(signer=None, sink=lambda: sink, stats=stats, retry_interval=0.02)
    recorder.submit(_outcome(1), decision=None, sign=False)
    await recorder.aclose(0.2)
    assert stats.outcomes_lost == 1
    recorder.submit(_outcome(2), decision=None, sign=False)  # after close: counted, not queued
    assert stats.outcomes_lost == 2
    assert recorder.pending == 0


async def test_no_sink_or_a_sink_without_outcomes_queues_nothing() -> None:
    stats = InterceptorStats()
    for sink in (None, object()):
        recorder = OutcomeRecorder(signer=_sign, sink=lambda s=sink: s, stats=stats)
        recorder.submit(_outcome(1), decision=None, sign=True)
        assert recorder.pending == 0
    assert stats.outcomes_recorded == 0


async def test_the_decision_chio_id_is_filled_off_the_activity_path() -> None:
    receipt = _receipt()
    chio = '{"id":"' + "c" * 64 + '","decision":{"verdict":"allow"}}'
    decision = receipt.__class__(**{**_fields(receipt), "chio_receipt": chio})
    sink, stats = _Sink(), InterceptorStats()
    recorder = OutcomeRecorder(signer=None, sink=lambda: sink, stats=stats)
    recorder.submit(_outcome(1), decision=decision, sign=True)
    assert await recorder.flush(5)
    assert sink.outcomes[0].decision_chio_id == "c" * 64


async def test_the_body_end_never_raises_into_the_activity() -> None:
    receipt = _receipt()
    decision = SignedReceipt(receipt=receipt, body=step_body(receipt))
    icp = ChioActivityInterceptor(evaluator=LocalSidecar(), receipt_sink=InMemoryReceiptSink())
    not_an_info: Any = object()  # no timeouts to read: making the record fails
    icp.after_attempt(not_an_info, decision, body_started_ns=0, exc=ValueError("x"))
    assert icp.stats.outcomes_dropped == 1
    assert icp.stats.outcomes_recorded == 0
    await icp.aclose()


def test_without_opentelemetry_the_trace_ids_are_empty() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the otel extra were not installed\n"
        "from chio_receipts.interceptor import ChioActivityInterceptor\n"
        "from chio_receipts.interceptor._trace import current_trace_ids\n"
        "assert current_trace_ids() == ('', '')\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"
