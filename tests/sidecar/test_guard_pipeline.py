"""Unit tests of the guard seam: guards run after scope, decide in order, leave evidence."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from chio_receipts.schemas import EvaluationRequest, Verdict, verify_kernel_receipt
from chio_receipts.sidecar import LocalSidecar
from chio_receipts.sidecar._guards import CallContext, GuardResult, GuardVerdict

pytestmark = pytest.mark.unit


@dataclass
class _Limit:
    """Denies a call whose first argument is over ``limit``; records what it saw."""

    limit: int
    name: str = "limit"
    seen: list[CallContext] = field(default_factory=list)

    def check(self, call: CallContext) -> GuardResult:
        self.seen.append(call)
        if call.parameters["args"][0] > self.limit:
            return GuardResult(
                guard=self.name,
                verdict=GuardVerdict.DENY,
                reason="argument 0 is over the limit",
                constraint="limit:0",
                details={"parameter": "args[0]"},
            )
        return GuardResult(guard=self.name, verdict=GuardVerdict.ALLOW)


def _request(cap_id: str, tool: str, amount: int) -> EvaluationRequest:
    return EvaluationRequest(
        capability_id=cap_id,
        tool_server="srv",
        tool=tool,
        workflow_type="Pay",
        task_queue="q",
        attempt=2,
        parameters={"args": [amount]},
    )


def _chio(signed: object) -> dict[str, object]:
    return dict(json.loads(signed.receipt.chio_receipt))  # type: ignore[attr-defined]


async def test_guards_decide_after_scope_and_leave_evidence() -> None:
    guard = _Limit(100)
    side = LocalSidecar(guards=[guard], policy_hash="ab" * 32)
    cap = await side.create_capability("agent:a", ["pay"], 60)

    ok = await side.evaluate(_request(cap.id, "pay", 5))
    assert ok.receipt.verdict is Verdict.ALLOW
    body = _chio(ok)
    assert body["policy_hash"] == "ab" * 32
    assert body["evidence"] == [
        {"guard_name": "limit", "verdict": True, "details": '{"outcome":"allow"}'}
    ]
    assert guard.seen[-1].temporal["workflow_type"] == "Pay"
    assert guard.seen[-1].temporal["attempt"] == 2

    over = await side.evaluate(_request(cap.id, "pay", 500))
    assert over.receipt.verdict is Verdict.DENY
    assert over.receipt.reason == "argument 0 is over the limit"
    body = _chio(over)
    assert body["decision"] == {
        "verdict": "deny",
        "reason": "argument 0 is over the limit",
        "guard": "limit",
    }
    (evidence,) = body["evidence"]  # type: ignore[misc]
    assert evidence["verdict"] is False
    assert json.loads(evidence["details"])["constraint"] == "limit:0"
    assert "500" not in json.dumps(body["evidence"])
    keys = [k.hex() for k in (await side.public_keys()).values()]
    assert verify_kernel_receipt(body, trusted_keys=keys).valid

    # Out of scope: the guards never run.
    seen = len(guard.seen)
    out = await side.evaluate(_request(cap.id, "refund", 500))
    assert out.receipt.verdict is Verdict.DENY
    assert len(guard.seen) == seen
    assert "evidence" not in _chio(out)


async def test_use_guards_swaps_guards_and_policy_hash_together() -> None:
    side = LocalSidecar()
    cap = await side.create_capability("agent:a", ["pay"], 60)
    before = _chio(await side.evaluate(_request(cap.id, "pay", 500)))
    side.use_guards([_Limit(100)], "cd" * 32)
    after = await side.evaluate(_request(cap.id, "pay", 500))
    assert after.receipt.verdict is Verdict.DENY
    assert _chio(after)["policy_hash"] == "cd" * 32 != before["policy_hash"]
    assert side.policy_hash == "cd" * 32
