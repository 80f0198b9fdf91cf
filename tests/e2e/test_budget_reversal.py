"""``reverse_budget_charge`` on the real stack: a Temporal dev server, Kafka, the interceptor
publishing through the ``ReceiptStreamer``, and our sidecar served on a loopback port over a
SQLite file.

A saga debits twice under a grant of two invocations; the third debit is denied (budget
exhausted); its compensation refunds the first debit's charge with the exported activity,
twice (the second refunds nothing), and the second debit's through an activity whose first
attempt loses the sidecar's answer (Temporal's retry refunds nothing). The refunded budget
then allows one more debit. Every attempt, refunds included, has its step receipt on the
steps topic; each refund has its own signed receipt in the sidecar's receipt log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

import chio_receipts.streamer as streamer
from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    BudgetRefund,
    BudgetReversal,
    ChioActivityInterceptor,
    ChioClient,
    WorkflowGrant,
    current_receipt_id,
    reverse_budget_charge,
)
from chio_receipts.schemas import (
    STEP_SCHEMA,
    StepReceipt,
    Verdict,
    chio_step_fields,
    decode,
    verify_kernel_receipt,
)
from chio_receipts.sidecar import LocalSidecar, SidecarServer, SidecarStore
from tests.support.streamer_kafka import config, consume

pytestmark = pytest.mark.e2e

_T = timedelta(seconds=10)
_FAST = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=3)


@activity.defn
async def debit(account: str) -> str:
    """Charged against the grant's budget; returns its own decision's receipt id."""
    return current_receipt_id()


_SIDECAR: dict[str, str] = {}


@activity.defn
async def refund_lost_answer(receipt_id: str) -> BudgetRefund:
    """Refunds, then loses the answer on its first attempt: Temporal retries it."""
    info = activity.info()
    refund = await BudgetReversal(_SIDECAR["url"]).refund(
        receipt_id, workflow_id=info.workflow_id or "", run_id=info.workflow_run_id or ""
    )
    if info.attempt == 1:
        raise ApplicationError("the answer was lost", type="LostAnswer")
    return refund


@dataclass
class SagaResult:
    first: str
    denied: bool
    refund: BudgetRefund
    again: BudgetRefund
    retried: BudgetRefund
    after: str


@workflow.defn(sandboxed=False)
class BudgetSaga:
    @workflow.run
    async def run(self) -> SagaResult:
        first = await workflow.execute_activity(debit, "a", start_to_close_timeout=_T)
        second = await workflow.execute_activity(debit, "b", start_to_close_timeout=_T)
        denied = False
        try:
            await workflow.execute_activity(debit, "c", start_to_close_timeout=_T)
        except ApplicationError as exc:
            denied = exc.type == DENIED_ERROR_TYPE
        refund = await workflow.execute_activity(
            reverse_budget_charge, first, start_to_close_timeout=_T
        )
        again = await workflow.execute_activity(
            reverse_budget_charge, first, start_to_close_timeout=_T
        )
        retried = await workflow.execute_activity(
            refund_lost_answer, second, start_to_close_timeout=_T, retry_policy=_FAST
        )
        after = await workflow.execute_activity(debit, "d", start_to_close_timeout=_T)
        return SagaResult(first, denied, refund, again, retried, after)


async def test_saga_refunds_a_budget_charge_exactly_once_through_a_worker(
    temporal_client: Client,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    side = LocalSidecar(store=SidecarStore(tmp_path / "sidecar.db"))
    scope = {
        "grants": [
            {
                "server_id": "*",
                "tool_name": "debit",
                "operations": ["invoke"],
                "max_invocations": 2,
            },
            {"server_id": "*", "tool_name": "reverse_budget_charge", "operations": ["invoke"]},
            {"server_id": "*", "tool_name": "refund_lost_answer", "operations": ["invoke"]},
        ]
    }
    token = side.chio_mint("agent:saga", scope, 600)
    cap = await side.get_capability(token["id"])
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("budget") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq, wid = unique("tq"), unique("saga")
    async with SidecarServer(side) as server:
        _SIDECAR["url"] = server.url
        monkeypatch.setenv("CHIO_SIDECAR_URL", server.url)  # the exported activity's sidecar
        chio = ChioClient(server.url)
        async with streamer.ReceiptStreamer(cfg) as sink:
            icp = ChioActivityInterceptor(
                chio_client=chio,
                receipt_sink=sink,
                default_tool_server="agent-tools",
                record_outcomes=False,
            )
            icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=cap))
            async with Worker(
                temporal_client,
                task_queue=tq,
                workflows=[BudgetSaga],
                activities=[debit, reverse_budget_charge, refund_lost_answer],
                interceptors=[icp],
            ):
                result = await temporal_client.execute_workflow(
                    BudgetSaga.run, id=wid, task_queue=tq, execution_timeout=timedelta(seconds=60)
                )
            await icp.aclose()
            assert await sink.flush(30)
        await chio.aclose()

    assert result.denied
    assert result.first
    assert result.after
    assert (result.refund.status, result.refund.refunded) == ("reversed", True)
    assert (result.refund.refunded_invocations, result.refund.refunded_units) == (1, 0)
    assert result.refund.receipt_id == result.first
    # The same refund again, and Temporal's retry of a lost answer: nothing is refunded twice.
    assert (result.again.status, result.again.refunded) == ("already_reversed", False)
    assert result.again.refund_receipt_id == result.refund.refund_receipt_id
    assert (result.retried.status, result.retried.refunded) == ("already_reversed", False)
    assert result.retried.refund_receipt_id not in ("", result.refund.refund_receipt_id)

    messages = await consume(kafka_bootstrap, [cfg.topics.steps], 8, timeout=60)
    steps = [
        StepReceipt.from_avro(d.record)
        for d in (decode(m.value) for m in messages)
        if d.schema_name == STEP_SCHEMA
    ]
    by_type: dict[str, list[StepReceipt]] = {}
    for step in steps:
        by_type.setdefault(step.activity_type, []).append(step)
    assert [s.verdict for s in sorted(by_type["debit"], key=lambda s: s.receipt_id)] == [
        Verdict.ALLOW,
        Verdict.ALLOW,
        Verdict.DENY,
        Verdict.ALLOW,
    ]
    [deny] = [s for s in by_type["debit"] if s.verdict is Verdict.DENY]
    assert "max_invocations 2 reached" in deny.reason
    evidence = json.loads(deny.chio_receipt)["evidence"]
    assert [e["guard_name"] for e in evidence] == ["budget"]
    assert json.loads(evidence[0]["details"])["constraint"] == "max_invocations"
    # Each refund attempt was gated and has its step receipt: two refunds, two attempts of
    # the one whose answer was lost.
    assert len(by_type["reverse_budget_charge"]) == 2
    assert sorted(s.attempt for s in by_type["refund_lost_answer"]) == [1, 2]
    assert all(
        s.verdict is Verdict.ALLOW
        for s in by_type["reverse_budget_charge"] + by_type["refund_lost_answer"]
    )
    first_step = next(s for s in by_type["debit"] if s.receipt_id == result.first)
    assert chio_step_fields(first_step).receipt_id

    # Both refunds left a signed receipt in the sidecar's receipt log, which still verifies.
    trusted = side.trusted_keys()
    for refund_id in (result.refund.refund_receipt_id, result.retried.refund_receipt_id):
        rows = side.store._read(  # the log's rows, as stored
            "SELECT body FROM receipt_log WHERE receipt_id = ?", (refund_id,)
        )
        assert len(rows) == 1
        refund = json.loads(bytes(rows[0][0]))
        assert verify_kernel_receipt(refund, trusted_keys=trusted)
        assert refund["metadata"]["budget_authority"]["terminal"]["disposition"] == "reversed"
        assert refund["metadata"]["budget_reversal"]["workflow_id"] == wid
    assert side.store.verify_log().ok
    assert side.store.budget_usage(token["id"], 0) == (1, 0)  # only the last debit counts
    # The project's code never logged the activity's argument (the receipt id) nor its answer
    # (Temporal's own debug log of workflow activations is the SDK's, not ours).
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("chio_receipts"))
    assert any(r.name.startswith("chio_receipts") for r in caplog.records)
    assert result.first not in logged
    assert result.refund.refund_receipt_id not in logged
    side.store.close()
