"""The seed's snippets, as written, on the real Temporal dev server and a served sidecar.

The imports are the seed's (``chio_sdk``'s client and token, ``chio_temporal``'s surface); the
client is ``chio_sdk.ChioClient`` talking HTTP to this project's sidecar served on a loopback
port with a durable data directory; workflows run on the session's Temporal dev server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from chio_sdk import ChioClient
from chio_sdk.models import CapabilityToken
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from chio_receipts.interceptor import InMemoryReceiptSink
from chio_receipts.schemas import Verdict, check_chio_step, now_us, verify_capability_token
from chio_receipts.sidecar import DataDir, LocalSidecar, SidecarServer
from chio_temporal import (
    DENIED_ERROR_TYPE,
    ChioActivityInterceptor,
    WorkflowGrant,
    build_chio_worker,
    scope_for,
)
from tests.support.seed_workflows import AgentWorkflow, TransferWorkflow
from tests.support.workflows import (
    EXECUTED,
    Transfer,
    call_tool,
    credit_account,
    debit_account,
    read_database,
    send_email,
)

pytestmark = pytest.mark.e2e

EXEC_TIMEOUT = timedelta(seconds=60)
# The seed: "envelope has: workflow_id, run_id, parent_workflow_ids, started_at, completed_at,
# outcome, step_count, allow_count, deny_count, steps, metadata" and envelope["version"].
SEED_ENVELOPE_KEYS = {
    "version",
    "workflow_id",
    "run_id",
    "parent_workflow_ids",
    "started_at",
    "completed_at",
    "outcome",
    "step_count",
    "allow_count",
    "deny_count",
    "steps",
    "metadata",
}


@contextlib.asynccontextmanager
async def _served_sidecar(data_dir: Path) -> AsyncIterator[str]:
    """The project's sidecar on a loopback port (no control token: loopback peers only)."""
    with DataDir(data_dir) as directory:
        side = LocalSidecar(directory.signing_key(), store=directory.store)
        async with SidecarServer(side) as server:
            yield server.url


@pytest.fixture
async def sidecar_url(tmp_path: Path) -> AsyncIterator[str]:
    async with _served_sidecar(tmp_path / "sidecar") as url:
        yield url


async def test_the_interceptor_snippet_with_attenuation_finalize_and_flush(
    temporal_client: Client, unique: Callable[[str], str], sidecar_url: str
) -> None:
    client = temporal_client
    workflow_id, task_queue = unique("agent-run"), unique("agent-tasks")
    my_receipt_sink = InMemoryReceiptSink()

    chio = ChioClient(sidecar_url)
    interceptor = ChioActivityInterceptor(
        chio_client=chio,
        sidecar_url=sidecar_url,
        # Fallback tool_server id when an activity has no explicit mapping.
        default_tool_server="agent-tools",
        activity_tool_server_map={
            "call_tool": "agent-tools",
            "read_database": "db-readonly",
            "send_email": "email-outbound",
        },
        receipt_sink=my_receipt_sink,
    )
    try:
        token: CapabilityToken = await chio.create_capability(
            subject="agent:my-pipeline",
            scope=scope_for("call_tool", "read_database", "send_email"),
            ttl_seconds=3600,
        )
        assert isinstance(token, CapabilityToken)
        grant = WorkflowGrant(
            workflow_id=workflow_id,
            token=token,
            tool_server="agent-tools",
        )
        interceptor.register_workflow_grant(grant)
        assert grant.raw_token is not None
        assert verify_capability_token(grant.raw_token).valid

        narrower = await grant.attenuate_for_activity(
            chio,
            new_scope=scope_for("read_database"),
            tool_server="db-readonly",
        )
        interceptor.register_activity_grant_override(
            "read_database",
            lambda info: narrower,
        )
        assert narrower.scope == ("read_database",)
        assert narrower.capability_id != grant.capability_id

        worker = Worker(
            client,
            task_queue=task_queue,
            workflows=[AgentWorkflow],
            activities=[call_tool, read_database, send_email],
            interceptors=[interceptor],
        )
        async with worker:
            handle = await client.start_workflow(
                AgentWorkflow.run,
                "q-1",
                id=workflow_id,
                task_queue=task_queue,
                execution_timeout=EXEC_TIMEOUT,
            )
            result = await handle.result()
        run_id = handle.result_run_id
        assert run_id
        assert result == ["call_tool:q-1", "read_database:q-1", "send_email:q-1"]

        steps = my_receipt_sink.receipts_for(workflow_id, run_id)
        assert [(r.activity_type, r.tool_server, r.verdict) for r in steps] == [
            ("call_tool", "agent-tools", Verdict.ALLOW),
            ("read_database", "db-readonly", Verdict.ALLOW),
            ("send_email", "email-outbound", Verdict.ALLOW),
        ]
        # read_database ran under the attenuated child, the others under the workflow grant.
        assert [r.capability_id for r in steps] == [
            token.id,
            narrower.capability_id,
            token.id,
        ]
        assert steps[1].capability_chain == (token.id,)
        # The subject a kernel token names is the key derived from the requested subject.
        assert all(r.subject == token.subject for r in steps)
        # Decided on the kernel's mediated route: each step carries the sidecar's signed Chio
        # receipt, bound to its Temporal context, and no Avro signature of its own.
        keys = await interceptor.evaluator.public_keys()
        trusted = {k.hex() for k in keys.values()}
        assert all(r.key_id == "" and r.chio_receipt for r in steps)
        assert [check_chio_step(r, trusted_keys=trusted) for r in steps] == [None] * 3

        # At workflow completion (typically from a "finalise" activity).
        interceptor.finalize_workflow(
            workflow_id=workflow_id,
            run_id=run_id,
            outcome="success",
        )
        envelope = await interceptor.flush_workflow_receipt(
            workflow_id=workflow_id,
            run_id=run_id,
        )
        assert envelope["version"] == "chio-temporal/v1"
        assert set(envelope) == SEED_ENVELOPE_KEYS
        assert (envelope["workflow_id"], envelope["run_id"]) == (workflow_id, run_id)
        assert (envelope["step_count"], envelope["allow_count"], envelope["deny_count"]) == (
            3,
            3,
            0,
        )
        assert envelope["outcome"] == "success"
        assert envelope["parent_workflow_ids"] == []
        assert envelope["completed_at"] >= envelope["started_at"] > 0
        assert [s["receipt_id"] for s in envelope["steps"]] == [r.receipt_id for r in steps]
        assert my_receipt_sink.envelopes[-1] is envelope
    finally:
        await interceptor.aclose()
        await chio.close()


