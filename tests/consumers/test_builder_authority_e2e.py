"""Temporal is the authority on the run, on the real stack: a worker declares success with
``finalize_workflow``, Temporal then terminates the run, and the builder's envelope says
TERMINATED (with every step, and the declaration kept as metadata)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.worker import Worker

import chio_receipts.streamer as streamer
from chio_receipts.consumers import BuilderConfig, ClickHouseConfig, ReceiptBuilderService
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA
from chio_receipts.interceptor import ChioActivityInterceptor, ChioClient, WorkflowGrant
from chio_receipts.schemas import KafkaConnection, KeyPair, decode
from chio_receipts.sidecar import LocalSidecar
from tests.support.helpers import eventually
from tests.support.kafka_topics import read_all
from tests.support.streamer_kafka import config
from tests.support.watcher import quick, watcher_for

pytestmark = pytest.mark.e2e
BUILDER = KeyPair.generate("builder-authority")


@workflow.defn(sandboxed=False)
class StepsThenWait:
    """Two receipted activities, then waits (until Temporal terminates it)."""

    def __init__(self) -> None:
        self.steps = 0

    @workflow.run
    async def run(self) -> None:
        for _ in range(2):
            await workflow.execute_activity(quick, start_to_close_timeout=timedelta(seconds=10))
            self.steps += 1
        await workflow.wait_condition(lambda: False)

    @workflow.query
    def done(self) -> int:
        return self.steps


async def test_declared_success_then_terminate_gives_a_terminated_envelope_with_every_step(
    temporal_client: Client,
    kafka_bootstrap: str,
    clickhouse_dsn: str,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("auth") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    topics = cfg.topics.names
    tq, wid = unique("tq"), unique("terminated")
    side = LocalSidecar()
    builder_cfg = BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        clickhouse=ClickHouseConfig(dsn=clickhouse_dsn),
        builder_key=BUILDER,
        public_keys=dict(await side.public_keys()),
        trusted_kernel_keys=frozenset(k.hex() for k in dict(await side.public_keys()).values()),
        topics=topics,
        group_id=unique("g"),
        poll_timeout_ms=100,
        grace_seconds=0.5,  # the provisional envelope is written before Temporal's arrives
    )
    service = ReceiptBuilderService(builder_cfg)
    stop = asyncio.Event()
    await service.start()
    task = asyncio.create_task(service.run(stop))

    async def latest() -> tuple[object, ...] | None:
        _, rows = await service.sink.query(
            "SELECT revision, outcome, complete, step_count, expected_steps, started_at, "
            "completed_at, extra FROM workflow_receipts "
            f"WHERE workflow_id = '{wid}' ORDER BY revision DESC LIMIT 1"
        )
        return tuple(rows[0]) if rows else None

    try:
        async with streamer.ReceiptStreamer(cfg) as sink:
            icp = ChioActivityInterceptor(chio_client=ChioClient(side), receipt_sink=sink)
            cap = await side.create_capability("agent:test", ["quick"], 600)
            icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
            async with Worker(
                temporal_client,
                task_queue=tq,
                workflows=[StepsThenWait],
                activities=[quick],
                interceptors=[icp],
            ):
                handle = await temporal_client.start_workflow(
                    StepsThenWait.run, id=wid, task_queue=tq
                )
                await eventually(lambda: _steps_done(handle), timeout=60)
                run_id = handle.result_run_id or ""
                # The worker declares success...
                icp.finalize_workflow(workflow_id=wid, run_id=run_id, outcome="success")
                await icp.aclose()
                assert await sink.flush(30)
                # ... the builder waits for Temporal's word, then writes a provisional envelope.
                provisional = await eventually(latest, timeout=60)
                assert provisional[:5] == (1, "unknown", False, 2, None)
                assert provisional[7]["declared_outcome"] == "success"
                assert provisional[7]["outcome_source"] == "finalize"
                # ... and Temporal terminates the run.
                await handle.terminate("the operator stopped it")
            watcher = watcher_for(temporal_client, sink, tmp_path, tq)
            await eventually(lambda: _polled(watcher), timeout=60)
            assert await sink.flush(30)

        async def terminated() -> tuple[object, ...] | None:
            row = await latest()
            return row if row is not None and row[1] == "terminated" else None

        row = await eventually(terminated, timeout=60)
        revision, outcome, complete, step_count, expected, started_at, completed_at, extra = row
        assert (revision, outcome, complete, step_count, expected) == (2, "terminated", True, 2, 2)
        assert extra["declared_outcome"] == "success"
        assert extra["outcome_source"] == "watcher"
        described = await handle.describe()
        assert _utc(started_at) == described.start_time
        assert _utc(completed_at) == described.close_time
        # Both revisions were published; the last one is Temporal's.
        published = await read_all(kafka_bootstrap, topics.envelopes, 2)
        bodies = [decode(m.value) for m in published]
        assert all(b.schema_name == ENVELOPE_SCHEMA for b in bodies)
        assert [b.record["outcome"] for b in bodies] == ["unknown", "terminated"]
        assert bodies[-1].record["metadata"]["revision"] == "2"
        assert bodies[-1].record["step_count"] == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await service.stop()


def _utc(value: object) -> datetime:
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def _steps_done(handle: object) -> bool:
    return bool(await handle.query(StepsThenWait.done) == 2)  # type: ignore[attr-defined]


async def _polled(watcher: streamer.CompletionWatcher) -> bool:
    return await watcher.poll_once() >= 1
