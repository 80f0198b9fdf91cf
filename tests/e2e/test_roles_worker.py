"""Access roles on the real stack: a Temporal worker whose interceptor calls the served sidecar
with a worker credential (given by environment, as ``chio-receipts worker`` does), grants minted
by an operator, and a worker credential that may evaluate but never mint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client
from temporalio.worker import Worker

from chio_receipts.interceptor import (
    ChioActivityInterceptor,
    ChioClient,
    ChioSidecarRejected,
    InMemoryReceiptSink,
    WorkflowGrant,
)
from chio_receipts.schemas import Verdict
from chio_receipts.sidecar import (
    CredentialSet,
    DataDir,
    LocalSidecar,
    Role,
    SidecarServer,
    add_credential,
)
from tests.support.workflows import ALL_ACTIVITIES, Plan, PlanWorkflow

pytestmark = pytest.mark.integration


async def test_a_worker_credential_evaluates_on_temporal_and_cannot_mint(
    temporal_client: Client,
    unique: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    creds = tmp_path / "credentials.json"
    worker_secret = add_credential(creds, "worker-eu-1", Role.WORKER)
    operator_secret = add_credential(creds, "alice", Role.OPERATOR)
    tq, wf_id = unique("tq"), unique("wf")
    with DataDir(tmp_path / "side") as directory:
        side = LocalSidecar(directory.signing_key(), store=directory.store)
        server = SidecarServer(side, credentials=CredentialSet(path=creds), data_dir=directory)
        async with server:
            # The operator mints the run's grant.
            async with ChioClient(server.url, token=operator_secret) as operator:
                token = await operator.create_capability(
                    "agent:eu", ["read_database", "call_tool"], 3600
                )
            # The worker process: its secret comes from CHIO_SIDECAR_TOKEN, never a flag value
            # in a log. It may read its grant and evaluate, not mint.
            monkeypatch.setenv("CHIO_SIDECAR_TOKEN", worker_secret)
            async with ChioClient(server.url, retries=0) as worker_client:
                with pytest.raises(ChioSidecarRejected) as refused:
                    await worker_client.create_capability("agent:eu", ["*"], 60)
                assert refused.value.status == 403
                assert (await worker_client.get_capability(token.id)).id == token.id
                sink = InMemoryReceiptSink()
                icp = ChioActivityInterceptor(
                    chio_client=worker_client, default_tool_server="agent-tools", receipt_sink=sink
                )
                icp.register_workflow_grant(WorkflowGrant(workflow_id=wf_id, token=token))
                worker = Worker(
                    temporal_client,
                    task_queue=tq,
                    workflows=[PlanWorkflow],
                    activities=ALL_ACTIVITIES,
                    interceptors=[icp],
                )
                async with worker:
                    handle = await temporal_client.start_workflow(
                        PlanWorkflow.run,
                        Plan(steps=["read_database", "call_tool"], arg="x"),
                        id=wf_id,
                        task_queue=tq,
                        execution_timeout=timedelta(seconds=60),
                    )
                    result = await handle.result()
                await icp.aclose()
            assert result == ["read_database:x", "call_tool:x"]
            steps = sink.receipts_for(wf_id, handle.result_run_id)
            assert [s.verdict for s in steps] == [Verdict.ALLOW, Verdict.ALLOW]
            assert {s.key_id for s in steps} == {side.key_id}
            async with httpx.AsyncClient(base_url=server.url) as http:
                text = (await http.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    allowed = (
        "chio_sidecar_decisions_total",
        (("family", "project"), ("guard", "none"), ("verdict", "allow")),
    )
    assert samples[allowed] == 2
    assert samples[("chio_sidecar_auth_failures_total", (("status", "403"),))] == 1
    assert samples[("chio_sidecar_auth_failures_total", (("status", "401"),))] == 0
    assert caplog.records  # the capture is live: the sidecar and the clients did log
    for record in caplog.records:
        assert worker_secret not in record.getMessage()
        assert operator_secret not in record.getMessage()