async def test_build_chio_worker_with_a_capability_id_and_with_a_scope(
    temporal_client: Client, unique: Callable[[str], str], sidecar_url: str
) -> None:
    client = temporal_client
    chio = ChioClient(sidecar_url)
    try:
        # Either supply a pre-minted capability id...
        minted = await chio.create_capability(
            subject="agent:my-pipeline",
            scope=scope_for("call_tool", "read_database", "send_email"),
            ttl_seconds=3600,
        )
        by_id_wf, by_id_tq = unique("agent-run"), unique("agent-tasks")
        worker, interceptor, grant = await build_chio_worker(
            client,
            task_queue=by_id_tq,
            activities=[call_tool, read_database, send_email],
            workflows=[AgentWorkflow],
            chio_client=chio,
            workflow_id=by_id_wf,
            capability_id=minted.id,
            ttl_seconds=3600,
            default_tool_server="agent-tools",
            activity_tool_server_map={"send_email": "email-outbound"},
        )
        sink = InMemoryReceiptSink()
        interceptor.receipt_sink = sink
        assert grant.capability_id == minted.id
        assert grant.scope == ("call_tool", "read_database", "send_email")
        assert grant.workflow_id == by_id_wf
        run = asyncio.create_task(worker.run())
        try:
            result = await client.execute_workflow(
                AgentWorkflow.run,
                "by-id",
                id=by_id_wf,
                task_queue=by_id_tq,
                execution_timeout=EXEC_TIMEOUT,
            )
        finally:
            await worker.shutdown()
            await run
        assert result == ["call_tool:by-id", "read_database:by-id", "send_email:by-id"]
        steps = sink.receipts_for(by_id_wf)
        assert [(r.tool_server, r.verdict, r.capability_id) for r in steps] == [
            ("agent-tools", Verdict.ALLOW, minted.id),
            ("agent-tools", Verdict.ALLOW, minted.id),
            ("email-outbound", Verdict.ALLOW, minted.id),
        ]
        await interceptor.aclose()

        # ...or a scope + subject, and the builder mints one.
        by_scope_wf, by_scope_tq = unique("agent-run"), unique("agent-tasks")
        worker, interceptor, grant = await build_chio_worker(
            client,
            task_queue=by_scope_tq,
            activities=[call_tool, read_database, send_email],
            workflows=[AgentWorkflow],
            chio_client=chio,
            workflow_id=by_scope_wf,
            scope=scope_for("call_tool", "read_database"),
            subject="agent:my-pipeline",
            ttl_seconds=3600,
            default_tool_server="agent-tools",
            activity_tool_server_map={"send_email": "email-outbound"},
        )
        sink = InMemoryReceiptSink()
        interceptor.receipt_sink = sink
        assert isinstance(grant.token, CapabilityToken)
        assert grant.capability_id != minted.id
        assert grant.scope == ("call_tool", "read_database")
        assert grant.raw_token is not None
        assert verify_capability_token(grant.raw_token).valid
        async with worker:
            with pytest.raises(WorkflowFailureError) as failure:
                await client.execute_workflow(
                    AgentWorkflow.run,
                    "by-scope",
                    id=by_scope_wf,
                    task_queue=by_scope_tq,
                    execution_timeout=EXEC_TIMEOUT,
                )
        # send_email is outside the minted scope: denied, non-retryable, after two allows.
        denied = failure.value.cause
        assert isinstance(denied, ApplicationError)
        assert denied.type == DENIED_ERROR_TYPE
        assert denied.non_retryable
        steps = sink.receipts_for(by_scope_wf)
        assert [(r.activity_type, r.verdict) for r in steps] == [
            ("call_tool", Verdict.ALLOW),
            ("read_database", Verdict.ALLOW),
            ("send_email", Verdict.DENY),
        ]
        assert all(r.capability_id == grant.capability_id for r in steps)
        assert EXECUTED[by_scope_wf] == ["call_tool:by-scope", "read_database:by-scope"]
        await interceptor.aclose()
    finally:
        await chio.close()


