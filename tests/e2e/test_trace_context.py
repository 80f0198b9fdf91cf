"""Trace context on the real stack: a worker traced by ``temporalio.contrib.opentelemetry``'s
``TracingInterceptor`` (spans kept by the OpenTelemetry SDK's in-memory exporter) publishes
receipts and outcome records whose trace and span ids are the ``RunActivity`` span's.

Temporal dev server, Kafka, our sidecar served on a loopback port (it signs the ids into the
step's Avro record); the worker is built with ``build_chio_worker``, which puts the tracing
interceptor before the gate."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor

import chio_receipts.streamer as streamer
from chio_receipts.interceptor import ChioClient, build_chio_worker
from chio_receipts.schemas import (
    STEP_OUTCOME_SCHEMA,
    StepOutcome,
    StepReceipt,
    StepStatus,
    check_chio_outcome,
    decode,
    verify_receipt,
)
from chio_receipts.sidecar import LocalSidecar, SidecarServer
from tests.support.streamer_kafka import config, consume

pytestmark = pytest.mark.e2e


@activity.defn
async def traced_tool(arg: str) -> str:
    return f"done:{arg}"


@workflow.defn(sandboxed=False)
class TracedWorkflow:
    @workflow.run
    async def run(self) -> list[str]:
        return [
            await workflow.execute_activity(
                traced_tool, arg, start_to_close_timeout=timedelta(seconds=10)
            )
            for arg in ("a", "b")
        ]


async def test_receipts_and_outcomes_carry_the_run_activity_span_ids(
    temporal_client: Client,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = TracingInterceptor(provider.get_tracer("chio-trace-test"))
    side = LocalSidecar()
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("trace") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq, wid = unique("tq"), unique("traced")
    async with SidecarServer(side) as server, streamer.ReceiptStreamer(cfg) as sink:
        chio = ChioClient(server.url)
        worker, icp, _ = await build_chio_worker(
            temporal_client,
            task_queue=tq,
            activities=[traced_tool],
            workflows=[TracedWorkflow],
            chio_client=chio,
            workflow_id=wid,
            scope=["traced_tool"],
            subject="agent:traced",
            receipt_sink=sink,
            interceptors=[tracing],
        )
        async with worker:
            result = await temporal_client.execute_workflow(
                TracedWorkflow.run, id=wid, task_queue=tq, execution_timeout=timedelta(seconds=60)
            )
        assert result == ["done:a", "done:b"]
        await icp.aclose()
        await chio.aclose()
        assert await sink.flush(30)

    spans = {
        span.attributes["temporalActivityID"]: span
        for span in exporter.get_finished_spans()
        if span.name == "RunActivity:traced_tool" and span.attributes is not None
    }
    assert len(spans) == 2
    messages = await consume(kafka_bootstrap, [cfg.topics.steps], 4, timeout=60)
    steps: list[StepReceipt] = []
    outcomes: list[StepOutcome] = []
    for m in messages:
        decoded = decode(m.value)
        if decoded.schema_name == STEP_OUTCOME_SCHEMA:
            outcomes.append(StepOutcome.from_avro(decoded.record))
        else:
            steps.append(StepReceipt.from_avro(decoded.record))
    assert len(steps) == len(outcomes) == 2
    keys = dict(await side.public_keys())
    for record in (*steps, *outcomes):
        context = spans[record.activity_id].get_span_context()
        assert context is not None
        assert record.trace_id == f"{context.trace_id:032x}"
        assert record.span_id == f"{context.span_id:016x}"
        assert len(record.trace_id) == 32
        assert len(record.span_id) == 16
    for step in steps:
        # The sidecar signed the ids: the Avro signature covers them.
        assert verify_receipt(step, keys)
        tampered = step.__class__(
            **{**{n: getattr(step, n) for n in step.__dataclass_fields__}, "span_id": "0" * 16}
        )
        assert not verify_receipt(tampered, keys)
    for outcome in outcomes:
        assert outcome.status is StepStatus.COMPLETED
        assert check_chio_outcome(outcome, trusted_keys=side.trusted_keys()) is None
