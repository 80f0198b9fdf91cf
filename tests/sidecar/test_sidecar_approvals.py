"""Approvals in the sidecar: the held decision, the binding, one use per approval, denial,
durability, and the /approvals routes (ASGI transport; the served stack is in tests/e2e)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from chio_receipts.interceptor import ChioKernelSidecar
from chio_receipts.schemas import (
    EvaluationRequest,
    Verdict,
    check_chio_step,
    chio_verdict,
    verify_kernel_receipt,
)
from chio_receipts.sidecar import (
    LocalSidecar,
    SidecarServer,
    SidecarStore,
    _auth,
    create_sidecar_app,
)
from chio_receipts.sidecar._approvals import RequireApproval
from chio_receipts.sidecar._auth import Credential, Role
from chio_receipts.sidecar._guards import CallContext, GuardResult, GuardVerdict
from tests.support.kernel_evaluator import request as kernel_request

GUARDS = [RequireApproval(frozenset({"pay"}))]


def _request(cap_id: str, args: list[Any], *, workflow_id: str = "wf", tool: str = "pay") -> Any:
    return EvaluationRequest(
        capability_id=cap_id,
        tool_server="payments",
        tool=tool,
        namespace="default",
        workflow_id=workflow_id,
        run_id="run-1",
        workflow_type="Pay",
        task_queue="q",
        activity_id="7",
        activity_type=tool,
        attempt=1,
        is_local=False,
        argument_digest="",
        argument_key_id="",
        scheduled_at=1,
        started_at=1,
        worker_identity="w",
        prev_hash=b"",
        parameters={"args": args},
    )


def _approval_id(step: Any) -> str:
    return str(json.loads(step.chio_receipt)["metadata"]["approval"]["approval_id"])


def _answer(side: LocalSidecar, approval_id: str, approve: bool, reason: str = "") -> Any:
    return side.approvals.respond(
        approval_id, approved=approve, approver="alice", reason=reason, policy_hash=side.policy_hash
    )


@pytest.mark.unit
def test_a_held_call_is_pending_and_the_receipt_says_so() -> None:
    side = LocalSidecar(guards=GUARDS)
    cap = side.mint("agent", ["pay", "read"], 60)
    held = side.evaluate_now(_request(cap.id, ["sekrit-77"])).receipt
    assert held.verdict is Verdict.PENDING_APPROVAL
    assert "needs a person's approval" in held.reason
    receipt = json.loads(held.chio_receipt)
    assert receipt["decision"] == {
        "verdict": "deny",
        "reason": held.reason,
        "guard": "require_approval",
    }
    assert receipt["metadata"]["approval"]["state"] == "approval_required"
    assert chio_verdict(receipt) is Verdict.PENDING_APPROVAL
    assert check_chio_step(held, trusted_keys=side.trusted_keys()) is None
    # Other tools are not held; the same call asked again is the same request.
    assert (
        side.evaluate_now(_request(cap.id, ["sekrit-77"], tool="read")).receipt.verdict
        is Verdict.ALLOW
    )
    again = side.evaluate_now(_request(cap.id, ["sekrit-77"])).receipt
    assert _approval_id(again) == _approval_id(held)
    (pending,) = side.approvals.pending()
    assert pending.request_receipt_id == held.receipt_id
    assert (pending.workflow_id, pending.run_id, pending.activity_id) == ("wf", "run-1", "7")
    assert "sekrit" not in pending.to_json()  # the request keeps the hash, never the argument


@pytest.mark.unit
def test_an_approval_allows_its_own_call_once_and_nothing_else() -> None:
    side = LocalSidecar(guards=GUARDS)
    cap = side.mint("agent", ["pay"], 60)
    held = side.evaluate_now(_request(cap.id, [10])).receipt
    answered = _answer(side, _approval_id(held), True, "fine")
    assert verify_kernel_receipt(dict(answered.decision_receipt), trusted_keys=side.trusted_keys())
    # Other arguments, or another workflow: another call, another request.
    other = side.evaluate_now(_request(cap.id, [11])).receipt
    assert other.verdict is Verdict.PENDING_APPROVAL
    assert _approval_id(other) != _approval_id(held)
    elsewhere = side.evaluate_now(_request(cap.id, [10], workflow_id="wf-2")).receipt
    assert elsewhere.verdict is Verdict.PENDING_APPROVAL
    allowed = side.evaluate_now(_request(cap.id, [10])).receipt
    assert allowed.verdict is Verdict.ALLOW
    meta = json.loads(allowed.chio_receipt)["metadata"]["approval"]
    assert (meta["state"], meta["approver"]) == ("approved", "alice")
    assert meta["decision_receipt"]["id"] == answered.decision_receipt["id"]
    # Used: the next identical call asks again.
    assert side.evaluate_now(_request(cap.id, [10])).receipt.verdict is Verdict.PENDING_APPROVAL
    assert side.approvals.get(_approval_id(held)).state == "consumed"


@pytest.mark.unit
def test_a_rejection_denies_with_the_approver_and_reason() -> None:
    side = LocalSidecar(guards=GUARDS)
    cap = side.mint("agent", ["pay"], 60)
    held = side.evaluate_now(_request(cap.id, [10])).receipt
    _answer(side, _approval_id(held), False, "too much")
    denied = side.evaluate_now(_request(cap.id, [10])).receipt
    assert denied.verdict is Verdict.DENY
    assert denied.reason == f"approval {_approval_id(held)} rejected by alice: too much"
    receipt = json.loads(denied.chio_receipt)
    assert receipt["decision"]["guard"] == "approval"
    details = json.loads(receipt["evidence"][-1]["details"])
    assert (details["approver"], details["approval_reason"]) == ("alice", "too much")
    # It stays denied; answering twice is refused.
    assert side.evaluate_now(_request(cap.id, [10])).receipt.verdict is Verdict.DENY
    with pytest.raises(Exception, match="already resolved"):
        _answer(side, _approval_id(held), True)


@pytest.mark.unit
def test_a_later_guard_still_decides_after_an_approval() -> None:
    class DenyBig:
        name = "limit"

        def check(self, call: CallContext) -> GuardResult:
            big = call.parameters["args"][0] > 100
            return GuardResult(
                guard=self.name,
                verdict=GuardVerdict.DENY if big else GuardVerdict.ALLOW,
                reason="over the limit" if big else "",
            )

    side = LocalSidecar(guards=[*GUARDS, DenyBig()])
    cap = side.mint("agent", ["pay"], 60)
    held = side.evaluate_now(_request(cap.id, [500])).receipt
    _answer(side, _approval_id(held), True)
    denied = side.evaluate_now(_request(cap.id, [500])).receipt
    assert (denied.verdict, denied.reason) == (Verdict.DENY, "over the limit")
    assert side.approvals.get(_approval_id(held)).state == "approved"  # not used by a deny


@pytest.mark.unit
def test_requests_and_answers_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SidecarStore(path) as store:
        side = LocalSidecar(store=store, guards=GUARDS)
        cap = side.mint("agent", ["pay"], 60)
        held = side.evaluate_now(_request(cap.id, [10])).receipt
        key = side._key
    with SidecarStore(path) as store:
        again = LocalSidecar(key, store=store, guards=GUARDS)
        assert [a.approval_id for a in again.approvals.pending()] == [_approval_id(held)]
        _answer(again, _approval_id(held), True)
        assert again.store.verify_log().ok  # the signed answer is in the receipt log
    with SidecarStore(path) as store:
        third = LocalSidecar(key, store=store, guards=GUARDS)
        assert third.evaluate_now(_request(cap.id, [10])).receipt.verdict is Verdict.ALLOW


# Named credentials (the access-roles work) set the caller before routing. Until they are in
# the tree, a stand-in sets it; once they are, the real credentials file and middleware do.
_ROLES = hasattr(_auth, "add_credential")
_roles_api: Any = _auth


def _as(name: str, app: Any) -> Any:
    """The app behind a stand-in for the credential check (which the roles work provides):
    every request is authenticated as ``name``."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["credential"] = Credential(name, Role.OPERATOR)
        await app(scope, receive, send)

    return wrapped


