"""Budgets on a served sidecar: holds charged atomically in a file-backed store, exhausted
budgets denied with evidence, settlement at the realized cost, exactly-once refunds, and
attenuation bounded by the parent's remaining budget.

Every HTTP test talks to a real ``SidecarServer`` on a loopback port over a SQLite file.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chio_receipts.schemas import receipt_from_json, verify_kernel_receipt
from chio_receipts.sidecar import LocalSidecar, SidecarServer, SidecarStore
from chio_receipts.sidecar._auth import CredentialSet, Role, add_credential
from chio_receipts.sidecar._budgets import remaining_over
from chio_receipts.sidecar._store import BudgetAccount, BudgetCharge

USD = "USD"
# Served with a bearer token sent on every request: the kernel's control gate here, an admin
# credential where the sidecar has named credentials (reconcile needs one even on loopback).
TOKEN = "budget-tests-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _grant(tool: str, **budget: Any) -> dict[str, Any]:
    return {"server_id": "srv", "tool_name": tool, "operations": ["invoke"], **budget}


def _usd(units: int) -> dict[str, Any]:
    return {"units": units, "currency": USD}


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "sidecar.db"


@pytest.fixture
async def served(store_path: Path) -> AsyncIterator[tuple[LocalSidecar, httpx.AsyncClient]]:
    side = LocalSidecar(store=SidecarStore(store_path))
    async with (
        SidecarServer(side, token=TOKEN) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH) as client,
    ):
        yield side, client
    side.store.close()


async def _mediated(
    client: httpx.AsyncClient, token: dict[str, Any], tool: str, parameters: Any, **extra: Any
) -> dict[str, Any]:
    answer = await client.post(
        "/v1/evaluate",
        json={
            "capability": token,
            "tool_server": "srv",
            "tool_name": tool,
            "parameters": parameters,
            **extra,
        },
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _evidence(receipt: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**e, "details": json.loads(e["details"])} for e in receipt.get("evidence", [])]


# -- concurrency ---------------------------------------------------------------------------------


async def test_concurrent_charges_on_one_capability_never_overspend(store_path: Path) -> None:
    """Two sidecars serving the same store file, 120 concurrent evaluations of one capability
    over HTTP (both request shapes): exactly the budget is allowed, and the store agrees."""
    first = LocalSidecar(store=SidecarStore(store_path))
    scope = {"grants": [_grant("pay", max_invocations=25)]}
    token = first.chio_mint("agent", scope, 600)
    costly = first.chio_mint(
        "agent",
        {"grants": [_grant("pay", max_cost_per_invocation=_usd(7), max_total_cost=_usd(100))]},
        600,
    )
    second = LocalSidecar(store=SidecarStore(store_path))  # reads the capabilities back
    async with (
        SidecarServer(first, token=TOKEN) as a,
        SidecarServer(second, token=TOKEN) as b,
        httpx.AsyncClient(base_url=a.url, headers=AUTH) as ca,
        httpx.AsyncClient(base_url=b.url, headers=AUTH) as cb,
    ):

        async def one(i: int, tok: dict[str, Any]) -> bool:
            client = ca if i % 2 else cb
            if i % 3:
                body = await _mediated(client, tok, "pay", {"i": i})
                return bool(body["status"] == "authorized")
            answer = await client.post(
                "/v1/evaluate",
                json={"capability_id": tok["id"], "tool_server": "srv", "tool": "pay"},
            )
            assert answer.status_code == 200, answer.text
            return bool(answer.json()["receipt"]["verdict"] == "ALLOW")

        allowed = await asyncio.gather(*(one(i, token) for i in range(120)))
        assert sum(allowed) == 25
        # 7 units held per call against 100: 14 calls fit, the 15th would need 105.
        allowed = await asyncio.gather(*(one(i, costly) for i in range(60)))
        assert sum(allowed) == 14
    assert first.store.budget_usage(token["id"], 0) == (25, 0)
    assert second.store.budget_usage(costly["id"], 0) == (14, 98)
    assert first.store.verify_log().ok
    first.store.close()
    second.store.close()


# -- exhausted budgets ---------------------------------------------------------------------------


async def test_an_exhausted_budget_is_a_deny_naming_the_budget(
    served: tuple[LocalSidecar, httpx.AsyncClient],
) -> None:
    side, client = served
    token = side.chio_mint("agent", {"grants": [_grant("pay", max_invocations=2)]}, 600)
    first = await _mediated(client, token, "pay", {"amount": 1})
    assert first["status"] == "authorized"
    [held] = _evidence(first["receipt"])
    assert held["guard_name"] == "budget"
    assert held["verdict"] is True
    assert held["details"]["hold_id"].endswith(f":{token['id']}:0")
    # The nonce names the hold it reserved, as the kernel's reserving authorization does.
    assert first["execution_nonce"]["nonce"]["reserved_hold_id"] == held["details"]["hold_id"]
    assert (await _mediated(client, token, "pay", {"amount": 2}))["status"] == "authorized"

    denied = await _mediated(client, token, "pay", {"amount": "secret-amount-value"})
    assert denied["status"] == "deny"
    decision = denied["receipt"]["decision"]
    assert decision["guard"] == "budget"
    assert decision["reason"] == (
        f"invocation budget exhausted for capability {token['id']}: grant 0 max_invocations "
        "2 reached"
    )
    [evidence] = _evidence(denied["receipt"])
    assert evidence["guard_name"] == "budget"
    assert evidence["verdict"] is False
    assert evidence["details"]["constraint"] == "max_invocations"
    assert (evidence["details"]["limit"], evidence["details"]["used"]) == (2, 2)
    assert "secret-amount-value" not in json.dumps(denied["receipt"]["evidence"])
    assert denied["execution_nonce"] is None
    assert verify_kernel_receipt(denied["receipt"], trusted_keys=side.trusted_keys())

    # The project's route denies the same way, in its step receipt and its Chio receipt.
    answer = await client.post(
        "/v1/evaluate",
        json={"capability_id": token["id"], "tool_server": "srv", "tool": "pay"},
    )
    step = receipt_from_json(answer.json()["receipt"])
    assert step.verdict.value == "DENY"
    assert "max_invocations 2 reached" in step.reason
    chio = json.loads(step.chio_receipt)
    assert _evidence(chio)[0]["details"]["constraint"] == "max_invocations"
    # A deny charged nothing.
    assert side.store.budget_usage(token["id"], 0) == (2, 0)


async def test_a_cost_budget_holds_the_worst_case_and_names_the_constraint(
    served: tuple[LocalSidecar, httpx.AsyncClient],
) -> None:
    side, client = served
    grant = _grant("pay", max_cost_per_invocation=_usd(40), max_total_cost=_usd(100))
    token = side.chio_mint("agent", {"grants": [grant]}, 600)
    for i in range(2):
        assert (await _mediated(client, token, "pay", {"i": i}))["status"] == "authorized"
    denied = await _mediated(client, token, "pay", {"i": 3})
    assert denied["receipt"]["decision"]["reason"].endswith(
        "grant 0 max_total_cost 100 USD has 20 left, the call holds 40"
    )
    assert _evidence(denied["receipt"])[0]["details"]["constraint"] == "max_total_cost"
    # A grant without a budget adds no budget evidence and charges nothing.
    free = side.chio_mint("agent", {"grants": [_grant("read")]}, 600)
    body = await _mediated(client, free, "read", {})
    assert body["status"] == "authorized"
    assert "evidence" not in body["receipt"]
    assert side.store.budget_usage(free["id"], 0) == (0, 0)


async def test_a_reused_request_id_opens_no_second_hold(
    served: tuple[LocalSidecar, httpx.AsyncClient],
) -> None:
    side, client = served
    token = side.chio_mint("agent", {"grants": [_grant("pay", max_invocations=5)]}, 600)
    first = await _mediated(client, token, "pay", {"n": 1}, request_id="req-1")
    assert first["status"] == "authorized"
    again = await _mediated(client, token, "pay", {"n": 1}, request_id="req-1")
    assert again["status"] == "deny"
    assert again["receipt"]["decision"]["reason"] == (
        "request_id already backs a budget hold; choose a fresh request_id"
    )
    assert side.store.budget_usage(token["id"], 0) == (1, 0)


# -- settlement ----------------------------------------------------------------------------------


async def test_reconcile_settles_at_the_realized_cost_once(
    served: tuple[LocalSidecar, httpx.AsyncClient],
) -> None:
    side, client = served
    grant = _grant("pay", max_cost_per_invocation=_usd(100), max_total_cost=_usd(150))
    token = side.chio_mint("agent", {"grants": [grant]}, 600)
    held = await _mediated(client, token, "pay", {"order": 1})
    nonce = held["execution_nonce"]
    assert side.store.budget_usage(token["id"], 0) == (1, 100)
    # While the worst case is held, a second call does not fit (100 + 100 > 150).
    assert (await _mediated(client, token, "pay", {"order": 2}))["status"] == "deny"

    def settle(**body: Any) -> Any:
        return client.post(
            "/v1/reconcile",
            json={
                "execution_nonce": nonce,
                "arguments": {"order": 1},
                "realized_cost": _usd(30),
                **body,
            },
        )

    wrong = [
        ({"arguments": {"order": 2}}, "do not match the nonce parameter binding"),
        ({"realized_cost": _usd(101)}, "realized cost 101 is over the hold of 100"),
        ({"realized_cost": {"units": 30, "currency": "EUR"}}, "does not match the reserved"),
        (
            {"execution_nonce": {**nonce, "signature": "00" * 64}},
            "signature did not verify",
        ),
    ]
    for change, message in wrong:
        answer = await settle(**change)
        assert answer.status_code == 400
        assert answer.json()["error"] == "chio_reconcile_rejected"
        assert message in answer.json()["message"]
    assert side.store.budget_usage(token["id"], 0) == (1, 100)  # nothing settled

    answer = await settle()
    assert answer.status_code == 200
    receipt = answer.json()["receipt"]
    assert answer.json()["status"] == "reconciled"
    assert verify_kernel_receipt(receipt, trusted_keys=side.trusted_keys())
    terminal = receipt["metadata"]["budget_authority"]["terminal"]
    assert terminal["disposition"] == "reconciled"
    assert (terminal["exposure_units"], terminal["realized_spend_units"]) == (100, 30)
    assert terminal["committed_cost_units_after"] == 30
    assert receipt["action"]["parameter_hash"] == held["receipt"]["action"]["parameter_hash"]
    assert receipt["redaction_mode"] == "redacted"
    assert receipt["action"]["parameters"] == {}
    assert side.store.budget_usage(token["id"], 0) == (1, 30)
    # The 70 units released make room for the next call (30 + 100 <= 150).
    assert (await _mediated(client, token, "pay", {"order": 3}))["status"] == "authorized"

    again = await settle()
    assert again.status_code == 400
    assert "is settled and cannot be reconciled" in again.json()["message"]
    # The settlement's receipt is in the receipt log, which still verifies.
    assert side.store.verify_log().ok


async def test_reconcile_a_project_route_decision_by_its_receipt_id(
    served: tuple[LocalSidecar, httpx.AsyncClient],
) -> None:
    side, client = served
    token = side.chio_mint(
        "agent", {"grants": [_grant("pay", max_cost_per_invocation=_usd(50))]}, 600
    )
    answer = await client.post(
        "/v1/evaluate",
        json={"capability_id": token["id"], "tool_server": "srv", "tool": "pay"},
    )
    receipt_id = answer.json()["receipt"]["receipt_id"]
    settle = {"receipt_id": receipt_id, "realized_cost": _usd(12)}
    first = await client.post("/v1/reconcile", json=settle)
    assert first.status_code == 200, first.text
    assert side.store.budget_usage(token["id"], 0) == (1, 12)
    second = await client.post("/v1/reconcile", json=settle)
    assert second.status_code == 400
    assert "cannot be reconciled" in second.json()["message"]
    unknown = await client.post("/v1/reconcile", json={**settle, "receipt_id": "nope"})
    assert unknown.status_code == 400


# -- refunds -------------------------------------------------------------------------------------


async def test_a_refund_is_made_exactly_once_with_a_signed_receipt(
    served: tuple[LocalSidecar, httpx.AsyncClient],
) -> None:
    side, client = served
    grant = _grant("pay", max_invocations=1, max_cost_per_invocation=_usd(25))
    token = side.chio_mint("agent", {"grants": [grant]}, 600)
    answer = await client.post(
        "/v1/evaluate",
        json={
            "capability_id": token["id"],
            "tool_server": "srv",
            "tool": "pay",
            "workflow_id": "wf-1",
            "run_id": "run-1",
        },
    )
    step = receipt_from_json(answer.json()["receipt"])
    assert (await _mediated(client, token, "pay", {}))["status"] == "deny"  # 1 of 1 used
    log_rows = side.store.log_length()

    first = await client.post("/v1/budgets/reverse", json={"receipt_id": step.receipt_id})
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["status"], body["refunded"], body["refunded_units"]) == ("reversed", True, 25)
    assert body["refunded_invocations"] == 1
    refund = body["receipt"]
    assert refund["id"] == body["refund_receipt_id"]
    assert verify_kernel_receipt(refund, trusted_keys=side.trusted_keys())
    assert refund["receipt_kind"] == "trace_observation"
    reversal = refund["metadata"]["budget_reversal"]
    assert reversal["decision_receipt_id"] == step.receipt_id
    assert reversal["decision_chio_id"] == json.loads(step.chio_receipt)["id"]
    # The credential that asked: the token (its name where credentials are named).
    assert reversal["reversed_by"] in {"local", "token"}
    assert refund["metadata"]["budget_authority"]["terminal"]["disposition"] == "reversed"
    assert side.store.log_length() == log_rows + 1
    assert side.store.verify_log().ok
    assert side.store.budget_usage(token["id"], 0) == (0, 0)

    # By the Chio receipt id too, and any number of times: nothing more is refunded.
    again = await client.post(
        "/v1/budgets/reverse", json={"receipt_id": json.loads(step.chio_receipt)["id"]}
    )
    assert again.status_code == 200
    assert (again.json()["status"], again.json()["refunded"]) == ("already_reversed", False)
    assert again.json()["refund_receipt_id"] == refund["id"]
    assert again.json()["receipt"] is None
    assert side.store.log_length() == log_rows + 1
    # The refunded invocation can be used again.
    assert (await _mediated(client, token, "pay", {}))["status"] == "authorized"

    missing = await client.post("/v1/budgets/reverse", json={"receipt_id": "no-such-receipt"})
    assert (missing.status_code, missing.json()["error"]) == (404, "no_charge")
    other = await client.post(
        "/v1/budgets/reverse",
        json={"receipt_id": step.receipt_id, "workflow_id": "wf-2", "run_id": "run-9"},
    )
    assert (other.status_code, other.json()["error"]) == (403, "other_run")


async def test_a_worker_refunds_only_charges_of_the_run_it_names(tmp_path: Path) -> None:
    side = LocalSidecar()
    token = side.chio_mint("agent", {"grants": [_grant("pay", max_invocations=3)]}, 600)
    creds = tmp_path / "credentials.json"
    secret = add_credential(creds, "worker-a", Role.WORKER)
    server = SidecarServer(side, credentials=CredentialSet(path=creds))
    auth = {"authorization": f"Bearer {secret}"}
    async with server, httpx.AsyncClient(base_url=server.url, headers=auth) as client:
        answer = await client.post(
            "/v1/evaluate",
            json={
                "capability_id": token["id"],
                "tool_server": "srv",
                "tool": "pay",
                "workflow_id": "wf",
                "run_id": "r1",
            },
        )
        receipt_id = answer.json()["receipt"]["receipt_id"]
        unnamed = await client.post("/v1/budgets/reverse", json={"receipt_id": receipt_id})
        assert unnamed.status_code == 422
        other = await client.post(
            "/v1/budgets/reverse",
            json={"receipt_id": receipt_id, "workflow_id": "wf", "run_id": "r2"},
        )
        assert other.status_code == 403
        mine = await client.post(
            "/v1/budgets/reverse",
            json={"receipt_id": receipt_id, "workflow_id": "wf", "run_id": "r1"},
        )
        assert mine.status_code == 200
        assert mine.json()["refunded"] is True
        assert mine.json()["receipt"]["metadata"]["budget_reversal"]["reversed_by"] == "worker-a"
        # A worker may not settle holds: that is the tool server's.
        settle = await client.post(
            "/v1/reconcile", json={"receipt_id": receipt_id, "realized_cost": _usd(0)}
        )
        assert settle.status_code == 403


# -- attenuation ---------------------------------------------------------------------------------


async def test_attenuation_is_bounded_by_the_parents_remaining_budget(
    served: tuple[LocalSidecar, httpx.AsyncClient],
) -> None:
    side, client = served
    parent = side.chio_mint(
        "agent",
        {
            "grants": [
                _grant("pay", max_invocations=5, max_total_cost=_usd(100)),
                _grant("read"),
            ]
        },
        600,
    )
    for i in range(2):
        assert (await _mediated(client, parent, "pay", {"i": i}))["status"] == "authorized"

    def child(invocations: int, total: int) -> dict[str, Any]:
        return {"grants": [_grant("pay", max_invocations=invocations, max_total_cost=_usd(total))]}

    async def attenuate(scope: dict[str, Any]) -> httpx.Response:
        return await client.post(
            "/v1/capabilities/attenuate", json={"parent_token": parent, "new_scope": scope}
        )

    over = await attenuate(child(4, 50))  # 3 invocations left
    assert over.status_code == 409
    assert over.json() == {
        "error": "chio_budget_exceeds_parent",
        "message": "new_scope grant 0 max_invocations 4 exceeds the parent's remaining 3",
    }
    assert (await attenuate(child(3, 101))).status_code == 409  # over the parent's limit
    made = await attenuate(child(3, 100))
    assert made.status_code == 200, made.text
    kid = made.json()

    # The child's charges count against the parent too: 2 + 3 = the parent's 5.
    for i in range(3):
        assert (await _mediated(client, kid, "pay", {"i": i}))["status"] == "authorized"
    assert side.store.budget_usage(parent["id"], 0) == (5, 0)
    assert side.store.budget_usage(kid["id"], 0) == (3, 0)
    denied = await _mediated(client, parent, "pay", {"i": 9})
    assert "max_invocations 5 reached" in denied["receipt"]["decision"]["reason"]
    # The parent has nothing left to give.
    nothing = await attenuate(child(1, 10))
    assert "remaining 0" in nothing.json()["message"]

    # A project-route child has no budget of its own, but still counts against the parent's.
    reader = side.chio_mint("agent", {"grants": [_grant("pay", max_invocations=1)]}, 600)
    sub = side.derive(reader["id"], scope=["pay"])
    ok = await client.post(
        "/v1/evaluate", json={"capability_id": sub.id, "tool_server": "srv", "tool": "pay"}
    )
    assert ok.json()["receipt"]["verdict"] == "ALLOW"
    again = await client.post(
        "/v1/evaluate", json={"capability_id": sub.id, "tool_server": "srv", "tool": "pay"}
    )
    step = receipt_from_json(again.json()["receipt"])
    assert step.verdict.value == "DENY"
    assert f"ancestor capability {reader['id']}" in step.reason


# -- pure parts ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_remaining_over_reads_the_covering_parent_grant() -> None:
    parent = {
        "grants": [
            _grant("read"),
            _grant("pay", max_invocations=10, max_total_cost=_usd(500)),
        ]
    }
    used = {1: (4, 450)}

    def usage(index: int) -> tuple[int, int]:
        return used.get(index, (0, 0))

    assert remaining_over(parent, {"grants": [_grant("read")]}, usage) is None
    fits = {"grants": [_grant("pay", max_invocations=6, max_total_cost=_usd(50))]}
    assert remaining_over(parent, fits, usage) is None
    many = {"grants": [_grant("pay", max_invocations=7, max_total_cost=_usd(50))]}
    assert remaining_over(parent, many, usage) == (
        "new_scope grant 0 max_invocations 7 exceeds the parent's remaining 6"
    )
    costly = {"grants": [_grant("pay", max_invocations=1, max_total_cost=_usd(51))]}
    assert "max_total_cost 51 exceeds the parent's remaining 50" in str(
        remaining_over(parent, costly, usage)
    )


@pytest.mark.unit
def test_store_charges_all_accounts_or_none_and_refunds_once(tmp_path: Path) -> None:
    store = SidecarStore(tmp_path / "s.db")
    accounts = [
        BudgetAccount(capability_id="child", grant_index=0, max_invocations=5),
        BudgetAccount(capability_id="parent", grant_index=1, max_total_units=15),
    ]

    def charge(hold: str) -> Any:
        return store.charge_budget(
            BudgetCharge(
                hold_id=hold,
                capability_id="child",
                grant_index=0,
                accounts=(("child", 0), ("parent", 1)),
                units=10,
                currency=USD,
                tool_server="srv",
                tool_name="pay",
                parameter_hash="00" * 32,
            ),
            accounts,
        )

    assert charge("h1") is None
    refusal = charge("h2")  # the parent has 5 of 15 left
    assert refusal is not None
    assert (refusal.capability_id, refusal.constraint) == (
        "parent",
        "max_total_cost",
    )
    assert store.budget_usage("child", 0) == (1, 10)  # the refused charge wrote nothing
    assert store.budget_charge("h2") is None
    done = store.reverse_budget_charge("h1")
    assert done.refunded
    assert done.refunded_units == 10
    assert store.budget_usage("parent", 1) == (0, 0)
    assert not store.reverse_budget_charge("h1").refunded
    assert store.budget_usage("child", 0) == (0, 0)
    store.close()
    # The schema is 3 and a reopened store keeps the charges.
    again = SidecarStore(tmp_path / "s.db")
    found = again.budget_charge("h1")
    assert found is not None
    assert found.state == "reversed"
    again.close()
