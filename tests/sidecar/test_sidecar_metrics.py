"""The sidecar's Prometheus metrics: served at ``/metrics`` over real HTTP on loopback, and the
``--metrics-port`` / ``--metrics-host`` options of ``sidecar serve`` (parsing only)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from chio_receipts import cli_sidecar
from chio_receipts.cli import app
from chio_receipts.sidecar import LocalSidecar, SidecarMetrics, SidecarServer, StoreError

pytestmark = pytest.mark.unit


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _decisions(samples: dict[Any, float], verdict: str, family: str) -> float:
    # Summed over the guard label (the guard that decided a deny; "none" for an allow).
    found = [
        value
        for (name, labels), value in samples.items()
        if name == "chio_sidecar_decisions_total"
        and dict(labels)["family"] == family
        and dict(labels)["verdict"] == verdict
    ]
    return sum(found)


async def test_served_metrics_move_after_an_allow_and_a_deny() -> None:
    side = LocalSidecar()
    async with (
        SidecarServer(side, token="s3cret") as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        # Scraped without the bearer token, like /healthz.
        before = await http.get("/metrics")
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain")
        zero = _samples(before.text)
        assert _decisions(zero, "allow", "project") == 0
        assert _decisions(zero, "deny", "project") == 0
        key = ("chio_sidecar_signing_key_info", (("key_id", side.key_id),))
        assert zero[key] == 1

        auth = {"authorization": "Bearer s3cret"}
        created = await http.post(
            "/v1/capabilities",
            json={"subject": "agent:secret-subject", "scope": ["read"], "ttl_seconds": 60},
            headers=auth,
        )
        assert created.status_code == 201
        cap_id = created.json()["id"]
        for tool in ("read", "delete"):
            answer = await http.post(
                "/v1/evaluate",
                json={"capability_id": cap_id, "tool_server": "srv", "tool": tool},
                headers=auth,
            )
            assert answer.status_code == 200
        # chio-sdk-python's body is a family of its own.
        sdk = await http.post(
            "/v1/evaluate",
            json={"capability_id": cap_id, "tool_server": "srv", "tool_name": "read"},
            headers=auth,
        )
        assert sdk.status_code == 200
        revoked = await http.post(f"/v1/capabilities/{cap_id}/revoke", headers=auth)
        assert revoked.status_code == 200

        after = await http.get("/metrics")
        moved = _samples(after.text)
        assert _decisions(moved, "allow", "project") == 1
        assert _decisions(moved, "deny", "project") == 1
        assert _decisions(moved, "allow", "sdk") == 1
        assert _decisions(moved, "deny", "kernel") == 0
        latency = ("chio_sidecar_decision_latency_seconds_count", (("family", "project"),))
        assert moved[latency] == 2
        minted = ("chio_sidecar_capabilities_minted_total", (("family", "project"),))
        assert moved[minted] == 1
        gone = ("chio_sidecar_capabilities_revoked_total", (("family", "project"),))
        assert moved[gone] == 1
        # No subject, capability id or tool name ever becomes a label value.
        for secret in ("secret-subject", cap_id, "delete", "s3cret"):
            assert secret not in after.text
        # The same registry as the server's own (what --metrics-port would serve).
        assert _samples(server.metrics.exposition().decode()) == moved


async def test_a_store_that_cannot_be_written_is_counted() -> None:
    side = LocalSidecar()

    def broken(*args: object, **kwargs: object) -> None:
        raise StoreError("disk full")

    side.store.put_capability = broken  # type: ignore[method-assign]
    metrics = SidecarMetrics()
    async with (
        SidecarServer(side, metrics=metrics) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        refused = await http.post(
            "/v1/capabilities", json={"subject": "s", "scope": ["read"], "ttl_seconds": 60}
        )
        assert refused.status_code == 503
        samples = _samples((await http.get("/metrics")).text)
    key = ("chio_sidecar_store_errors_total", (("operation", "create_capability"),))
    assert samples[key] == 1
    minted = ("chio_sidecar_capabilities_minted_total", (("family", "project"),))
    assert samples[minted] == 0


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    seen: list[tuple[int, str]] = []

    async def no_serve(sidecar: LocalSidecar, **kwargs: Any) -> None:
        assert isinstance(kwargs["metrics"], SidecarMetrics)

    def record(port: int, *, addr: str, registry: Any) -> None:
        seen.append((port, addr))

    for name in ("CHIO_METRICS_HOST", "CHIO_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli_sidecar, "serve_sidecar", no_serve)
    monkeypatch.setattr(cli_sidecar, "start_http_server", record)
    return seen


def test_sidecar_serve_metrics_options(
    served: list[tuple[int, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["sidecar", "serve", "--ephemeral", "--log-level", "warning"]
    result = CliRunner().invoke(app, [*args, "--metrics-port", "9480"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("CHIO_METRICS_HOST", "::")
    monkeypatch.setenv("CHIO_METRICS_PORT", "9481")
    assert CliRunner().invoke(app, args).exit_code == 0
    monkeypatch.delenv("CHIO_METRICS_PORT")
    assert CliRunner().invoke(app, [*args, "--metrics-host", "10.1.2.3"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--metrics-port", "9482", "--metrics-host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert served == [(9480, "127.0.0.1"), (9481, "::"), (9482, "0.0.0.0")]
