"""Steps that carry a Chio kernel receipt, signed here as a kernel would sign them."""

from __future__ import annotations

import dataclasses
from typing import Any

from chio_receipts import schemas


def kernel_receipt_body(step: schemas.StepReceipt, *, parameters: Any = None) -> dict[str, Any]:
    """The unsigned mediated-decision body a sidecar signs for ``step``, bound to its context."""
    allowed = step.verdict is schemas.Verdict.ALLOW
    decision: dict[str, Any] = (
        {"verdict": "allow"}
        if allowed
        else {"verdict": "deny", "reason": step.reason, "guard": "capability"}
    )
    return {
        "timestamp": step.evaluated_at // 1_000_000,
        "capability_id": step.capability_id,
        "tool_server": step.tool_server,
        "tool_name": step.tool,
        "action": {"parameters": {} if parameters is None else parameters},
        "decision": decision,
        "receipt_kind": "mediated_decision",
        "boundary_class": "prevent",
        "tool_origin": "caller_executed",
        "redaction_mode": "none",
        "content_hash": schemas.content_hash(),
        "policy_hash": "0" * 64,
        "metadata": {"receipt_context": {"request_id": schemas.request_id_for(step)}},
        "trust_level": "mediated",
    }


def with_chio_receipt(
    step: schemas.StepReceipt,
    key: schemas.KeyPair,
    *,
    parameters: Any = None,
    body: dict[str, Any] | None = None,
) -> schemas.StepReceipt:
    """``step`` carrying a Chio receipt signed by ``key`` (its Avro signature left as it is)."""
    receipt = schemas.sign_kernel_receipt(
        body if body is not None else kernel_receipt_body(step, parameters=parameters), key
    )
    text, signed = schemas.chio_step_payload(receipt)
    return dataclasses.replace(step, chio_receipt=text, chio_signed=signed)