@pytest.mark.unit
async def test_the_routes_take_the_approver_from_the_credential(tmp_path: Path) -> None:
    side = LocalSidecar(guards=GUARDS)
    cap = side.mint("agent", ["pay"], 60)
    held = side.evaluate_now(_request(cap.id, [10])).receipt
    approval_id = _approval_id(held)
    headers: dict[str, str] = {}
    if _ROLES:
        creds = tmp_path / "credentials.json"
        operator = _roles_api.add_credential(creds, "ops-alice", Role.OPERATOR)
        worker = _roles_api.add_credential(creds, "worker-1", Role.WORKER)
        make_app: Any = create_sidecar_app
        app = make_app(side, credentials=_roles_api.CredentialSet(path=creds))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://sidecar",
            headers={"authorization": f"Bearer {worker}"},
        ) as http:
            answer = await http.post(
                f"/approvals/{approval_id}/respond", json={"outcome": "approved"}
            )
            assert answer.status_code == 403  # a worker cannot answer
        headers = {"authorization": f"Bearer {operator}"}
    else:
        transport = httpx.ASGITransport(app=_as("ops-alice", create_sidecar_app(side)))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://sidecar", headers=headers
    ) as http:
        listed = await http.get("/approvals/pending", params={"receipt_id": held.receipt_id})
        assert listed.json()["count"] == 1
        view = listed.json()["approvals"][0]
        assert (view["approval_id"], view["tool_name"], view["state"]) == (
            approval_id,
            "pay",
            "pending",
        )
        nothing = await http.get("/approvals/pending", params={"workflow_id": "other"})
        assert nothing.json() == {"approvals": [], "count": 0}
        assert (await http.get("/approvals/pending", params={"limit": "x"})).status_code == 400
        got = (await http.get(f"/approvals/{approval_id}")).json()
        assert got["pending"]["approval_id"] == approval_id
        assert "resolution" not in got
        missing = await http.get("/approvals/ap-nope")
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")
        for body in (
            {"outcome": "approved", "approver": "mallory"},
            {"outcome": "approved", "token": {}},
            {"outcome": "maybe"},
            {},
        ):
            refused = await http.post(f"/approvals/{approval_id}/respond", json=body)
            assert refused.status_code == 400, body
        answer = await http.post(
            f"/approvals/{approval_id}/respond", json={"outcome": "approved", "reason": "ok"}
        )
        assert answer.status_code == 200
        body = answer.json()
        assert (body["approver"], body["outcome"], body["signalled"]) == (
            "ops-alice",
            "approved",
            False,
        )
        assert body["receipt"]["metadata"]["approval"]["approver"] == "ops-alice"
        assert verify_kernel_receipt(body["receipt"], trusted_keys=side.trusted_keys())
        conflict = await http.post(f"/approvals/{approval_id}/respond", json={"outcome": "denied"})
        assert (conflict.status_code, conflict.json()["error"]) == (409, "conflict")
        resolved = (await http.get(f"/approvals/{approval_id}")).json()
        assert "pending" not in resolved
        assert resolved["resolution"]["outcome"] == "approved"
        assert resolved["resolution"]["approver"] == "ops-alice"


