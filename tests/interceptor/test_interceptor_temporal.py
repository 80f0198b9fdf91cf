"""The interceptor on the real Temporal dev server, over both sidecars (in-process and HTTP)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Worker

from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    ENVELOPE_KEYS,
    ArgumentKey,
    ChioActivityInterceptor,
    ChioClient,
    ChioTemporalConfigError,
    InMemoryReceiptSink,
    WorkflowGrant,
    build_chio_worker,
    scope_for,
    verify_receipt,
)
from chio_receipts.schemas import Verdict, check_chio_step, parameter_hash, receipt_hash
from chio_receipts.sidecar import LocalSidecar, SidecarServer
from tests.support.helpers import eventually
from tests.support.workflows import (
    ALL_ACTIVITIES,
    EXECUTED,
    Plan,
    PlanWorkflow,
    Transfer,
    TransferWorkflow,
)

pytestmark = pytest.mark.integration

EXEC_TIMEOUT = timedelta(seconds=60)


@dataclass
class SidecarEnv:
    kind: str
    local: LocalSidecar
    chio: ChioClient
    server: SidecarServer | None


@pytest.fixture(params=["local", "http"])
async def sidecar(request: pytest.FixtureRequest) -> AsyncIterator[SidecarEnv]:
    """The matrix: decisions in process, or from the sidecar served on a real port."""
    local = LocalSidecar()
    if request.param == "local":
        yield SidecarEnv("local", local, ChioClient(local), None)
        return
    server = SidecarServer(local)
    await server.start()
    chio = ChioClient(server.url, timeout=2.0, retries=1, retry_wait=0.02)
    try:
        yield SidecarEnv("http", local, chio, server)
    finally:
        await chio.aclose()
        await server.stop()


def _worker(client: Client, task_queue: str, icp: ChioActivityInterceptor, **kw: object) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[PlanWorkflow, TransferWorkflow],
        activities=ALL_ACTIVITIES,
        interceptors=[icp],
        **kw,  # type: ignore[arg-type]
    )


def _cause(exc: BaseException) -> BaseException:
    """The innermost cause of a workflow failure."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


async def test_allow_path_receipts_envelope_and_history(
    temporal_client: Client, unique: Callable[[str], str], sidecar: SidecarEnv
) -> None:
    tq, wf_id = unique("tq"), unique("wf")
    sink = InMemoryReceiptSink()
    worker, icp, grant = await build_chio_worker(
        temporal_client,
        task_queue=tq,
        activities=ALL_ACTIVITIES,
        workflows=[PlanWorkflow],
        chio_client=sidecar.chio,
        workflow_id=wf_id,
        scope=scope_for("call_tool", "read_database", "send_email"),
        subject="agent:my-pipeline",
        ttl_seconds=3600,
        default_tool_server="agent-tools",
        activity_tool_server_map={"send_email": "email-outbound"},
        receipt_sink=sink,
        interceptor_options={"argument_key": ArgumentKey.from_hex("args-1", "ab" * 32)},
    )
    secret = "secret-argument-value-123"
    async with worker:
        handle = await temporal_client.start_workflow(
            PlanWorkflow.run,
            Plan(steps=["call_tool", "read_database", "send_email"], arg=secret),
            id=wf_id,
            task_queue=tq,
            execution_timeout=EXEC_TIMEOUT,
        )
        result = await handle.result()
    run_id = handle.result_run_id
    assert result == [f"call_tool:{secret}", f"read_database:{secret}", f"send_email:{secret}"]
    steps = sink.receipts_for(wf_id, run_id)
    assert [r.activity_type for r in steps] == ["call_tool", "read_database", "send_email"]
    assert all(r.verdict is Verdict.ALLOW for r in steps)
    first = steps[0]
    assert (first.namespace, first.workflow_type) == ("default", "PlanWorkflow")
    assert first.task_queue == tq
    assert (first.attempt, first.is_local, first.capability_id) == (1, False, grant.capability_id)
    assert first.subject == "agent:my-pipeline"
    assert [r.tool_server for r in steps] == ["agent-tools", "agent-tools", "email-outbound"]
    assert first.argument_key_id == "args-1"
    assert first.scheduled_at <= first.started_at <= first.evaluated_at
    # Parameters are kept by default: each step's Chio receipt signs the activity's arguments
    # as Temporal's JSON converter wrote them, bound to the step, under the sidecar's key.
    trusted = sidecar.local.trusted_keys()
    for step in steps:
        assert check_chio_step(step, trusted_keys=trusted) is None
        chio = json.loads(step.chio_receipt)
        assert chio["action"]["parameters"] == {"args": [secret]}
        assert chio["redaction_mode"] == "none"
    # The receipts verify, chain, and a changed field fails verification.
    keys = await sidecar.chio.public_keys()
    assert all(verify_receipt(r, keys) for r in steps)
    bodies = [b for r, b in sink.steps if r.workflow_id == wf_id]
    assert [r.prev_hash for r in steps] == [b"", receipt_hash(bodies[0]), receipt_hash(bodies[1])]
    assert not verify_receipt(dataclasses.replace(first, verdict=Verdict.DENY), keys)
    assert not verify_receipt(dataclasses.replace(first, attempt=2), keys)
    # Receipt payloads never enter workflow history.
    async for event in handle.fetch_history_events():
        raw = event.SerializeToString()
        assert all(r.receipt_id.encode() not in raw for r in steps)
    # The seed's finalize + flush.
    icp.finalize_workflow(workflow_id=wf_id, run_id=run_id, outcome="success")
    envelope = await icp.flush_workflow_receipt(workflow_id=wf_id, run_id=run_id)
    assert tuple(envelope) == ENVELOPE_KEYS
    assert envelope["version"] == "chio-temporal/v1"
    assert (envelope["workflow_id"], envelope["run_id"]) == (wf_id, run_id)
    assert (envelope["step_count"], envelope["allow_count"], envelope["deny_count"]) == (3, 3, 0)
    assert envelope["outcome"] == "success"
    assert envelope["completed_at"] >= envelope["started_at"] > 0
    assert envelope["parent_workflow_ids"] == []
    assert [s["receipt_id"] for s in envelope["steps"]] == [r.receipt_id for r in steps]
    assert envelope["metadata"]["workflow_type"] == "PlanWorkflow"
    assert sink.envelopes[-1] is envelope
    assert [c.workflow_id for c in sink.completions] == [wf_id]


