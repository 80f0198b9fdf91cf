"""Signed test receipts and completion events (no services)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from chio_receipts.schemas import (
    CompletionSource,
    KeyPair,
    Outcome,
    RunCompletion,
    StepReceipt,
    Verdict,
    encode,
    frame,
    receipt_hash,
    sign_receipt,
)

STEP = "dev.chio.receipts.v1.StepReceipt"
RUN = "dev.chio.receipts.v1.RunCompletion"


def uuid7() -> str:
    """A time-ordered UUIDv7 string."""
    ms = time.time_ns() // 1_000_000
    rand = uuid.uuid4().int & ((1 << 74) - 1)
    value = (
        (ms << 80) | (0x7 << 76) | ((rand >> 62) << 64) | (0b10 << 62) | (rand & ((1 << 62) - 1))
    )
    return str(uuid.UUID(int=value))


def receipt(
    workflow_id: str,
    run_id: str,
    i: int,
    *,
    verdict: Verdict = Verdict.ALLOW,
    namespace: str = "default",
    prev_hash: bytes = b"",
    **overrides: Any,
) -> StepReceipt:
    """An unsigned receipt for activity ``i`` of a run."""
    now = time.time_ns() // 1000
    fields: dict[str, Any] = {
        "receipt_id": uuid7(),
        "namespace": namespace,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "workflow_type": "OrderWorkflow",
        "task_queue": "orders",
        "activity_id": str(i),
        "activity_type": f"step_{i % 3}",
        "attempt": 1,
        "is_local": False,
        "tool_server": "agent-tools",
        "tool": f"tool_{i % 3}",
        "action": "invoke",
        "resource": f"agent-tools/tool_{i % 3}",
        "subject": "agent:test",
        "capability_id": "cap-1",
        "capability_chain": ("cap-root",),
        "scope": ("tool_0", "tool_1", "tool_2"),
        "verdict": verdict,
        "reason": "allowed by scope" if verdict is Verdict.ALLOW else "tool not in scope",
        "argument_digest": "ab" * 32,
        "argument_key_id": "hmac-1",
        "scheduled_at": now - 300,
        "started_at": now - 200,
        "evaluated_at": now - 100,
        "latency_us": 100 + i,
        "worker_identity": "worker-1@host",
        "prev_hash": prev_hash,
    }
    fields.update(overrides)
    return StepReceipt(**fields)


def signed_run(
    key: KeyPair, workflow_id: str, run_id: str, n: int, *, deny: tuple[int, ...] = ()
) -> list[tuple[StepReceipt, bytes]]:
    """``n`` signed, chained receipts of one run: (receipt, framed wire value)."""
    out: list[tuple[StepReceipt, bytes]] = []
    prev = b""
    for i in range(n):
        verdict = Verdict.DENY if i in deny else Verdict.ALLOW
        signed, body = sign_receipt(
            receipt(workflow_id, run_id, i, verdict=verdict, prev_hash=prev), key
        )
        prev = receipt_hash(body)
        out.append((signed, frame(STEP, body)))
    return out


def completion(
    workflow_id: str,
    run_id: str,
    *,
    expected: int | None,
    outcome: Outcome = Outcome.SUCCESS,
    namespace: str = "default",
) -> RunCompletion:
    """A completion event from the watcher."""
    now = time.time_ns() // 1000
    return RunCompletion(
        event_id=str(uuid.uuid4()),
        namespace=namespace,
        workflow_id=workflow_id,
        run_id=run_id,
        workflow_type="OrderWorkflow",
        task_queue="orders",
        outcome=outcome,
        started_at=now - 10_000,
        closed_at=now,
        expected_steps=expected,
        source=CompletionSource.WATCHER,
        emitted_at=now,
    )


def completion_value(event: RunCompletion) -> bytes:
    """The framed Avro value of a completion event."""
    return encode(RUN, event.to_avro())
