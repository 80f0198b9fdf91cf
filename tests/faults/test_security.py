"""Where an activity argument lands.

By default a step's Chio receipt signs the call's parameters (so its ``parameter_hash`` stays
verifiable): the argument is in the step's ``chio_receipt`` and its signed Avro body, hence in
what carries step bodies, and nowhere else: never in a log line, a receipt's repr or an
exception message. With ``redact_parameters`` it leaves the worker nowhere: not in a receipt, a
log line, a Kafka message, a ClickHouse row, a spool file or an exception message. The
sidecar's HTTP API refuses a chunked body past its limit (the other malformed / oversized /
unauthenticated requests are covered by the interceptor's own sidecar tests)."""

from __future__ import annotations

import base64
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

from chio_receipts.interceptor import (
    ChioActivityInterceptor,
    InMemoryReceiptSink,
    WorkflowGrant,
)
from chio_receipts.schemas import ReceiptSinkError
from chio_receipts.sidecar import LocalSidecar, create_sidecar_app
from tests.support.faults.pipeline import Pipeline
from tests.support.faults.scenario import finish
from tests.support.faults.workload import ACTIVITIES, SCOPE, FaultInput, FaultWorkflow

SECRET = f"sk_live_{uuid.uuid4().hex}"


def _forms(secret: str) -> list[bytes]:
    """The secret as it could appear: raw, hex, base64, JSON-escaped (as Temporal encodes it)."""
    raw = secret.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw), base64.b64encode(raw).rstrip(b"=")]


def _leaks(blob: bytes | str, where: str) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [
        f"{where}: contains the secret ({form[:12]!r}...)"
        for form in _forms(SECRET)
        if form in data
    ]


@pytest.mark.e2e
@pytest.mark.timeout(400)
async def test_a_secret_argument_appears_in_no_output(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    p = make_pipeline(worker={"redact_parameters": True})
    await p.start()
    # Every run has one denied step (its exception message is checked too).
    await p.start_runs(3, FaultInput(steps=3, payload=SECRET, deny_at=1))
    out = await finish(p, "SEC", "secret argument grep (logs, Kafka, ClickHouse, spool, errors)")
    assert out.snap.steps, "nothing was produced"
    leaks: list[str] = []
    for path in p.root.rglob("*"):
        if path.is_file():
            leaks += _leaks(path.read_bytes(), str(path.relative_to(p.root)))
    for topic in (p.topics.steps, p.topics.runs, p.topics.envelopes_topic, p.topics.dlq_topic):
        for value, headers in await p.read_topic(topic):
            leaks += _leaks(value or b"", f"kafka {topic}")
            leaks += _leaks(repr(headers), f"kafka {topic} headers")
    client = p.clickhouse()
    try:
        for table in ("step_receipts", "workflow_receipts"):
            raw = client.raw_query(f"SELECT * FROM {table} FORMAT TabSeparated")
            leaks += _leaks(bytes(raw), f"clickhouse {table}")
    finally:
        client.close()
    for handle in p.handles:
        history = await handle.fetch_history()
        for ev in history.events:
            if ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
                failure = ev.activity_task_failed_event_attributes.failure
                leaks += _leaks(failure.SerializeToString(), f"activity failure in {handle.id}")
    assert not leaks, "\n".join(leaks)


class _FlakySink(InMemoryReceiptSink):
    """Refuses the first receipt (the attempt fails retryably), then keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def publish_step(self, receipt, body) -> None:  # type: ignore[no-untyped-def]
        if not self.refused:
            self.refused += 1
            raise ReceiptSinkError("spool full (test)")
        await super().publish_step(receipt, body)


@pytest.fixture(params=[True, False], ids=["redacted", "kept"])
async def in_process_worker(
    temporal_client: Client, unique: Callable[[str], str], request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Worker, _FlakySink, str]]:
    sidecar = LocalSidecar()
    token = sidecar.mint("agent:secret-test", SCOPE, 3600)
    sink = _FlakySink()
    interceptor = ChioActivityInterceptor(
        evaluator=sidecar,
        receipt_sink=sink,
        grant_resolver=lambda info: WorkflowGrant(workflow_id=info.workflow_id or "x", token=token),
        redact_parameters=request.param,
    )
    queue = unique("secret")
    worker = Worker(
        temporal_client,
        task_queue=queue,
        workflows=[FaultWorkflow],
        activities=ACTIVITIES,
        interceptors=[interceptor],
    )
    async with worker:
        yield worker, sink, queue


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_no_log_line_receipt_or_exception_carries_the_argument(
    in_process_worker: tuple[Worker, _FlakySink, str],
    temporal_client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In process, at DEBUG: a sink refusal, a retry, a denial, and a failed workflow.

    Redacted, the argument is in no receipt; kept, only in the signed Chio receipt (and the Avro
    body that carries it); in neither case in a log line, a repr or an exception."""
    worker, sink, queue = in_process_worker
    redacted = bool(worker.config()["interceptors"][0].redact_parameters)
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    ok = await temporal_client.execute_workflow(
        FaultWorkflow.run,
        FaultInput(steps=3, payload=SECRET, deny_at=1),
        id=f"secret-{uuid.uuid4().hex[:8]}",
        task_queue=queue,
        execution_timeout=timedelta(seconds=60),
    )
    assert ok == 2
    # A denied step that is not caught fails the workflow: its error text is checked too.
    with pytest.raises(WorkflowFailureError) as failed:
        await temporal_client.execute_workflow(
            FaultWorkflow.run,
            FaultInput(steps=1, payload=SECRET, deny_at=0, catch_denial=False),
            id=f"secret-fail-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            execution_timeout=timedelta(seconds=60),
        )
    chain: BaseException | None = failed.value
    while chain is not None:
        errors.append(f"{type(chain).__name__}: {chain} {getattr(chain, 'details', '')}")
        chain = chain.__cause__
    assert sink.refused == 1
    assert len(sink.steps) >= 4
    leaks = _leaks(caplog.text, "log records")
    for receipt, body in sink.steps:
        leaks += _leaks(repr(receipt), "receipt repr")
        if redacted:
            leaks += _leaks(body, "receipt body")
            leaks += _leaks(repr(receipt.to_avro()), "receipt fields")
        else:
            assert SECRET.encode() in body
            outside = dataclasses.replace(receipt, chio_receipt="", chio_signed=b"")
            leaks += _leaks(repr(outside.to_avro()), "receipt fields but the Chio receipt")
    leaks += _leaks("\n".join(errors), "exception chain")
    assert not leaks, "\n".join(leaks)
    # The caught-denial workflow did not fail, so this one's failure must be the denial.
    assert any("denied" in e.lower() for e in errors), errors


@pytest.mark.unit
async def test_sidecar_refuses_a_chunked_body_past_its_limit(tmp_path: Path) -> None:
    """No Content-Length, the body streamed in chunks: still refused at the limit, never a 500."""
    app = create_sidecar_app(LocalSidecar(), max_body_bytes=4096)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"{" + b" " * 1023

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sidecar"
    ) as http:
        response = await http.post("/v1/evaluate", content=chunks())
    assert response.status_code == 413, response.text
    assert SECRET not in response.text
