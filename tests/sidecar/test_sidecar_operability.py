"""Operability of the served sidecar over real HTTP: decisions by verdict and guard, latency,
policy reloads, store errors and refused requests in ``/metrics``; liveness and readiness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chio_receipts.sidecar import DataDir, LocalSidecar, SidecarServer
from chio_receipts.sidecar._guards import CallContext, GuardResult, GuardVerdict

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _decisions(samples: Samples, verdict: str, guard: str, family: str = "project") -> float:
    key = (
        "chio_sidecar_decisions_total",
        (("family", family), ("guard", guard), ("verdict", verdict)),
    )
    return samples.get(key, 0.0)


class NoDelete:
    """A guard that denies the tool ``delete`` (whatever the grant says)."""

    name = "no-delete"

    def check(self, call: CallContext) -> GuardResult:
        if call.tool == "delete":
            return GuardResult(guard=self.name, verdict=GuardVerdict.DENY, reason="no deletes")
        return GuardResult(guard=self.name, verdict=GuardVerdict.ALLOW)


async def _evaluate(http: httpx.AsyncClient, cap: str, tool: str) -> dict[str, Any]:
    answer = await http.post(
        "/v1/evaluate", json={"capability_id": cap, "tool_server": "srv", "tool": tool}
    )
    assert answer.status_code == 200, answer.text
    receipt: dict[str, Any] = answer.json()["receipt"]
    return receipt


async def test_decisions_are_counted_by_verdict_and_guard() -> None:
    side = LocalSidecar(guards=[NoDelete()], policy_hash="ab" * 32)
    async with SidecarServer(side) as server, httpx.AsyncClient(base_url=server.url) as http:
        before = _samples((await http.get("/metrics")).text)
        assert _decisions(before, "allow", "none") == 0
        cap = (
            await http.post(
                "/v1/capabilities",
                json={"subject": "agent:a", "scope": ["read", "delete"], "ttl_seconds": 60},
            )
        ).json()["id"]
        for tool in ("read", "read", "delete", "write"):
            await _evaluate(http, cap, tool)
        out_of_scope = await _evaluate(http, cap, "write")
        scope_guard = json.loads(out_of_scope["chio_receipt"])["decision"]["guard"]
        assert scope_guard
        assert scope_guard != "no-delete"
        # The kernel's body is a family of its own, with the same guard labels.
        kernel = await http.post(
            "/v1/capabilities/mint",
            json={"subject": "agent:k", "scopes": ["tool:srv:delete:invoke"]},
        )
        token = kernel.json()["capability"]
        mediated = await http.post(
            "/v1/evaluate",
            json={"capability": token, "tool_server": "srv", "tool_name": "delete"},
        )
        assert mediated.json()["status"] == "deny"
        text = (await http.get("/metrics")).text
    samples = _samples(text)
    assert _decisions(samples, "allow", "none") == 2
    assert _decisions(samples, "deny", "no-delete") == 1
    assert _decisions(samples, "deny", scope_guard) == 2
    assert _decisions(samples, "deny", "no-delete", family="kernel") == 1
    latency = ("chio_sidecar_decision_latency_seconds_count", (("family", "project"),))
    assert samples[latency] == 5
    bucket = (
        "chio_sidecar_decision_latency_seconds_bucket",
        (("family", "project"), ("le", "+Inf")),
    )
    assert samples[bucket] == 5
    # The active policy is named; no capability id becomes a label.
    assert samples[("chio_sidecar_policy_info", (("policy_hash", "ab" * 32),))] == 1
    assert cap not in text


async def test_policy_reloads_and_store_errors_are_counted() -> None:
    side = LocalSidecar()
    async with SidecarServer(side) as server, httpx.AsyncClient(base_url=server.url) as http:
        zero = _samples((await http.get("/metrics")).text)
        assert zero[("chio_sidecar_policy_reloads_total", (("result", "ok"),))] == 0
        assert zero[("chio_sidecar_policy_reloads_total", (("result", "error"),))] == 0
        # What a policy reload calls (the SIGHUP handler of `sidecar serve`).
        server.metrics.policy_reloaded(True)
        server.metrics.policy_reloaded(False)
        server.metrics.policy_reloaded(False)
        side.use_guards([NoDelete()], "cd" * 32)
        moved = _samples((await http.get("/metrics")).text)
        assert moved[("chio_sidecar_policy_reloads_total", (("result", "ok"),))] == 1
        assert moved[("chio_sidecar_policy_reloads_total", (("result", "error"),))] == 2
        assert moved[("chio_sidecar_policy_info", (("policy_hash", "cd" * 32),))] == 1
        # A store that cannot be written: readiness fails and says why; the error is counted.
        side.store.close()
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        assert ready.json()["checks"]["store"] != "ok"
        refused = await http.post(
            "/v1/capabilities", json={"subject": "s", "scope": ["read"], "ttl_seconds": 60}
        )
        assert refused.status_code == 503
        # Liveness is the process only.
        assert (await http.get("/livez")).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/chio/live")).status_code == 200
        assert (await http.get("/chio/health")).status_code == 503
        failed = _samples((await http.get("/metrics")).text)
    assert failed[("chio_sidecar_store_errors_total", (("operation", "readyz"),))] == 1
    assert failed[("chio_sidecar_store_errors_total", (("operation", "create_capability"),))] == 1


async def test_readiness_fails_when_the_signing_key_is_missing(tmp_path: Path) -> None:
    with DataDir(tmp_path / "side") as directory:
        side = LocalSidecar(directory.signing_key(), store=directory.store)
        async with (
            SidecarServer(side, data_dir=directory) as server,
            httpx.AsyncClient(base_url=server.url) as http,
        ):
            ready = await http.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() == {
                "status": "ready",
                "key_id": side.key_id,
                "checks": {"store": "ok", "signing_key": "ok"},
            }
            directory.seed_path.unlink()
            missing = await http.get("/readyz")
            assert missing.status_code == 503
            assert "missing" in missing.json()["checks"]["signing_key"]
            assert missing.json()["checks"]["store"] == "ok"
            # Rotating makes a new key file: ready again.
            assert (await http.post("/v1/keys/rotate")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
            # A key that is not the published one (rotated behind the server's back).
            other = LocalSidecar(store=directory.store)
            assert other.key_id != side.key_id
            stale = await http.get("/readyz")
            assert stale.status_code == 503
            assert "not published" in stale.json()["checks"]["signing_key"]
