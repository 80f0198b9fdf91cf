"""End to end on the real stack: the receipt interceptor publishes through ReceiptStreamer to
Kafka, the watcher emits the run's completion, and its expected_steps equals the receipts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.worker import Worker

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.interceptor import (
    ChioActivityInterceptor,
    ChioClient,
    WorkflowGrant,
)
from chio_receipts.sidecar import LocalSidecar
from tests.support.streamer_kafka import config, consume
from tests.support.watcher import Retrying, flaky, quick, watcher_for

pytestmark = pytest.mark.e2e


async def test_interceptor_receipts_reach_kafka_and_match_the_watchers_expected_steps(
    temporal_client: Client, kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("e2e") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq, wid = unique("tq"), unique("retry")
    side = LocalSidecar()
    async with streamer.ReceiptStreamer(cfg) as sink:
        icp = ChioActivityInterceptor(chio_client=ChioClient(side), receipt_sink=sink)
        cap = await side.create_capability("agent:test", ["flaky", "quick"], 600)
        icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
        async with Worker(
            temporal_client, task_queue=tq, workflows=[Retrying], activities=[flaky, quick],
            interceptors=[icp],
        ):  # fmt: skip
            handle = await temporal_client.start_workflow(Retrying.run, id=wid, task_queue=tq)
            assert await asyncio.wait_for(handle.result(), 60) == 4
        watcher = watcher_for(temporal_client, sink, tmp_path, tq)
        assert await watcher.poll_once() == 1
        await icp.aclose()  # its outcome records, one per body run, are accepted by the sink
        assert await sink.flush(30)

    t = cfg.topics
    got = await consume(kafka_bootstrap, [t.steps, t.runs], 17, timeout=30)
    on_steps = [schemas.decode(r.value) for r in got if r.topic == t.steps]
    steps = [d for d in on_steps if d.schema_name == schemas.STEP_SCHEMA]
    outcomes = [d for d in on_steps if d.schema_name == schemas.STEP_OUTCOME_SCHEMA]
    assert len(outcomes) == 8
    runs = [schemas.decode(r.value) for r in got if r.topic == t.runs]
    (completion,) = [schemas.RunCompletion.from_avro(d.record) for d in runs]
    receipts = [schemas.StepReceipt.from_avro(d.record) for d in steps]
    assert {r.run_id for r in receipts} == {completion.run_id}
    assert len({r.receipt_id for r in receipts}) == len(receipts) == 8
    assert completion.expected_steps == len(receipts)
    keys = dict(await side.public_keys())
    assert all(schemas.verify_receipt(r, keys) for r in receipts)
    assert all(
        schemas.verify_body(d.body, keys[r.key_id]) for d, r in zip(steps, receipts, strict=True)
    )
