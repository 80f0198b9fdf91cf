"""Signed step receipts of one run, made without services (for the transport tests)."""

from __future__ import annotations

import time

from chio_receipts.interceptor import uuid7
from chio_receipts.schemas import KeyPair, StepReceipt, Verdict, receipt_hash, sign_receipt

__all__ = ["signed_receipts"]


def signed_receipts(
    key: KeyPair, workflow_id: str, run_id: str, n: int
) -> list[tuple[StepReceipt, bytes]]:
    """``n`` signed receipts of one run, chained by ``prev_hash``: (receipt, wire body)."""
    now = time.time_ns() // 1000
    out, prev = [], b""
    for i in range(n):
        unsigned = StepReceipt(
            receipt_id=uuid7(),
            namespace="default",
            workflow_id=workflow_id,
            run_id=run_id,
            workflow_type="SaslWorkflow",
            task_queue="sasl",
            activity_id=str(i),
            activity_type="call_tool",
            attempt=1,
            is_local=False,
            tool_server="agent-tools",
            tool="call_tool",
            action="invoke",
            resource="agent-tools/call_tool",
            subject="agent:sasl",
            capability_id="cap-1",
            capability_chain=(),
            scope=("call_tool",),
            verdict=Verdict.ALLOW,
            reason="in scope",
            argument_digest="00" * 32,
            argument_key_id="args",
            scheduled_at=now,
            started_at=now,
            evaluated_at=now + i,
            latency_us=10,
            worker_identity="sasl-worker",
            prev_hash=prev,
        )
        signed, body = sign_receipt(unsigned, key)
        prev = receipt_hash(body)
        out.append((signed, body))
    return out
