"""One scenario for ChioKernelSidecar, run against our sidecar's kernel routes and the kernel."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from chio_receipts import schemas
from chio_receipts.interceptor import (
    DENIED_ERROR_TYPE,
    ChioActivityInterceptor,
    ChioKernelSidecar,
    ChioSidecarRejected,
    EvaluationRequest,
    InMemoryReceiptSink,
    UnknownCapability,
    WorkflowGrant,
)

PARAMS = {"args": [{"amount": 12.5, "note": "café ☕"}, 2**53 - 1]}


def request(cap_id: str, tool: str, **kw: Any) -> EvaluationRequest:
    fields: dict[str, Any] = {
        "namespace": "default",
        "workflow_id": "wf-k",
        "run_id": "run-k",
        "workflow_type": "Pay",
        "task_queue": "q",
        "activity_id": "1",
        "activity_type": tool,
        "argument_digest": "a" * 64,
        "argument_key_id": "args-1",
        "started_at": schemas.now_us(),
        "worker_identity": "w@test",
        "parameters": PARAMS,
        **kw,
    }
    return EvaluationRequest(capability_id=cap_id, tool_server="temporal", tool=tool, **fields)


def _checked(signed: schemas.SignedReceipt, req: EvaluationRequest, trusted: str) -> dict[str, Any]:
    step = signed.receipt
    assert req.matches(step)
    assert (step.key_id, step.signature) == ("", b"")
    assert signed.body == schemas.step_body(step)
    assert schemas.check_chio_step(step, trusted_keys={trusted}) is None
    other = "00" * 32
    assert schemas.check_chio_step(step, trusted_keys={other}) is not None
    receipt: dict[str, Any] = json.loads(step.chio_receipt)
    assert schemas.verify_kernel_receipt(receipt, trusted_keys=[trusted]).valid
    assert receipt["action"]["parameters"] == req.parameters
    return receipt


async def exercise(evaluator: ChioKernelSidecar, trusted: str, *, allow_verdict: str) -> None:
    """Mint, allow, deny, the gate's own deny, redaction, the interceptor, release."""
    # The kernel derives a token's id from (subject, job_uid): a fresh subject per scenario,
    # since this one releases its capability at the end.
    subject = f"agent:kernel-{uuid.uuid4().hex[:8]}"
    cap = await evaluator.create_capability(subject, ["charge_card"], 600)
    assert cap.scope == ("charge_card",)
    assert (await evaluator.get_capability(cap.id)) == cap
    assert trusted in {k.hex() for k in (await evaluator.public_keys()).values()}

    allow = request(cap.id, "charge_card")
    signed = await evaluator.evaluate(allow)
    assert signed.receipt.verdict is schemas.Verdict.ALLOW, signed.receipt.reason
    receipt = _checked(signed, allow, trusted)
    assert receipt["decision"]["verdict"] == allow_verdict
    assert receipt["capability_id"] == cap.id

    deny = request(cap.id, "refund_card", activity_id="2")
    denied = await evaluator.evaluate(deny)
    assert denied.receipt.verdict is schemas.Verdict.DENY
    assert denied.receipt.reason
    assert _checked(denied, deny, trusted)["decision"]["verdict"] == "deny"

    # The gate's own deny is not sent to the kernel: an unsigned deny without a receipt.
    gate = request("", "charge_card", deny_reason="no grant registered")
    gated = await evaluator.evaluate(gate)
    assert gated.receipt.verdict is schemas.Verdict.DENY
    assert gated.receipt.reason == "no grant registered"
    assert gated.receipt.chio_receipt == ""

    with pytest.raises(ChioSidecarRejected, match="cannot redact"):
        await evaluator.evaluate(request(cap.id, "charge_card", redact_parameters=True))
    with pytest.raises(UnknownCapability):
        await evaluator.evaluate(request("cap-unknown", "charge_card"))

    # Through the interceptor: the published step carries the kernel's receipt of the call.
    sink = InMemoryReceiptSink()
    icp = ChioActivityInterceptor(
        evaluator=evaluator, receipt_sink=sink, default_tool_server="temporal"
    )
    icp.register_workflow_grant(WorkflowGrant(workflow_id="wf-i", token=cap))
    info = dataclasses.replace(
        ActivityEnvironment.default_info(),
        workflow_id="wf-i",
        workflow_run_id="run-i",
        workflow_type="Pay",
        activity_type="charge_card",
        namespace="default",
        current_attempt_scheduled_time=datetime(2026, 1, 1, tzinfo=UTC),
    )
    await icp.before_attempt(info, [{"amount": 3}])
    ((step, _),) = sink.steps
    assert schemas.check_chio_step(step, trusted_keys={trusted}) is None
    assert json.loads(step.chio_receipt)["action"]["parameters"] == {"args": [{"amount": 3}]}

    await evaluator.revoke(cap.id)
    after = await evaluator.evaluate(request(cap.id, "charge_card", activity_id="3"))
    assert after.receipt.verdict is schemas.Verdict.DENY
    assert "revoked" in after.receipt.reason
    if after.receipt.chio_receipt:
        assert schemas.check_chio_step(after.receipt, trusted_keys={trusted}) is None
    with pytest.raises(ApplicationError) as caught:
        await icp.before_attempt(dataclasses.replace(info, attempt=2), [{"amount": 3}])
    assert caught.value.type == DENIED_ERROR_TYPE
