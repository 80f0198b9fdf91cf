"""Approvals in the envelope, on the whole pipeline: Temporal dev server, our sidecar served
over HTTP, the worker publishing through ``ReceiptStreamer`` to Kafka, the completion watcher,
the receipt builder writing to ClickHouse (chDB), and ``verify``.

An approved run and a rejected run: each run's rows hold the request (the PENDING_APPROVAL step,
signed), the decision (the sidecar's signed answer, carried by the step that ran after it) and
the approver (named in that answer and in the step's evidence); the envelopes are complete and
``verify`` checks every decision.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.worker import Worker

import chio_receipts.streamer as streamer
from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ReceiptBuilderService,
    verify_run,
)
from chio_receipts.interceptor import ChioActivityInterceptor, ChioClient, WorkflowGrant
from chio_receipts.schemas import KafkaConnection, KeyPair, verify_kernel_receipt
from chio_receipts.sidecar import DataDir, LocalSidecar, SidecarServer
from chio_receipts.sidecar._approvals import RequireApproval, TemporalSignaller
from tests.support.approval_workflows import Payments, PaymentsWorkflow, look_up, pay
from tests.support.helpers import eventually
from tests.support.streamer_kafka import config as streamer_config

pytestmark = pytest.mark.e2e


@dataclass
class Pipeline:
    url: str
    client: Client
    chio: ChioClient
    interceptor: ChioActivityInterceptor
    task_queue: str
    sink: streamer.ReceiptStreamer
    watcher: streamer.CompletionWatcher
    builder: ReceiptBuilderService
    keys: dict[str, bytes]

    async def rows(self, sql: str, **parameters: Any) -> list[tuple[Any, ...]]:
        _, rows = await self.builder.sink.query(sql, parameters or None)
        return list(rows)

    async def envelope(self, workflow_id: str) -> tuple[Any, ...]:
        async def written() -> tuple[Any, ...] | None:
            await self.watcher.poll_once()
            await self.sink.flush(10)
            found = await self.rows(
                "SELECT step_count, allow_count, deny_count, complete, missing_steps "
                "FROM workflow_receipts FINAL WHERE workflow_id = {wf:String}",
                wf=workflow_id,
            )
            return found[0] if found else None

        found: tuple[Any, ...] = await eventually(written, timeout=60, interval=0.3)
        return found


@pytest.fixture
async def pipeline(
    temporal_client: Client, temporal_address: str, kafka_bootstrap: str, tmp_path: Path
) -> AsyncIterator[Pipeline]:
    name = f"appr-{uuid.uuid4().hex[:8]}"
    cfg = streamer_config(kafka_bootstrap, str(tmp_path / "spool"), f"{name}.")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    builder_key = KeyPair.generate(f"builder-{name}")
    with DataDir(tmp_path / "sidecar") as directory:
        key = directory.signing_key()
        side = LocalSidecar(
            key, store=directory.store, guards=[RequireApproval(frozenset({"pay"}))]
        )
        side.approvals.signaller = TemporalSignaller(lambda: Client.connect(temporal_address))
        keys = {key.key_id: key.public_key, builder_key.key_id: builder_key.public_key}
        builder = ReceiptBuilderService(
            BuilderConfig(
                kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
                clickhouse=ClickHouseConfig(dsn=f"chdb://{tmp_path / 'clickhouse'}"),
                builder_key=builder_key,
                public_keys={key.key_id: key.public_key},
                topics=cfg.topics.names,
                group_id=f"builder-{name}",
                poll_timeout_ms=100,
                grace_seconds=2.0,
            )
        )
        stop = asyncio.Event()
        async with SidecarServer(side) as server, streamer.ReceiptStreamer(cfg) as sink:
            chio = ChioClient(server.url)
            interceptor = ChioActivityInterceptor(
                chio_client=chio, receipt_sink=sink, default_tool_server="payments"
            )
            task_queue = f"tq-{name}"
            watcher = streamer.CompletionWatcher(
                temporal_client,
                sink,
                streamer.WatcherConfig(
                    checkpoint_path=str(tmp_path / "watcher.json"),
                    start_from=datetime.now(UTC) - timedelta(minutes=1),
                    query_filter=f'TaskQueue = "{task_queue}"',
                    lag_window_s=30,
                    poll_interval_s=0.2,
                ),
            )
            await builder.start()
            loop_task = asyncio.create_task(builder.run(stop))
            try:
                async with Worker(
                    temporal_client,
                    task_queue=task_queue,
                    workflows=[PaymentsWorkflow],
                    activities=[pay, look_up],
                    interceptors=[interceptor],
                ):
                    yield Pipeline(
                        url=server.url,
                        client=temporal_client,
                        chio=chio,
                        interceptor=interceptor,
                        task_queue=task_queue,
                        sink=sink,
                        watcher=watcher,
                        builder=builder,
                        keys=keys,
                    )
            finally:
                stop.set()
                await asyncio.wait_for(loop_task, 30)
                await builder.stop()
                await interceptor.aclose()
                await chio.aclose()


async def _answered_run(pipe: Pipeline, workflow_id: str, outcome: str, reason: str) -> None:
    token = await pipe.chio.create_capability("agent:payer", ["pay", "look_up"], 600)
    pipe.interceptor.register_workflow_grant(WorkflowGrant(workflow_id=workflow_id, token=token))
    handle = await pipe.client.start_workflow(
        PaymentsWorkflow.run,
        Payments(amounts=["10"]),
        id=workflow_id,
        task_queue=pipe.task_queue,
        execution_timeout=timedelta(seconds=60),
    )
    async with httpx.AsyncClient(base_url=pipe.url) as http:

        async def pending() -> list[dict[str, Any]]:
            got = await http.get("/approvals/pending", params={"workflow_id": workflow_id})
            return list(got.json()["approvals"])

        (approval,) = await eventually(pending, timeout=30)
        answer = await http.post(
            f"/approvals/{approval['approval_id']}/respond",
            json={"outcome": outcome, "reason": reason},
        )
        assert answer.status_code == 200, answer.text
    try:
        await handle.result()
    except WorkflowFailureError:
        assert outcome == "denied"


@pytest.mark.parametrize(("outcome", "allowed"), [("approved", 2), ("denied", 1)])
async def test_the_envelope_holds_request_decision_and_approver_and_verify_checks_them(
    pipeline: Pipeline, outcome: str, allowed: int
) -> None:
    workflow_id = f"appr-{outcome}-{uuid.uuid4().hex[:8]}"
    await _answered_run(pipeline, workflow_id, outcome, "checked by phone")
    step_count, allow, deny, complete, missing = await pipeline.envelope(workflow_id)
    # look_up, the held pay, and the pay that ran (or was denied) after the answer
    assert (step_count, allow, deny, complete, missing) == (
        3,
        allowed,
        3 - 1 - allowed,
        True,
        0,
    )
    rows = await pipeline.rows(
        "SELECT toString(verdict), chio_receipt FROM step_receipts "
        "WHERE workflow_id = {wf:String} AND activity_type = 'pay' ORDER BY evaluated_at",
        wf=workflow_id,
    )
    assert [r[0] for r in rows] == ["PENDING_APPROVAL", "ALLOW" if allowed == 2 else "DENY"]
    request = json.loads(rows[0][1])["metadata"]["approval"]
    answer = json.loads(rows[1][1])["metadata"]["approval"]
    assert answer["approval_id"] == request["approval_id"]
    assert answer["approver"] == "local"
    decision = answer["decision_receipt"]
    assert verify_kernel_receipt(decision, trusted_keys={k.hex() for k in pipeline.keys.values()})
    assert decision["metadata"]["approval"]["approver"] == "local"
    assert decision["metadata"]["approval"]["reason"] == "checked by phone"
    report = verify_run(pipeline.builder.sink.client, workflow_id, keys=pipeline.keys)
    assert report.ok, report.summary()
    assert [(a.outcome, a.approver) for a in report.approvals] == [(outcome, "local")]
    assert "1/1 approval(s) answered" in report.summary()
