"""Broker rows on a stack of their own (killing the session broker would disturb other tests):
F1 (kill -9 mid-produce, restart after 10 s) in the default run; F2, F3, F19 marked slow."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from _helpers import eventually
from harness.pipeline import Pipeline, PipelineOptions, cache_dir, clickhouse_dsn_for
from harness.scenario import finish
from harness.workload import FaultInput
from temporalio.client import Client

from chio_receipts.stack import LocalStack, StackConfig, StackError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def broker_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[LocalStack, Client]]:
    """A Kafka broker + Temporal server only these rows use (and kill)."""
    local = LocalStack(
        StackConfig(data_dir=tmp_path_factory.mktemp("broker-stack"), cache_dir=cache_dir())
    )
    try:
        await local.start()
    except StackError as exc:
        pytest.fail(f"the fault stack could not start:\n{exc}", pytrace=False)
    try:
        client = await Client.connect(local.temporal_address)
        yield local, client
    finally:
        local.stop()


@pytest.fixture
async def broker_pipeline(
    broker_stack: tuple[LocalStack, Client], tmp_path: Path
) -> AsyncIterator[Callable[..., Pipeline]]:
    """make(**options) -> a Pipeline on the module's own stack (the broker must be up)."""
    local, client = broker_stack
    if local.kafka.process is None:
        await local.kafka.restart()
    made: list[Pipeline] = []

    def make(**options: Any) -> Pipeline:
        root = tmp_path / f"pipeline-{len(made)}"
        p = Pipeline(
            root,
            name=f"broker-{uuid.uuid4().hex[:8]}",
            bootstrap=local.kafka_bootstrap,
            temporal_address=local.temporal_address,
            client=client,
            dsn=clickhouse_dsn_for(root),
            options=PipelineOptions(**options),
        )
        made.append(p)
        return p

    yield make
    if local.kafka.process is None:
        await local.kafka.restart()
    else:
        local.kafka.signal(signal.SIGCONT)
    for p in made:
        await p.close()


@pytest.mark.timeout(600)
async def test_f1_broker_kill_9_mid_produce(
    broker_stack: tuple[LocalStack, Client], broker_pipeline: Callable[..., Pipeline]
) -> None:
    """kill -9 the broker at ~30 % of the receipts, restart it 10 s later: the producer recovers
    without a worker restart and the spool drains; I1-I6."""
    local, _ = broker_stack
    p = broker_pipeline()
    await p.start()
    runs, steps = 30, 4
    await p.start_runs(runs, FaultInput(steps=steps, step_sleep_s=1.0), deny_every=6)
    total = runs * steps
    await eventually(lambda: len(p.oracle().accepted) >= total * 0.3, 120)
    local.kafka.kill()
    killed_at = len(p.oracle().accepted)
    await asyncio.sleep(10)  # the outage itself
    await local.kafka.restart()
    t0 = time.monotonic()
    out = await finish(
        p,
        "F1",
        "broker kill -9 at ~30 %, restart after 10 s",
        recovery_from=t0,
        note=f"killed after {killed_at} receipts",
    )
    assert [w.starts for w in p.workers] == [1], "a worker had to be restarted"
    assert len(out.oracle.accepted) >= total