@pytest.mark.e2e
async def test_the_kernel_mediated_route_holds_a_call_too() -> None:
    """A worker deciding on the kernel's mediated ``/v1/evaluate`` (``ChioKernelSidecar``) gets
    the held call as the kernel would sign it: a deny marked approval_required, which its step
    reads as PENDING_APPROVAL; the request is stored and answerable."""
    side = LocalSidecar(guards=GUARDS)
    async with SidecarServer(side) as server:
        evaluator = ChioKernelSidecar(
            server.url, kernel_key=side._key.public_key.hex(), tool_server="temporal"
        )
        async with evaluator:
            cap = await evaluator.create_capability("agent:k", ["pay"], 600)
            signed = await evaluator.evaluate(kernel_request(cap.id, "pay"))
        async with httpx.AsyncClient(base_url=server.url) as http:
            metrics = (await http.get("/metrics")).text
    # The held call is counted as pending, not as a deny.
    assert re.search(r'chio_sidecar_decisions_total\{[^}]*verdict="pending"[^}]*\} 1\.0', metrics)
    assert 'verdict="deny"' not in metrics
    held = signed.receipt
    assert held.verdict is Verdict.PENDING_APPROVAL
    assert check_chio_step(held, trusted_keys=side.trusted_keys()) is None
    (pending,) = side.approvals.pending(receipt_id=_approval_id(held))
    assert pending.request_chio_id == json.loads(held.chio_receipt)["id"]
