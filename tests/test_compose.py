"""compose.yaml is for users with Docker: check its shape without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROJECT_SERVICES = {
    "sidecar",
    "topics",
    "watcher",
    "receipt-builder",
    "siem-exporter",
    "worker-demo",
}
INFRA = {"kafka", "clickhouse", "temporal", "schema-registry"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return data


@pytest.mark.unit
def test_every_service_has_image_or_build(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == PROJECT_SERVICES | INFRA
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name


@pytest.mark.unit
def test_project_services_build_from_the_one_dockerfile(compose: dict[str, Any]) -> None:
    assert (REPO / "Dockerfile").exists()
    for name in PROJECT_SERVICES:
        svc = compose["services"][name]
        assert svc["build"] == ".", name
        assert svc["command"], name


@pytest.mark.unit
def test_project_services_point_at_the_right_hosts(compose: dict[str, Any]) -> None:
    for name in PROJECT_SERVICES:
        env = compose["services"][name]["environment"]
        assert env["CHIO_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert env["CHIO_TEMPORAL_ADDRESS"] == "temporal:7233", name
        assert "@clickhouse:8123" in env["CHIO_CLICKHOUSE_DSN"], name
        assert env["CHIO_SIDECAR_URL"] == "http://sidecar:9090", name
        assert env["CHIO_SCHEMA_REGISTRY_URL"] == "http://schema-registry:8081", name


@pytest.mark.unit
def test_published_ports_bind_loopback_and_infra_has_healthchecks(
    compose: dict[str, Any],
) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    for name in INFRA | {"sidecar"}:
        assert "healthcheck" in compose["services"][name], name


@pytest.mark.unit
def test_dependencies_name_existing_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
