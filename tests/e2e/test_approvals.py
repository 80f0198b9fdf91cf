"""Human approval on the real stack: Temporal dev server and our sidecar served over HTTP.

A guard in the sidecar answers "approval required" for the ``pay`` tool. The worker's attempt
is held (a PENDING_APPROVAL receipt, a non-retryable ``ChioApprovalPending``), the workflow
waits for the decision signal, and a person answers on the sidecar's ``/approvals`` routes; the
sidecar signs the answer and signals the workflow, which schedules the payment again. History
shows every attempt as attempt 1: no retry is burned while waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.worker import Replayer, Worker

from chio_receipts.cli_approvals import answer_approval
from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    ChioActivityInterceptor,
    ChioClient,
    InMemoryReceiptSink,
    WorkflowGrant,
)
from chio_receipts.schemas import Verdict, check_chio_step, verify_kernel_receipt
from chio_receipts.sidecar import DataDir, LocalSidecar, SidecarServer
from chio_receipts.sidecar._approvals import RequireApproval, TemporalSignaller
from tests.support.approval_workflows import PAID, Payments, PaymentsWorkflow, look_up, pay
from tests.support.helpers import eventually

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    url: str
    sidecar: LocalSidecar
    client: Client
    interceptor: ChioActivityInterceptor
    sink: InMemoryReceiptSink
    task_queue: str
    key_hex: str


@contextlib.asynccontextmanager
async def _stack(
    data_dir: Path, client: Client, temporal_address: str, task_queue: str, *, signal: bool
) -> AsyncIterator[Stack]:
    with DataDir(data_dir) as directory:
        side = LocalSidecar(
            directory.signing_key(),
            store=directory.store,
            guards=[RequireApproval(frozenset({"pay"}))],
        )
        if signal:
            side.approvals.signaller = TemporalSignaller(lambda: Client.connect(temporal_address))
        async with SidecarServer(side) as server:
            sink = InMemoryReceiptSink()
            chio = ChioClient(server.url)
            interceptor = ChioActivityInterceptor(
                chio_client=chio, default_tool_server="payments", receipt_sink=sink
            )
            worker = Worker(
                client,
                task_queue=task_queue,
                workflows=[PaymentsWorkflow],
                activities=[pay, look_up],
                interceptors=[interceptor],
            )
            async with worker:
                yield Stack(
                    server.url,
                    side,
                    client,
                    interceptor,
                    sink,
                    task_queue,
                    directory.signing_key().public_key.hex(),
                )
            await interceptor.aclose()
            await chio.aclose()


async def _start(stack: Stack, workflow_id: str, plan: Payments) -> WorkflowHandle[Any, Any]:
    token = await stack.interceptor.evaluator.create_capability(  # type: ignore[attr-defined]
        "agent:payer", ["pay", "look_up"], 600
    )
    stack.interceptor.register_workflow_grant(WorkflowGrant(workflow_id=workflow_id, token=token))
    return await stack.client.start_workflow(
        PaymentsWorkflow.run,
        plan,
        id=workflow_id,
        task_queue=stack.task_queue,
        execution_timeout=timedelta(seconds=120),
    )


async def _pending(http: httpx.AsyncClient, workflow_id: str, seen: set[str]) -> dict[str, Any]:
    """The next pending request of ``workflow_id`` not in ``seen``."""

    async def found() -> dict[str, Any] | None:
        answer = await http.get("/approvals/pending", params={"workflow_id": workflow_id})
        assert answer.status_code == 200, answer.text
        fresh = [a for a in answer.json()["approvals"] if a["approval_id"] not in seen]
        return fresh[0] if fresh else None

    approval = await eventually(found, timeout=30)
    assert approval is not None
    seen.add(approval["approval_id"])
    return approval


async def _attempts(handle: WorkflowHandle[Any, Any]) -> tuple[int, list[int]]:
    """(activities scheduled, the attempt number of every activity started) from history."""
    scheduled, attempts = 0, []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled += 1
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attempts.append(event.activity_task_started_event_attributes.attempt)
    return scheduled, attempts


async def test_approve_on_the_http_route_resumes_the_run_and_binds_each_approval_to_its_call(
    temporal_client: Client, temporal_address: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    workflow_id = unique("approve")
    async with _stack(
        tmp_path / "sidecar", temporal_client, temporal_address, unique("q"), signal=True
    ) as stack:
        handle = await _start(stack, workflow_id, Payments(amounts=["10", "20"]))
        seen: set[str] = set()
        async with httpx.AsyncClient(base_url=stack.url) as http:
            first = await _pending(http, workflow_id, seen)
            assert first["tool_name"] == "pay"
            assert first["workflow"]["workflow_id"] == workflow_id
            assert PAID.get(workflow_id) is None  # held: the body did not run
            refused = await http.post(
                f"/approvals/{first['approval_id']}/respond",
                json={"outcome": "approved", "approver": "mallory"},
            )
            assert refused.status_code == 400  # the approver is never taken from the body
            answer = await http.post(
                f"/approvals/{first['approval_id']}/respond",
                json={"outcome": "approved", "reason": "invoice checked"},
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["outcome"], body["approver"], body["signalled"]) == (
                "approved",
                "local",
                True,
            )
            again = await http.post(
                f"/approvals/{first['approval_id']}/respond", json={"outcome": "denied"}
            )
            assert again.status_code == 409
            # The second payment has other arguments: it needs an approval of its own.
            second = await _pending(http, workflow_id, seen)
            assert second["parameter_hash"] != first["parameter_hash"]
            assert PAID[workflow_id] == ["10"]
            answer = await http.post(
                f"/approvals/{second['approval_id']}/respond", json={"outcome": "approved"}
            )
            assert answer.status_code == 200
            assert await handle.result() == ["found invoice", "paid 10", "paid 20"]
            resolved = (await http.get(f"/approvals/{first['approval_id']}")).json()
        assert resolved["resolution"]["approver"] == "local"
        assert verify_kernel_receipt(
            resolved["resolution"]["receipt"], trusted_keys={stack.key_hex}
        ).valid
        assert PAID[workflow_id] == ["10", "20"]
        scheduled, attempts = await _attempts(handle)
        assert scheduled == 5  # look_up, pay held, pay re-run, pay held, pay re-run
        assert attempts == [1, 1, 1, 1, 1]  # no retry burned while waiting
        steps = [s for s, _ in stack.sink.steps]
        pay_steps = [s for s in steps if s.tool == "pay"]
        assert [s.verdict for s in pay_steps] == [
            Verdict.PENDING_APPROVAL,
            Verdict.ALLOW,
            Verdict.PENDING_APPROVAL,
            Verdict.ALLOW,
        ]
        for step in steps:
            assert check_chio_step(step, trusted_keys={stack.key_hex}) is None
        allowed = json.loads(pay_steps[1].chio_receipt)
        meta = allowed["metadata"]["approval"]
        assert (meta["approval_id"], meta["approver"]) == (first["approval_id"], "local")
        decision = meta["decision_receipt"]
        assert verify_kernel_receipt(decision, trusted_keys={stack.key_hex}).valid
        assert decision["metadata"]["approval"]["request_receipt_id"] == pay_steps[0].receipt_id
        evidence = [json.loads(e["details"]) for e in allowed["evidence"]]
        assert {"approver": "local", "approval_id": first["approval_id"]}.items() <= evidence[
            -1
        ].items()
        assert stack.interceptor.stats.pending_approval == 2
        # The wait, the signal and the re-run replay deterministically.
        replayer = Replayer(workflows=[PaymentsWorkflow], interceptors=[stack.interceptor])
        replayed = await replayer.replay_workflow(await handle.fetch_history())
        assert replayed.replay_failure is None


async def test_reject_ends_the_run_with_chio_capability_denied(
    temporal_client: Client, temporal_address: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    workflow_id = unique("reject")
    async with _stack(
        tmp_path / "sidecar", temporal_client, temporal_address, unique("q"), signal=True
    ) as stack:
        handle = await _start(stack, workflow_id, Payments(amounts=["990"]))
        async with httpx.AsyncClient(base_url=stack.url) as http:
            pending = await _pending(http, workflow_id, set())
            answer = await http.post(
                f"/approvals/{pending['approval_id']}/respond",
                json={"outcome": "denied", "reason": "over the limit"},
            )
            assert answer.status_code == 200
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        cause = failed.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.type == DENIED_ERROR_TYPE
        assert cause.non_retryable
        assert "rejected by local: over the limit" in cause.message
        assert PAID.get(workflow_id) is None
        scheduled, attempts = await _attempts(handle)
        assert (scheduled, attempts) == (3, [1, 1, 1])
        denied = [s for s, _ in stack.sink.steps if s.tool == "pay"][-1]
        assert denied.verdict is Verdict.DENY
        evidence = json.loads(json.loads(denied.chio_receipt)["evidence"][-1]["details"])
        assert (evidence["approver"], evidence["approval_reason"]) == ("local", "over the limit")


async def test_a_local_activity_waits_for_its_approval_too(
    temporal_client: Client, temporal_address: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    workflow_id = unique("local")
    async with _stack(
        tmp_path / "sidecar", temporal_client, temporal_address, unique("q"), signal=True
    ) as stack:
        handle = await _start(stack, workflow_id, Payments(amounts=["7"], local=True))
        async with httpx.AsyncClient(base_url=stack.url) as http:
            pending = await _pending(http, workflow_id, set())
            answer = await http.post(
                f"/approvals/{pending['approval_id']}/respond", json={"outcome": "approved"}
            )
            assert answer.status_code == 200
        assert await handle.result() == ["found invoice", "paid 7"]
        assert PAID[workflow_id] == ["7"]
        held = [s for s, _ in stack.sink.steps if s.tool == "pay"]
        assert [(s.verdict, s.attempt, s.is_local) for s in held] == [
            (Verdict.PENDING_APPROVAL, 1, True),
            (Verdict.ALLOW, 1, True),
        ]


async def test_the_cli_answers_through_the_sidecar_and_signals_the_workflow(
    temporal_client: Client, temporal_address: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """``chio-receipts approve`` against a sidecar that does not signal: the CLI's signal is the
    one that resumes the run; ``reject`` via the same code path ends the next payment."""
    workflow_id = unique("cli")
    async with _stack(
        tmp_path / "sidecar", temporal_client, temporal_address, unique("q"), signal=False
    ) as stack:
        handle = await _start(stack, workflow_id, Payments(amounts=["5", "6"]))
        seen: set[str] = set()
        async with httpx.AsyncClient(base_url=stack.url) as http:
            first = await _pending(http, workflow_id, seen)
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "chio-receipts"),
                "approve",
                workflow_id,
                "--receipt",
                first["request_receipt_id"],
                "--reason",
                "looks right",
                "--sidecar-url",
                stack.url,
                "--temporal-address",
                temporal_address,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, errors = await proc.communicate()
            assert proc.returncode == 0, errors.decode()
            assert f"approved {first['approval_id']}" in out.decode()
            assert "by local" in out.decode()
            second = await _pending(http, workflow_id, seen)
            done = await answer_approval(
                sidecar_url=stack.url,
                credential=None,
                workflow_id=workflow_id,
                receipt_id=second["request_chio_id"],
                approve=False,
                reason="twice is too many",
                temporal_client=temporal_client,
            )
            assert (done.outcome, done.approver, done.signalled) == ("denied", "local", True)
            assert not done.signalled_by_sidecar
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
        assert isinstance(failed.value.cause, ApplicationError)
        assert failed.value.cause.type == DENIED_ERROR_TYPE
        assert PAID[workflow_id] == ["5"]
