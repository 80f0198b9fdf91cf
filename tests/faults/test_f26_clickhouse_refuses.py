"""F26: ClickHouse refuses a row. A signed, decodable step whose value the table rejects (its
receipt id is not a UUID) is injected under its own run key while runs execute: it goes to the
dead-letter topic with reason ``clickhouse_data`` exactly once, nothing of it is stored or
marked written, and every other row and envelope is as without it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import tests.support.avro_strategies as avro_strategies
from chio_receipts.schemas import STEP_SCHEMA, frame, run_key, sign_receipt
from tests.support.faults.pipeline import Pipeline
from tests.support.faults.scenario import finish
from tests.support.faults.workload import FaultInput

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(400)
async def test_f26_clickhouse_refuses_a_row(make_pipeline: Callable[..., Pipeline]) -> None:
    p = make_pipeline()
    await p.start()
    await p.start_runs(6, FaultInput(steps=3))
    step, body = sign_receipt(
        avro_strategies.sample_step(
            key_id=p.worker_key.key_id,
            workflow_id=f"{p.name}-f26",
            receipt_id="not-a-uuid",
        ),
        p.worker_key,
    )
    key = run_key(step.namespace, step.workflow_id, step.run_id).encode()
    [origin] = await p.produce_raw(p.topics.steps, [(key, frame(STEP_SCHEMA, body))])
    await p.start_runs(3, FaultInput(steps=2))
    out = await finish(
        p,
        "F26",
        "ClickHouse refuses a row (non-UUID receipt id)",
        injected={origin: "clickhouse_data"},
    )
    [dead] = out.snap.dead_letters
    assert dead.origin == origin
    assert dead.reason == "clickhouse_data"
    assert not any(s.workflow_id == f"{p.name}-f26" for s in out.snap.steps)
    assert all(e.complete for e in out.snap.envelopes)
