"""Constraints and Cedar on the served sidecar: denies in signed receipts, the CLI, SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chio_receipts import schemas
from chio_receipts.sidecar import LocalSidecar, SidecarServer, build_guards

pytestmark = pytest.mark.integration

SEED_003 = """
@id("seed-003-forbidden-input")
forbid(principal, action == Chio::Action::"call", resource)
when { context.args.hasTag("0") && context.args.getTag("0") like "forbidden*" };

@id("quarantined-queue")
forbid(principal, action, resource) when { principal.task_queue == "quarantine" };
"""
SECRET = "forbidden: the launch codes"
GRANTS = {
    "grants": [
        {
            "server_id": "agent-tools",
            "tool_name": "run_task",
            "operations": ["invoke"],
            "constraints": [{"type": "max_length", "value": 64}],
        },
        {
            "server_id": "payments",
            "tool_name": "pay",
            "operations": ["invoke"],
            "constraints": [{"type": "max_transaction_amount_usd", "value": "500.00"}],
        },
    ]
}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[SidecarServer, httpx.AsyncClient]]:
    (tmp_path / "seed.cedar").write_text(SEED_003)
    guards, digest = build_guards(tmp_path / "seed.cedar")
    side = LocalSidecar(guards=guards, policy_hash=digest)
    async with SidecarServer(side) as server, httpx.AsyncClient(base_url=server.url) as http:
        yield server, http


async def _mint(http: httpx.AsyncClient, scope: dict[str, Any] = GRANTS) -> dict[str, Any]:
    r = await http.post(
        "/v1/capabilities", json={"subject": "agent:t", "scope": scope, "ttl_seconds": 600}
    )
    assert r.status_code == 200, r.text
    return r.json()


def _step(cap_id: str, tool: str, server: str, args: list[Any], **kw: Any) -> dict[str, Any]:
    return {
        "capability_id": cap_id,
        "tool_server": server,
        "tool": tool,
        "namespace": "default",
        "workflow_id": "wf-1",
        "run_id": "r-1",
        "workflow_type": "TaskWorkflow",
        "task_queue": kw.pop("task_queue", "tasks"),
        "activity_id": "1",
        "activity_type": tool,
        "attempt": 1,
        "scheduled_at": 1,
        "started_at": 2,
        "parameters": {"args": args},
        **kw,
    }


def _evidence(receipt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["guard_name"]: json.loads(e["details"]) for e in receipt.get("evidence", [])}


async def _evaluate_step(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await http.post("/v1/evaluate", json=body)
    assert r.status_code == 200, r.text
    step = r.json()["receipt"]
    return step


async def test_constraint_deny_on_the_mediated_route(
    served: tuple[SidecarServer, httpx.AsyncClient],
) -> None:
    server, http = served
    token = await _mint(http)
    body = {"capability": token, "tool_server": "payments", "tool_name": "pay"}
    over = await http.post("/v1/evaluate", json={**body, "parameters": {"amount_usd": "750.00"}})
    ok = await http.post("/v1/evaluate", json={**body, "parameters": {"amount_usd": "20"}})
    assert over.json()["status"] == "deny"
    assert ok.json()["status"] == "authorized"
    receipt = over.json()["receipt"]
    trusted = server.sidecar.trusted_keys()
    assert schemas.verify_kernel_receipt(receipt, trusted_keys=trusted).valid
    decision = receipt["body"]["decision"] if "body" in receipt else receipt["decision"]
    assert decision["guard"] == "constraints"
    assert "max_transaction_amount_usd[0]" in decision["reason"]
    ev = _evidence(receipt.get("body", receipt))
    assert ev["constraints"]["constraint"] == "max_transaction_amount_usd[0]"
    assert ev["constraints"]["parameter"] == "amount_usd"
    assert ev["constraints"]["grant_index"] == 1
    assert "cedar" not in ev  # the first guard that does not allow decides
    assert receipt.get("policy_hash", receipt.get("body", {}).get("policy_hash")) == (
        server.sidecar.policy_hash
    )


async def test_cedar_and_constraint_denies_on_the_step_route(
    served: tuple[SidecarServer, httpx.AsyncClient],
) -> None:
    server, http = served
    cap = (await _mint(http))["id"]
    trusted = server.sidecar.trusted_keys()

    async def decide(args: list[Any], **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        step = await _evaluate_step(http, _step(cap, "run_task", "agent-tools", args, **kw))
        chio = json.loads(step["chio_receipt"])
        assert schemas.verify_kernel_receipt(chio, trusted_keys=trusted).valid
        assert chio["policy_hash"] == server.sidecar.policy_hash
        return step, chio

    step, chio = await decide([SECRET])
    assert step["verdict"] == "DENY"
    assert chio["decision"]["guard"] == "cedar"
    ev = _evidence(chio)
    assert ev["constraints"]["outcome"] == "allow"
    assert ev["cedar"]["constraint"] == "seed-003-forbidden-input"
    assert ev["cedar"]["policies"] == ["seed-003-forbidden-input"]
    for e in chio["evidence"]:
        assert "launch" not in e["details"]
    assert "launch" not in chio["decision"]["reason"]

    step, chio = await decide(["x" * 65])
    assert chio["decision"]["guard"] == "constraints"
    assert _evidence(chio)["constraints"]["constraint"] == "max_length[0]"

    step, chio = await decide(["a fine task"], task_queue="quarantine")
    assert _evidence(chio)["cedar"]["constraint"] == "quarantined-queue"

    step, chio = await decide(["a fine task"])
    assert step["verdict"] == "ALLOW"
    assert _evidence(chio)["cedar"]["policies"] == ["chio.grants"]


async def test_attenuation_keeps_constraints(
    served: tuple[SidecarServer, httpx.AsyncClient],
) -> None:
    _, http = served
    token = await _mint(http)
    dropped = {"grants": [{**GRANTS["grants"][0], "constraints": []}]}
    r = await http.post(
        "/v1/capabilities/attenuate", json={"parent_token": token, "new_scope": dropped}
    )
    assert r.status_code == 409
    kept = {"grants": [GRANTS["grants"][0]]}
    r = await http.post(
        "/v1/capabilities/attenuate", json={"parent_token": token, "new_scope": kept}
    )
    assert r.status_code == 200, r.text
    child = r.json()
    assert child["scope"]["grants"][0]["constraints"] == [{"type": "max_length", "value": 64}]
    step = await _evaluate_step(http, _step(child["id"], "run_task", "agent-tools", ["y" * 65]))
    assert step["verdict"] == "DENY"
    assert json.loads(step["chio_receipt"])["decision"]["guard"] == "constraints"


# -- the CLI -------------------------------------------------------------------------------------

CLI = [sys.executable, "-m", "chio_receipts", "sidecar"]


def test_policy_validate_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.cedar"
    good.write_text(SEED_003)
    r = subprocess.run(
        [*CLI, "policy", "validate", str(good)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "a.cedar").write_text(SEED_003)
    (bad_dir / "b.cedar").write_text(
        '@id("typo") forbid(principal, action, resource) when { principal.queue == "x" };\n'
        "forbid(principal, action"
    )
    r = subprocess.run(
        [*CLI, "policy", "validate", str(bad_dir)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 1
    assert "b.cedar" in r.stdout
    assert "does not parse" in r.stdout
    (bad_dir / "b.cedar").write_text(
        '@id("typo") forbid(principal, action, resource) when { principal.queue == "x" };'
    )
    r = subprocess.run(
        [*CLI, "policy", "validate", str(bad_dir)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 1
    assert "FAIL: b.cedar: policy0 (@id 'typo'):" in r.stdout
    assert "queue" in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "seed.cedar").write_text(SEED_003)
    port = _free_port()
    log = (tmp_path / "sidecar.log").open("wb")
    proc = subprocess.Popen(
        [*CLI, "serve", "--ephemeral", "--port", str(port), "--policy", str(policy_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the sidecar did not start")
    try:
        yield proc, url, policy_dir
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()


async def test_sighup_reloads_without_dropping_a_request(
    served_process: tuple[subprocess.Popen[bytes], str, Path], tmp_path: Path
) -> None:
    proc, url, policy_dir = served_process
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        cap = (await _mint(http))["id"]
        seen: list[tuple[int, str, str]] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                r = await http.post(
                    "/v1/evaluate", json=_step(cap, "run_task", "agent-tools", ["ok task"])
                )
                chio = (
                    json.loads(r.json()["receipt"]["chio_receipt"]) if r.status_code == 200 else {}
                )
                seen.append(
                    (
                        r.status_code,
                        r.json()["receipt"]["verdict"] if r.status_code == 200 else "",
                        chio.get("policy_hash", ""),
                    )
                )

        workers = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.5)
        first_hash = seen[-1][2]
        # A new set that forbids the task: reloaded under load.
        (policy_dir / "extra.cedar").write_text(
            '@id("ok-tasks-forbidden") forbid(principal, action, resource) when '
            '{ context.args.hasTag("0") && context.args.getTag("0") == "ok task" };'
        )
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        second_hash = seen[-1][2]
        # A bad file: the set stays.
        (policy_dir / "broken.cedar").write_text("forbid(principal, action")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*workers)
    assert all(status == 200 for status, _, _ in seen), {s for s, _, _ in seen}
    assert len(seen) > 50
    assert first_hash != second_hash
    assert seen[-1][2] == second_hash
    verdicts = [v for _, v, _ in seen]
    assert verdicts[0] == "ALLOW"
    assert verdicts[-1] == "DENY"
    # Every receipt was decided whole by one set: the one its policy_hash names.
    assert {(v, h) for _, v, h in seen} == {("ALLOW", first_hash), ("DENY", second_hash)}
    log = (tmp_path / "sidecar.log").read_text()
    assert "policy reload failed" in log
    assert "broken.cedar" in log


def test_serve_refuses_a_policy_set_that_does_not_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_text('@id("typo") forbid(principal, action, resource) when { context.nope };')
    r = subprocess.run(
        [*CLI, "serve", "--ephemeral", "--port", str(_free_port()), "--policy", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "bad.cedar: policy0 (@id 'typo'):" in r.stderr
    assert "nope" in r.stderr
