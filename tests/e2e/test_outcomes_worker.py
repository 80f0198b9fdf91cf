"""Outcome records on the real stack: Temporal dev server, Kafka, and our sidecar served on a
loopback port, with the interceptor publishing through the ``ReceiptStreamer``.

One workflow runs an activity that completes, one that fails with a non-retryable
``ApplicationError`` of type ``CardDeclined``, one that fails once and then completes, a local
activity that runs past its start-to-close timeout, and one that the workflow cancels. The steps
topic then holds one outcome record per body run, linked to its decision, signed by the
sidecar's key, with the result's keyed digest and never the result. A worker whose sidecar is
unreachable publishes an unsigned GATE_FAILED record for each refused attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import temporalio.converter
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker
from temporalio.workflow import ActivityCancellationType

import chio_receipts.streamer as streamer
from chio_receipts.interceptor import (
    SIDECAR_ERROR_TYPE,
    ArgumentKey,
    ChioActivityInterceptor,
    ChioClient,
    WorkflowGrant,
)
from chio_receipts.schemas import (
    STEP_EVENT_TYPE,
    STEP_OUTCOME_EVENT_TYPE,
    STEP_OUTCOME_SCHEMA,
    STEP_SCHEMA,
    StepOutcome,
    StepReceipt,
    StepStatus,
    Verdict,
    check_chio_outcome,
    chio_step_fields,
    decode,
    verify_receipt,
)
from chio_receipts.sidecar import LocalSidecar, SidecarServer
from tests.support.helpers import eventually
from tests.support.streamer_kafka import config, consume

pytestmark = pytest.mark.e2e

SECRET_HEX = "5e" * 32
RESULT = "order-result-7f3a-do-not-leak"
FLAKY_RESULT = "flaky-result-91c2-do-not-leak"
DECLINE_MESSAGE = "card 4111 declined for customer 42"
ACTIVITIES = (
    "charge_ok",
    "charge_declined",
    "flaky",
    "slow_local",
    "heartbeater",
    "goes_silent",
    "overruns",
)


@activity.defn
async def charge_ok(order: str) -> str:
    return RESULT


@activity.defn
async def charge_declined(order: str) -> str:
    raise ApplicationError(DECLINE_MESSAGE, type="CardDeclined", non_retryable=True)


@activity.defn
async def flaky(order: str) -> str:
    if activity.info().attempt == 1:
        raise ApplicationError("try again", type="Transient")
    return FLAKY_RESULT


@activity.defn
async def slow_local(order: str) -> str:
    await asyncio.sleep(30)
    return "never"


@activity.defn
async def heartbeater(order: str) -> str:
    while True:
        activity.heartbeat()
        await asyncio.sleep(0.1)


@activity.defn
async def goes_silent(order: str) -> str:
    """Stops heartbeating for longer than its heartbeat timeout, then heartbeats again: the
    server has timed it out and answers the next heartbeat "not found"."""
    activity.heartbeat()
    await asyncio.sleep(2.5)
    for _ in range(100):
        activity.heartbeat()
        await asyncio.sleep(0.1)
    return "never"


@activity.defn
async def overruns(order: str) -> str:
    """Heartbeats, but runs past its start-to-close timeout."""
    for _ in range(100):
        activity.heartbeat()
        await asyncio.sleep(0.1)
    return "never"


ONCE = RetryPolicy(maximum_attempts=1)


@workflow.defn(sandboxed=False)
class OutcomesWorkflow:
    @workflow.run
    async def run(self) -> list[str]:
        out = [await workflow.execute_activity(charge_ok, "o-1", start_to_close_timeout=_S10)]
        try:
            await workflow.execute_activity(charge_declined, "o-2", start_to_close_timeout=_S10)
        except ActivityError:
            out.append("declined")
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=3)
        out.append(
            await workflow.execute_activity(
                flaky, "o-3", start_to_close_timeout=_S10, retry_policy=retry
            )
        )
        try:
            await workflow.execute_local_activity(
                slow_local, "o-4", start_to_close_timeout=timedelta(seconds=1), retry_policy=ONCE
            )
        except ActivityError:
            out.append("timed out")
        handle = workflow.start_activity(
            heartbeater,
            "o-5",
            start_to_close_timeout=timedelta(seconds=30),
            heartbeat_timeout=timedelta(seconds=2),
            retry_policy=ONCE,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        await workflow.sleep(1.5)
        handle.cancel()
        try:
            await handle
        except ActivityError:
            out.append("cancelled")
        for fn, timeouts in (
            (
                goes_silent,
                {"heartbeat_timeout": timedelta(seconds=1), "start_to_close_timeout": _S10},
            ),
            (
                overruns,
                {
                    "heartbeat_timeout": timedelta(seconds=3),
                    "start_to_close_timeout": timedelta(seconds=1.5),
                },
            ),
        ):
            try:
                await workflow.execute_activity(fn, "o-6", retry_policy=ONCE, **timeouts)
            except ActivityError:
                out.append("timed out")
        return out


_S10 = timedelta(seconds=10)


@workflow.defn(sandboxed=False)
class OneCharge:
    @workflow.run
    async def run(self) -> str:
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=2)
        return await workflow.execute_activity(
            charge_ok, "o-1", start_to_close_timeout=_S10, retry_policy=retry
        )


@dataclass
class Published:
    steps: list[StepReceipt]
    outcomes: list[StepOutcome]
    raw: list[Any]


async def _read(bootstrap: str, topic: str, expected: int) -> Published:
    messages = await consume(bootstrap, [topic], expected, timeout=60)
    steps, outcomes = [], []
    for m in messages:
        decoded = decode(m.value)
        headers = dict(m.headers)
        if decoded.schema_name == STEP_OUTCOME_SCHEMA:
            outcome = StepOutcome.from_avro(decoded.record)
            assert headers["ce_type"] == STEP_OUTCOME_EVENT_TYPE.encode()
            assert headers["ce_id"] == outcome.outcome_id.encode()
            assert m.key == outcome.run_key.encode()
            outcomes.append(outcome)
        else:
            assert decoded.schema_name == STEP_SCHEMA
            assert headers["ce_type"] == STEP_EVENT_TYPE.encode()
            steps.append(StepReceipt.from_avro(decoded.record))
    return Published(steps, outcomes, messages)


def _digest(result: Any) -> str:
    """The result's HMAC computed here, from Temporal's payload of it (not the project's code)."""
    [payload] = temporalio.converter.default().payload_converter.to_payloads([result])
    framed = bytearray(b"chio-args-v1")
    parts = [(1).to_bytes(4, "big")]
    for key in sorted(payload.metadata):
        parts += [key.encode(), payload.metadata[key]]
    parts += [b"", payload.data]
    for part in parts:
        framed += len(part).to_bytes(4, "big") + part
    return hmac.new(bytes.fromhex(SECRET_HEX), bytes(framed), hashlib.sha256).hexdigest()


@pytest.fixture
async def served() -> AsyncIterator[tuple[LocalSidecar, str]]:
    side = LocalSidecar()
    async with SidecarServer(side) as server:
        yield side, server.url


async def test_one_signed_outcome_per_body_run_linked_to_its_decision(
    temporal_client: Client,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    tmp_path: Path,
    served: tuple[LocalSidecar, str],
) -> None:
    side, url = served
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("out") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq, wid = unique("tq"), unique("outcomes")
    chio = ChioClient(url)
    async with streamer.ReceiptStreamer(cfg) as sink:
        icp = ChioActivityInterceptor(
            chio_client=chio,
            receipt_sink=sink,
            argument_key=ArgumentKey.from_hex("args-e2e", SECRET_HEX),
        )
        cap = await chio.create_capability("agent:pay", list(ACTIVITIES), 600)
        icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
        async with Worker(
            temporal_client,
            task_queue=tq,
            workflows=[OutcomesWorkflow],
            activities=[
                charge_ok,
                charge_declined,
                flaky,
                slow_local,
                heartbeater,
                goes_silent,
                overruns,
            ],
            interceptors=[icp],
        ):
            result = await temporal_client.execute_workflow(
                OutcomesWorkflow.run, id=wid, task_queue=tq, execution_timeout=timedelta(seconds=60)
            )
            # The server timed the last two out while their bodies ran on: they end at their
            # next heartbeat ("not found"), after the workflow has moved on.
            await eventually(lambda: icp.stats.outcomes_recorded == 8, timeout=30)
        assert result == [
            RESULT,
            "declined",
            FLAKY_RESULT,
            "timed out",
            "cancelled",
            "timed out",
            "timed out",
        ]
        await icp.aclose()
        assert icp.stats.outcomes_published == 8
        assert icp.stats.outcomes_unsigned == 0
        assert await sink.flush(30)
    await chio.aclose()

    got = await _read(kafka_bootstrap, cfg.topics.steps, 16)
    assert len(got.steps) == 8
    assert all(s.verdict is Verdict.ALLOW for s in got.steps)
    assert len(got.outcomes) == 8
    # One outcome per body run, linked to the decision of that attempt.
    decisions = {s.receipt_id: s for s in got.steps}
    assert len({o.decision_receipt_id for o in got.outcomes}) == 8
    trusted = side.trusted_keys()
    by_attempt: dict[tuple[str, int], StepOutcome] = {}
    for o in got.outcomes:
        decision = decisions[o.decision_receipt_id]
        assert (o.activity_id, o.attempt, o.activity_type) == (
            decision.activity_id,
            decision.attempt,
            decision.activity_type,
        )
        assert o.decision_chio_id == chio_step_fields(decision).receipt_id != ""
        assert (o.capability_id, o.tool_server, o.tool) == (
            decision.capability_id,
            decision.tool_server,
            decision.tool,
        )
        assert check_chio_outcome(o, trusted_keys=trusted) is None
        assert o.started_at <= o.ended_at
        by_attempt[(o.activity_type, o.attempt)] = o
    assert verify_receipt(got.steps[0], dict(await side.public_keys()))

    ok = by_attempt[("charge_ok", 1)]
    assert (ok.status, ok.error_type, ok.is_local) == (StepStatus.COMPLETED, "", False)
    assert ok.result_digest == _digest(RESULT)
    assert ok.result_key_id == "args-e2e"
    declined = by_attempt[("charge_declined", 1)]
    assert (declined.status, declined.error_type) == (StepStatus.FAILED, "CardDeclined")
    assert (declined.result_digest, declined.result_key_id) == ("", "")
    first, second = by_attempt[("flaky", 1)], by_attempt[("flaky", 2)]
    assert (first.status, first.error_type) == (StepStatus.FAILED, "Transient")
    assert (second.status, second.result_digest) == (StepStatus.COMPLETED, _digest(FLAKY_RESULT))
    timed_out = by_attempt[("slow_local", 1)]
    assert (timed_out.status, timed_out.error_type, timed_out.is_local) == (
        StepStatus.TIMED_OUT,
        "start_to_close",
        True,
    )
    assert 900_000 <= timed_out.duration_us < 10_000_000
    cancelled = by_attempt[("heartbeater", 1)]
    assert (cancelled.status, cancelled.error_type) == (StepStatus.CANCELLED, "")
    assert cancelled.duration_us >= 1_000_000
    silent = by_attempt[("goes_silent", 1)]
    assert (silent.status, silent.error_type) == (StepStatus.TIMED_OUT, "heartbeat")
    overran = by_attempt[("overruns", 1)]
    assert (overran.status, overran.error_type) == (StepStatus.TIMED_OUT, "start_to_close")
    assert overran.duration_us >= 1_500_000
    # Results and failure messages never travel: only their keyed digest.
    for m in got.raw:
        blob = m.value + b"".join(v for _, v in m.headers)
        for secret in (RESULT, FLAKY_RESULT, DECLINE_MESSAGE):
            assert secret.encode() not in blob


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_sidecar_leaves_a_gate_failed_record_per_refused_attempt(
    temporal_client: Client,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("gate") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq, wid = unique("tq"), unique("gate")
    token = LocalSidecar().mint("agent:pay", ["charge_ok"], 600)
    chio = ChioClient(f"http://127.0.0.1:{_closed_port()}", timeout=0.5, retries=0)
    async with streamer.ReceiptStreamer(cfg) as sink:
        icp = ChioActivityInterceptor(chio_client=chio, receipt_sink=sink)
        icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=token))
        async with Worker(
            temporal_client,
            task_queue=tq,
            workflows=[OneCharge],
            activities=[charge_ok],
            interceptors=[icp],
        ):
            with pytest.raises(WorkflowFailureError) as failure:
                await temporal_client.execute_workflow(
                    OneCharge.run, id=wid, task_queue=tq, execution_timeout=timedelta(seconds=60)
                )
        cause = failure.value.cause
        assert isinstance(cause, ActivityError)
        assert isinstance(cause.cause, ApplicationError)
        assert cause.cause.type == SIDECAR_ERROR_TYPE
        await icp.aclose()
        assert icp.stats.gate_failures == 2
        assert await sink.flush(30)
    await chio.aclose()

    got = await _read(kafka_bootstrap, cfg.topics.steps, 2)
    assert got.steps == []  # no decision was made, so no receipt exists
    assert sorted(o.attempt for o in got.outcomes) == [1, 2]
    for o in got.outcomes:
        assert (o.status, o.error_type) == (StepStatus.GATE_FAILED, "sidecar_unreachable")
        assert (o.decision_receipt_id, o.duration_us, o.chio_receipt) == ("", 0, "")
        assert (o.workflow_id, o.activity_type) == (wid, "charge_ok")


