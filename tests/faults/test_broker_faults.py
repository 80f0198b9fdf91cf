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
from temporalio.client import Client

from chio_receipts.stack import LocalStack, StackConfig, StackError
from tests.support.faults.pipeline import Pipeline, PipelineOptions, cache_dir, clickhouse_dsn_for
from tests.support.faults.scenario import finish
from tests.support.faults.workload import FaultInput
from tests.support.helpers import eventually

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


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_f3_broker_paused_45s(
    broker_stack: tuple[LocalStack, Client], broker_pipeline: Callable[..., Pipeline]
) -> None:
    """SIGSTOP the broker for 45 s (a GC stall) mid-stream: producers time out and replay;
    duplicates may reach Kafka, never ClickHouse (I3 without FINAL)."""
    local, _ = broker_stack
    p = broker_pipeline()
    await p.start()
    await p.start_runs(20, FaultInput(steps=4, step_sleep_s=1.0), deny_every=5)
    await eventually(lambda: len(p.oracle().accepted) >= 20, 120)
    local.kafka.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(45)  # the stall itself
    finally:
        local.kafka.signal(signal.SIGCONT)
    t0 = time.monotonic()
    await finish(p, "F3", "broker SIGSTOP 45 s, SIGCONT", recovery_from=t0, quiesce_timeout=180)
    steps_in_kafka = len(await p.read_topic(p.topics.steps))
    assert steps_in_kafka >= len(p.oracle().accepted)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_f2_broker_down_longer_than_the_send_budget(
    broker_stack: tuple[LocalStack, Client], broker_pipeline: Callable[..., Pipeline]
) -> None:
    """The broker is down for 90 s (six times the delivery timeout): activities keep going on
    the spool, nothing is dropped, a worker stopped during the outage stops within its bound,
    and everything arrives after the restart."""
    local, _ = broker_stack
    p = broker_pipeline()
    await p.start(workers=2)
    await p.start_runs(16, FaultInput(steps=4, step_sleep_s=1.0))
    await eventually(lambda: len(p.oracle().accepted) >= 8, 120)
    local.kafka.kill()
    before = len(p.oracle().accepted)
    t_down = time.monotonic()
    await eventually(lambda: len(p.oracle().accepted) >= before + 20, 60)
    # One worker is stopped while Kafka is unreachable: it must persist, not hang.
    t_stop = time.monotonic()
    code = await p.workers[1].terminate(60)
    stop_s = time.monotonic() - t_stop
    assert code == 0, p.workers[1].log_tail()
    assert stop_s < 25, f"worker stop took {stop_s:.1f}s with the broker down"
    await asyncio.sleep(max(0.0, 90 - (time.monotonic() - t_down)))  # the rest of the outage
    during = len(p.oracle().accepted) - before
    await local.kafka.restart()
    p.workers[1].start()  # its spool is replayed by the new process
    t0 = time.monotonic()
    await finish(
        p,
        "F2",
        "broker down 90 s (> send budget), one worker stopped meanwhile",
        recovery_from=t0,
        quiesce_timeout=180,
        note=f"{during} receipts spooled during the outage; stop took {stop_s:.1f}s",
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_f18_spool_full_fails_closed(
    broker_stack: tuple[LocalStack, Client], broker_pipeline: Callable[..., Pipeline]
) -> None:
    """The broker is down and the spool reaches its capacity: attempts fail retryably (the
    body does not run, Temporal retries), never a silent drop; after the broker returns and the
    spool drains, everything completes. Capacity is the spool's ``max_bytes`` (ENOSPC inside a
    write is covered by the spool model test)."""
    local, _ = broker_stack
    p = broker_pipeline(worker={"spool_max_bytes": 12_000})
    await p.start()
    local.kafka.kill()
    await p.start_runs(8, FaultInput(steps=4))
    await eventually(lambda: p.oracle().refused, 120)
    await asyncio.sleep(10)  # keep the spool full for a while: attempts keep failing closed
    refused = len(p.oracle().refused)
    await local.kafka.restart()
    t0 = time.monotonic()
    out = await finish(
        p,
        "F18",
        "spool full while the broker is down",
        recovery_from=t0,
        run_timeout=300,
        quiesce_timeout=180,
        note=f"{refused} attempts refused (retried)",
    )
    assert not (out.oracle.refused & out.snap.receipt_ids), "a refused receipt was delivered"
    # Each refused attempt is accounted for (GATE_FAILED, sink_refused: its record waited in the
    # worker until the sink accepted again), so no envelope is left incomplete for it.
    reasons = {
        reason
        for e in out.snap.envelopes
        for *_, account, reason in e.accounts
        if account == "GATE_FAILED"
    }
    assert reasons == {"sink_refused"}, reasons
    assert all(e.complete for e in out.snap.envelopes), [
        e for e in out.snap.envelopes if not e.complete
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_f15_temporal_server_restart(
    broker_stack: tuple[LocalStack, Client], broker_pipeline: Callable[..., Pipeline]
) -> None:
    """kill -9 the Temporal dev server mid-stream and restart it on the same database file:
    workflows resume, retried attempts get new receipts; I1-I4."""
    local, _ = broker_stack
    p = broker_pipeline()
    await p.start()
    await p.start_runs(12, FaultInput(steps=4, step_sleep_s=1.0))
    await eventually(lambda: len(p.oracle().accepted) >= 12, 120)
    local.temporal.kill()
    await asyncio.sleep(5)  # the outage itself
    await local.temporal.restart()
    t0 = time.monotonic()
    await finish(
        p,
        "F15",
        "Temporal dev server kill -9, restart on the same db",
        recovery_from=t0,
        run_timeout=300,
        quiesce_timeout=180,
    )