async def test_deny_runs_the_seed_saga_compensation(
    temporal_client: Client, unique: Callable[[str], str], sidecar: SidecarEnv
) -> None:
    tq, wf_id = unique("tq"), unique("wf")
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(
        chio_client=sidecar.chio, default_tool_server="bank", receipt_sink=sink
    )
    token = await sidecar.chio.create_capability(
        "agent:teller", scope_for("debit_account", "credit_account"), 600
    )
    grant = WorkflowGrant(workflow_id=wf_id, token=token, tool_server="bank")
    icp.register_workflow_grant(grant)
    # The compensation is also a credit_account call, so the forward credit (the run's second
    # activity) alone is denied: it presents a narrower capability that has been revoked.
    blocked = await grant.attenuate_for_activity(sidecar.chio, new_scope=["credit_account"])
    await sidecar.chio.revoke(blocked.capability_id)
    icp.register_activity_grant_override(
        "credit_account", lambda info: blocked if info.activity_id == "2" else None
    )
    async with _worker(temporal_client, tq, icp):
        handle = await temporal_client.start_workflow(
            TransferWorkflow.run,
            Transfer(source="acct-a", destination="acct-b", amount=25),
            id=wf_id,
            task_queue=tq,
            execution_timeout=EXEC_TIMEOUT,
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    denied = failure.value.cause
    assert isinstance(denied, ApplicationError)
    assert denied.type == DENIED_ERROR_TYPE
    assert denied.non_retryable
    assert isinstance(denied.__cause__, ActivityError)
    steps = sink.receipts_for(wf_id)
    assert [(r.activity_type, r.verdict) for r in steps] == [
        ("debit_account", Verdict.ALLOW),
        ("credit_account", Verdict.DENY),
        ("credit_account", Verdict.ALLOW),
    ]
    assert denied.details[0]["receipt_id"] == steps[1].receipt_id
    assert "revoked" in denied.details[0]["reason"]
    # The denied body never ran; the compensation did.
    assert EXECUTED[wf_id] == ["debit_account:acct-a:25", "credit_account:acct-a:25"]
    receipt = icp.workflow_receipt(workflow_id=wf_id, run_id=handle.result_run_id or "")
    assert (receipt.allow_count, receipt.deny_count) == (2, 1)


async def test_overrides_narrower_works_wider_is_a_config_error(
    temporal_client: Client, unique: Callable[[str], str], sidecar: SidecarEnv
) -> None:
    tq, ok_id, bad_id = unique("tq"), unique("ok"), unique("bad")
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(chio_client=sidecar.chio, receipt_sink=sink)
    token = await sidecar.chio.create_capability(
        "agent:a", scope_for("call_tool", "read_database"), 600
    )
    wide = await sidecar.chio.create_capability(
        "agent:a", scope_for("read_database", "send_email"), 600
    )
    grant = WorkflowGrant(workflow_id=ok_id, token=token)
    narrower = await grant.attenuate_for_activity(
        sidecar.chio, new_scope=scope_for("read_database"), tool_server="db-readonly"
    )
    with pytest.raises(ChioTemporalConfigError):
        await grant.attenuate_for_activity(sidecar.chio, new_scope=scope_for("send_email"))
    icp.register_workflow_grant(grant)
    icp.register_workflow_grant(WorkflowGrant(workflow_id=bad_id, token=token))
    icp.register_activity_grant_override(
        "read_database",
        lambda info: (
            narrower if info.workflow_id == ok_id else WorkflowGrant(workflow_id=bad_id, token=wide)
        ),
    )
    async with _worker(temporal_client, tq, icp):
        ok = await temporal_client.execute_workflow(
            PlanWorkflow.run,
            Plan(steps=["call_tool", "read_database"]),
            id=ok_id,
            task_queue=tq,
            execution_timeout=EXEC_TIMEOUT,
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await temporal_client.execute_workflow(
                PlanWorkflow.run,
                Plan(steps=["read_database"]),
                id=bad_id,
                task_queue=tq,
                execution_timeout=EXEC_TIMEOUT,
            )
    assert ok == ["call_tool:x", "read_database:x"]
    read = sink.receipts_for(ok_id)[1]
    assert read.capability_id == narrower.capability_id
    assert read.capability_chain == (token.id,)
    assert read.scope == ("read_database",)
    cause = _cause(failure.value)
    assert isinstance(cause, ApplicationError)
    assert cause.type == "ChioTemporalConfigError"
    bad = sink.receipts_for(bad_id)
    assert [r.verdict for r in bad] == [Verdict.DENY]
    assert "not a subset" in bad[0].reason
    assert bad_id not in EXECUTED


async def test_twenty_concurrent_workflows_keep_separate_step_lists(
    temporal_client: Client, unique: Callable[[str], str], sidecar: SidecarEnv
) -> None:
    tq = unique("tq")
    sink = InMemoryReceiptSink()
    token = await sidecar.chio.create_capability(
        "agent:a", scope_for("call_tool", "read_database", "local_tool"), 600
    )
    prefix = unique("fleet")

    def resolver(info: object) -> WorkflowGrant | None:
        wf = getattr(info, "workflow_id", "") or ""
        return WorkflowGrant(workflow_id=wf, token=token) if wf.startswith(prefix) else None

    icp = ChioActivityInterceptor(
        chio_client=sidecar.chio, receipt_sink=sink, grant_resolver=resolver
    )
    ids = [f"{prefix}-{i}" for i in range(20)]
    async with _worker(temporal_client, tq, icp, max_concurrent_activities=50):
        handles = [
            await temporal_client.start_workflow(
                PlanWorkflow.run,
                Plan(steps=["call_tool", "local:local_tool", "read_database"], arg=wf),
                id=wf,
                task_queue=tq,
                execution_timeout=EXEC_TIMEOUT,
            )
            for wf in ids
        ]
        results = await asyncio.gather(*(h.result() for h in handles))
    assert [r[0] for r in results] == [f"call_tool:{wf}" for wf in ids]
    for wf, handle in zip(ids, handles, strict=True):
        run_id = handle.result_run_id or ""
        icp.finalize_workflow(workflow_id=wf, run_id=run_id, outcome="success")
        env = await icp.flush_workflow_receipt(workflow_id=wf, run_id=run_id)
        assert env["step_count"] == 3
        assert {s["workflow_id"] for s in env["steps"]} == {wf}
        assert [s["activity_type"] for s in env["steps"]] == [
            "call_tool",
            "local_tool",
            "read_database",
        ]
        assert [s["is_local"] for s in env["steps"]] == [False, True, False]
    assert icp.open_runs == 0
    assert len(sink.envelopes) == 20


async def test_run_id_pinning_and_expired_capability(
    temporal_client: Client, unique: Callable[[str], str], sidecar: SidecarEnv
) -> None:
    tq, wf_id, exp_id = unique("tq"), unique("pinned"), unique("expired")
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(chio_client=sidecar.chio, receipt_sink=sink)
    token = await sidecar.chio.create_capability("agent:a", scope_for("call_tool"), 600)
    expired = await sidecar.chio.create_capability("agent:a", scope_for("call_tool"), 0.001)
    await eventually(expired.expired, timeout=5)
    icp.register_workflow_grant(WorkflowGrant(workflow_id=exp_id, token=expired))
    # Start before any worker polls the queue, so the grant can be pinned to the new run id.
    first = await temporal_client.start_workflow(
        PlanWorkflow.run,
        Plan(steps=["call_tool"]),
        id=wf_id,
        task_queue=tq,
        execution_timeout=EXEC_TIMEOUT,
    )
    icp.register_workflow_grant(
        WorkflowGrant(workflow_id=wf_id, token=token, run_id=first.result_run_id)
    )
    async with _worker(temporal_client, tq, icp):
        assert await first.result() == ["call_tool:x"]
        second = await temporal_client.start_workflow(
            PlanWorkflow.run,
            Plan(steps=["call_tool"]),
            id=wf_id,
            task_queue=tq,
            execution_timeout=EXEC_TIMEOUT,
        )
        with pytest.raises(WorkflowFailureError) as unpinned:
            await second.result()
        with pytest.raises(WorkflowFailureError) as too_late:
            await temporal_client.execute_workflow(
                PlanWorkflow.run,
                Plan(steps=["local:call_tool"]),
                id=exp_id,
                task_queue=tq,
                execution_timeout=EXEC_TIMEOUT,
            )
    assert second.result_run_id != first.result_run_id
    assert [r.verdict for r in sink.receipts_for(wf_id, first.result_run_id)] == [Verdict.ALLOW]
    denied = sink.receipts_for(wf_id, second.result_run_id)
    assert [r.verdict for r in denied] == [Verdict.DENY]
    assert "register_workflow_grant" in denied[0].reason
    for failure in (unpinned, too_late):
        # Denials reach workflow code unwrapped (regular and local activities alike).
        cause = failure.value.cause
        assert isinstance(cause, ApplicationError)
        assert cause.type == DENIED_ERROR_TYPE
    assert isinstance(unpinned.value.cause.__cause__, ActivityError)
    late = sink.receipts_for(exp_id)
    assert [(r.verdict, r.is_local) for r in late] == [(Verdict.DENY, True)]
    assert "expired" in late[0].reason


async def test_sidecar_down_retries_with_sidecar_error_then_succeeds(
    temporal_client: Client, unique: Callable[[str], str]
) -> None:
    """HTTP only: an in-process sidecar cannot become unreachable."""
    tq, wf_id = unique("tq"), unique("wf")
    local = LocalSidecar()
    server = SidecarServer(local)
    await server.start()
    sink = InMemoryReceiptSink()
    async with ChioClient(server.url, timeout=1.0, retries=0) as chio:
        icp = ChioActivityInterceptor(chio_client=chio, receipt_sink=sink)
        token = await chio.create_capability("agent:a", scope_for("call_tool"), 600)
        icp.register_workflow_grant(WorkflowGrant(workflow_id=wf_id, token=token))
        await server.stop()
        try:
            async with _worker(temporal_client, tq, icp):
                handle = await temporal_client.start_workflow(
                    PlanWorkflow.run,
                    Plan(steps=["call_tool"]),
                    id=wf_id,
                    task_queue=tq,
                    execution_timeout=EXEC_TIMEOUT,
                )
                await eventually(lambda: icp.stats.sidecar_errors >= 2, timeout=20)
                assert sink.receipts_for(wf_id) == []
                assert wf_id not in EXECUTED
                await server.start()
                assert await handle.result() == ["call_tool:x"]
        finally:
            await server.stop()
    (receipt,) = sink.receipts_for(wf_id)
    assert receipt.verdict is Verdict.ALLOW
    assert receipt.attempt >= 3
    assert EXECUTED[wf_id] == ["call_tool:x"]


async def test_redacted_parameters_leave_only_their_hash(
    temporal_client: Client, unique: Callable[[str], str], sidecar: SidecarEnv
) -> None:
    tq, wf_id = unique("tq"), unique("wf")
    sink = InMemoryReceiptSink()
    worker, _, _ = await build_chio_worker(
        temporal_client,
        task_queue=tq,
        activities=ALL_ACTIVITIES,
        workflows=[PlanWorkflow],
        chio_client=sidecar.chio,
        workflow_id=wf_id,
        scope=scope_for("call_tool"),
        subject="agent:redacted",
        ttl_seconds=3600,
        receipt_sink=sink,
        interceptor_options={"redact_parameters": True},
    )
    secret = "redacted-argument-value-456"
    async with worker:
        handle = await temporal_client.start_workflow(
            PlanWorkflow.run,
            Plan(steps=["call_tool"], arg=secret),
            id=wf_id,
            task_queue=tq,
            execution_timeout=EXEC_TIMEOUT,
        )
        assert await handle.result() == [f"call_tool:{secret}"]
    (step,) = sink.receipts_for(wf_id, handle.result_run_id)
    assert check_chio_step(step, trusted_keys=sidecar.local.trusted_keys()) is None
    chio = json.loads(step.chio_receipt)
    assert chio["redaction_mode"] == "redacted"
    assert chio["action"]["parameters"] == {}
    assert chio["action"]["parameter_hash"] == parameter_hash({"args": [secret]})
    assert all(secret.encode() not in body for _, body in sink.steps)