@workflow.defn(sandboxed=False)
class ChargeWithPatience:
    @workflow.run
    async def run(self) -> str:
        retry = RetryPolicy(initial_interval=timedelta(seconds=2), maximum_attempts=5)
        return await workflow.execute_activity(
            charge_ok, "o-1", start_to_close_timeout=_S10, retry_policy=retry
        )


async def test_a_refusing_sink_leaves_a_gate_failed_record_published_once_it_accepts(
    temporal_client: Client,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    tmp_path: Path,
    served: tuple[LocalSidecar, str],
) -> None:
    """The sink refuses the first attempt's receipt (the streamer is not running yet, as it
    refuses while its spool is full): the attempt fails retryably before its body runs, and its
    GATE_FAILED record waits in the backlog until the sink accepts again."""
    side, url = served
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("refuse") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq, wid = unique("tq"), unique("refused")
    chio = ChioClient(url)
    sink = streamer.ReceiptStreamer(cfg)
    icp = ChioActivityInterceptor(chio_client=chio, receipt_sink=sink)
    cap = await chio.create_capability("agent:pay", ["charge_ok"], 600)
    icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
    try:
        async with Worker(
            temporal_client,
            task_queue=tq,
            workflows=[ChargeWithPatience],
            activities=[charge_ok],
            interceptors=[icp],
        ):
            handle = await temporal_client.start_workflow(
                ChargeWithPatience.run,
                id=wid,
                task_queue=tq,
                execution_timeout=timedelta(seconds=60),
            )
            await eventually(lambda: icp.stats.sink_errors >= 1, timeout=30, interval=0.02)
            # The gate-failure record was refused too: it waits in the backlog.
            await eventually(lambda: icp.stats.outcomes_backlogged >= 1, timeout=5, interval=0.02)
            assert icp.stats.outcomes_published == 0
            await sink.start()  # the sink accepts again before Temporal's retry
            assert await handle.result() == RESULT
        await icp.aclose()
        assert icp.stats.outcomes_published == 2
        assert await sink.flush(30)
    finally:
        await sink.stop()
        await chio.aclose()

    got = await _read(kafka_bootstrap, cfg.topics.steps, 3)
    assert [s.attempt for s in got.steps] == [2]
    by_status = {o.status: o for o in got.outcomes}
    assert set(by_status) == {StepStatus.GATE_FAILED, StepStatus.COMPLETED}
    gate = by_status[StepStatus.GATE_FAILED]
    assert (gate.attempt, gate.error_type, gate.decision_receipt_id) == (1, "sink_refused", "")
    assert gate.chio_receipt == ""
    done = by_status[StepStatus.COMPLETED]
    assert (done.attempt, done.decision_receipt_id) == (2, got.steps[0].receipt_id)
    assert check_chio_outcome(done, trusted_keys=side.trusted_keys()) is None