async def test_a_deny_runs_the_seed_saga(
    temporal_client: Client, unique: Callable[[str], str], sidecar_url: str
) -> None:
    client = temporal_client
    workflow_id, task_queue = unique("transfer"), unique("bank")
    sink = InMemoryReceiptSink()
    chio = ChioClient(sidecar_url)
    interceptor = ChioActivityInterceptor(
        chio_client=chio, sidecar_url=sidecar_url, default_tool_server="bank", receipt_sink=sink
    )
    try:
        token = await chio.create_capability(
            subject="agent:teller",
            scope=scope_for("debit_account", "credit_account"),
            ttl_seconds=3600,
        )
        grant = WorkflowGrant(workflow_id=workflow_id, token=token, tool_server="bank")
        interceptor.register_workflow_grant(grant)
        # The compensation is also a credit_account call, so only the forward credit (the run's
        # second activity) is denied: it runs under a capability that has expired.
        short = await chio.create_capability(
            subject="agent:teller", scope=scope_for("credit_account"), ttl_seconds=1
        )
        blocked = WorkflowGrant(workflow_id=workflow_id, token=short, tool_server="bank")
        interceptor.register_activity_grant_override(
            "credit_account", lambda info: blocked if info.activity_id == "2" else None
        )
        # The token counts whole seconds (the sidecar's own record is to the microsecond and
        # ends within a second after it): wait until the second after its expiry has passed.
        while not blocked.expired(now_us() - 1_000_000):
            await asyncio.sleep(0.05)
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=[TransferWorkflow],
            activities=[debit_account, credit_account],
            interceptors=[interceptor],
        ):
            handle = await client.start_workflow(
                TransferWorkflow.run,
                Transfer(source="acct-a", destination="acct-b", amount=25),
                id=workflow_id,
                task_queue=task_queue,
                execution_timeout=EXEC_TIMEOUT,
            )
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
        denied = failure.value.cause
        assert isinstance(denied, ApplicationError)
        assert denied.type == DENIED_ERROR_TYPE == "ChioCapabilityDenied"
        assert denied.non_retryable
        assert "expired" in denied.details[0]["reason"]
        # The saga ran its compensation (credit back to the source); the forward credit never ran.
        assert EXECUTED[workflow_id] == ["debit_account:acct-a:25", "credit_account:acct-a:25"]
        run_id = handle.result_run_id
        assert run_id
        steps = sink.receipts_for(workflow_id, run_id)
        assert [(r.activity_type, r.verdict, r.capability_id) for r in steps] == [
            ("debit_account", Verdict.ALLOW, token.id),
            ("credit_account", Verdict.DENY, short.id),
            ("credit_account", Verdict.ALLOW, token.id),
        ]
        interceptor.finalize_workflow(workflow_id=workflow_id, run_id=run_id, outcome="failure")
        envelope = await interceptor.flush_workflow_receipt(workflow_id=workflow_id, run_id=run_id)
        assert envelope["version"] == "chio-temporal/v1"
        assert set(envelope) == SEED_ENVELOPE_KEYS
        assert envelope["outcome"] == "failure"
        assert (envelope["step_count"], envelope["allow_count"], envelope["deny_count"]) == (
            3,
            2,
            1,
        )
    finally:
        await interceptor.aclose()
        await chio.close()
