"""Seed 003's rule on the real stack: a Temporal worker whose activity is denied, by a grant's
constraint and by a Cedar policy, before its body runs; the signed deny receipts reach Kafka
with the deciding guard and constraint or policy id in their evidence.

Seed 003 ("deny a task whose input starts with ``forbidden``") was a mock policy activity; here
it is a ``memory_write_deny_patterns`` constraint of the grant the workflow holds, and, for a
workflow whose grant has no such constraint, the Cedar policy ``seed-003-forbidden-input``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

import chio_receipts.streamer as streamer
from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    ArgumentKey,
    ChioActivityInterceptor,
    ChioClient,
    WorkflowGrant,
)
from chio_receipts.schemas import STEP_SCHEMA, StepReceipt, Verdict, decode, verify_kernel_receipt
from chio_receipts.sidecar import LocalSidecar, SidecarServer, build_guards
from tests.support.streamer_kafka import config, consume

pytestmark = pytest.mark.e2e

FORBIDDEN = "forbidden: drop the production tables"
RAN: list[str] = []

SEED_003 = """
@id("seed-003-forbidden-input")
forbid(principal, action == Chio::Action::"call", resource)
when { context.args.hasTag("0") && context.args.getTag("0") like "forbidden*" };
"""


@activity.defn
async def execute_agent_task(task: str) -> str:
    RAN.append(task)
    return "done"


@workflow.defn(sandboxed=False)
class SeedTaskWorkflow:
    @workflow.run
    async def run(self, task: str) -> str:
        try:
            return await workflow.execute_activity(
                execute_agent_task, task, start_to_close_timeout=timedelta(seconds=20)
            )
        except ApplicationError as exc:
            return f"{exc.type}"


def _scope(constraints: list[dict[str, Any]]) -> dict[str, Any]:
    grant: dict[str, Any] = {
        "server_id": "*",
        "tool_name": "execute_agent_task",
        "operations": ["invoke"],
    }
    if constraints:
        grant["constraints"] = constraints
    return {"grants": [grant]}


async def _mint(url: str, chio: ChioClient, scope: dict[str, Any]) -> Any:
    """A capability minted with a kernel-format scope (its grants and their constraints)."""
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            "/v1/capabilities", json={"subject": "agent:seed", "scope": scope, "ttl_seconds": 600}
        )
        r.raise_for_status()
    return await chio.get_capability(r.json()["id"])


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[LocalSidecar, str]]:
    (tmp_path / "seed.cedar").write_text(SEED_003)
    guards, digest = build_guards(tmp_path / "seed.cedar")
    side = LocalSidecar(guards=guards, policy_hash=digest)
    async with SidecarServer(side) as server:
        yield side, server.url


async def test_seed_003_rule_denies_forbidden_input(
    temporal_client: Client,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    tmp_path: Path,
    served: tuple[LocalSidecar, str],
) -> None:
    side, url = served
    cfg = config(kafka_bootstrap, str(tmp_path / "spool"), unique("pol") + ".")
    await streamer.ensure_topics(cfg.kafka, cfg.topics)
    tq = unique("tq")
    runs = {
        "constraint-forbidden": (unique("c-deny"), FORBIDDEN),
        "constraint-allowed": (unique("c-ok"), "summarize the quarter"),
        "cedar-forbidden": (unique("p-deny"), FORBIDDEN),
    }
    chio = ChioClient(url)
    RAN.clear()
    async with streamer.ReceiptStreamer(cfg) as sink:
        icp = ChioActivityInterceptor(
            chio_client=chio,
            receipt_sink=sink,
            argument_key=ArgumentKey.from_hex("args-e2e", "7a" * 32),
        )
        constrained = await _mint(
            url, chio, _scope([{"type": "memory_write_deny_patterns", "value": ["^forbidden"]}])
        )
        plain = await _mint(url, chio, _scope([]))
        for name, (wid, _) in runs.items():
            token = plain if name.startswith("cedar") else constrained
            icp.register_workflow_grant(WorkflowGrant(workflow_id=wid, token=token))
        async with Worker(
            temporal_client,
            task_queue=tq,
            workflows=[SeedTaskWorkflow],
            activities=[execute_agent_task],
            interceptors=[icp],
        ):
            results = {
                name: await temporal_client.execute_workflow(
                    SeedTaskWorkflow.run,
                    task,
                    id=wid,
                    task_queue=tq,
                    execution_timeout=timedelta(seconds=60),
                )
                for name, (wid, task) in runs.items()
            }
        await icp.aclose()
        assert await sink.flush(30)
    await chio.aclose()

    assert results == {
        "constraint-forbidden": DENIED_ERROR_TYPE,
        "constraint-allowed": "done",
        "cedar-forbidden": DENIED_ERROR_TYPE,
    }
    assert RAN == ["summarize the quarter"]  # a denied body never ran

    records = await consume(kafka_bootstrap, [cfg.topics.steps], 3)
    steps: dict[str, StepReceipt] = {}
    for rec in records:
        decoded = decode(rec.value)
        if decoded.schema_name == STEP_SCHEMA:
            step = StepReceipt.from_avro(decoded.record)
            steps[step.workflow_id] = step
    assert len(steps) == 3
    trusted = side.trusted_keys()
    expected = {
        "constraint-forbidden": ("constraints", "memory_write_deny_patterns[0]"),
        "cedar-forbidden": ("cedar", "seed-003-forbidden-input"),
    }
    for name, (guard, constraint) in expected.items():
        step = steps[runs[name][0]]
        assert step.verdict is Verdict.DENY
        chio_receipt = json.loads(step.chio_receipt)
        assert verify_kernel_receipt(chio_receipt, trusted_keys=trusted).valid
        assert chio_receipt["decision"]["guard"] == guard
        assert chio_receipt["policy_hash"] == side.policy_hash
        evidence = {e["guard_name"]: json.loads(e["details"]) for e in chio_receipt["evidence"]}
        assert evidence[guard]["constraint"] == constraint
        assert "drop the production" not in json.dumps(chio_receipt["evidence"])
        assert "drop the production" not in chio_receipt["decision"]["reason"]
    assert steps[runs["constraint-allowed"][0]].verdict is Verdict.ALLOW