STOP_SIDECAR: list[SidecarServer] = []


@activity.defn
async def charge_then_sidecar_stops(order: str) -> str:
    """Completes; the sidecar goes away while the body runs, so the outcome cannot be signed."""
    await STOP_SIDECAR[0].stop()
    return RESULT


@workflow.defn(sandboxed=False)
class ChargeWhileSidecarStops:
    @workflow.run
    async def run(self) -> str:
        return await workflow.execute_activity(
            charge_then_sidecar_stops, "o-1", start_to_close_timeout=_S10, retry_policy=ONCE
        )


async def test_an_outcome_the_sidecar_cannot_sign_is_published_unsigned(
    temporal_client: Client,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    side = LocalSidecar()
    server = SidecarServer(side)
    await server.start()
    STOP_SIDECAR[:] = [server]
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("unsigned") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq, wid = unique("tq"), unique("unsigned")
    chio = ChioClient(server.url, timeout=0.5, retries=0)
    try:
        async with streamer.ReceiptStreamer(cfg) as sink:
            icp = ChioActivityInterceptor(chio_client=chio, receipt_sink=sink)
            cap = await chio.create_capability("agent:pay", ["charge_then_sidecar_stops"], 600)
            icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
            async with Worker(
                temporal_client,
                task_queue=tq,
                workflows=[ChargeWhileSidecarStops],
                activities=[charge_then_sidecar_stops],
                interceptors=[icp],
            ):
                result = await temporal_client.execute_workflow(
                    ChargeWhileSidecarStops.run,
                    id=wid,
                    task_queue=tq,
                    execution_timeout=timedelta(seconds=60),
                )
            assert result == RESULT
            await icp.aclose()
            assert (icp.stats.outcomes_published, icp.stats.outcomes_unsigned) == (1, 1)
            assert await sink.flush(30)
    finally:
        STOP_SIDECAR.clear()
        await server.stop()
        await chio.aclose()

    got = await _read(kafka_bootstrap, cfg.topics.steps, 2)
    (step,) = got.steps
    (outcome,) = got.outcomes
    assert (outcome.status, outcome.decision_receipt_id) == (StepStatus.COMPLETED, step.receipt_id)
    assert (outcome.chio_receipt, outcome.chio_signed) == ("", b"")
    assert check_chio_outcome(outcome) == "the outcome record carries no Chio receipt"
    assert outcome.result_digest  # still keyed, never the result
