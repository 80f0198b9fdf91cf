"""The metrics bind address of the long-running consumer commands (parsing only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from chio_receipts import cli_consumers
from chio_receipts.cli import app

pytestmark = pytest.mark.unit


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    seen: list[tuple[int, str]] = []

    async def no_run(service: Any) -> None:
        return None

    def record(port: int, *, addr: str, registry: Any) -> None:
        seen.append((port, addr))

    for name in ("CHIO_METRICS_HOST", "CHIO_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli_consumers, "_run_until_signalled", no_run)
    monkeypatch.setattr(cli_consumers, "start_http_server", record)
    return seen


def test_consume_serves_metrics_on_loopback_unless_configured(
    served: list[tuple[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["consume", "--builder-key", str(tmp_path / "k.json"), "--dsn", "chdb:///unused"]
    assert CliRunner().invoke(app, [*args, "--metrics-port", "9470"]).exit_code == 0
    monkeypatch.setenv("CHIO_METRICS_HOST", "::")
    assert CliRunner().invoke(app, [*args, "--metrics-port", "9471"]).exit_code == 0
    assert CliRunner().invoke(app, args).exit_code == 0  # no port, no server
    assert served == [(9470, "127.0.0.1"), (9471, "::")]


def test_siem_export_serves_metrics_where_configured(served: list[tuple[int, str]]) -> None:
    result = CliRunner().invoke(
        app, ["siem-export", "--metrics-port", "9472", "--metrics-host", "10.1.2.3"]
    )
    assert result.exit_code == 0, result.output
    assert served == [(9472, "10.1.2.3")]


@pytest.fixture
def services(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The services ``consume`` and ``siem-export`` would run (not started)."""
    seen: list[Any] = []

    def keep(service: Any, metrics_port: Any, metrics_host: Any) -> None:
        seen.append(service)

    monkeypatch.delenv("CHIO_TRUSTED_KERNEL_KEYS", raising=False)
    monkeypatch.setattr(cli_consumers, "_serve", keep)
    return seen


def test_trusted_kernel_keys_from_flags_and_the_environment(
    services: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = "aa" * 32, "0x" + "BB" * 32, "cc" * 32
    args = ["consume", "--builder-key", str(tmp_path / "k.json"), "--dsn", "chdb:///unused"]
    flags = ["--trusted-kernel-key", a, "--trusted-kernel-key", b]
    assert CliRunner().invoke(app, [*args, *flags]).exit_code == 0
    monkeypatch.setenv("CHIO_TRUSTED_KERNEL_KEYS", f"{a},{c}")
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(app, ["siem-export"])
    assert result.exit_code == 0, result.output
    first, second, exporter = services
    assert first._keys.trusted_hex == {a, "bb" * 32}
    assert second._keys.trusted_hex == {a, c}
    assert exporter._keys.trusted_hex == {a, c}
    bad = CliRunner().invoke(app, [*args, "--trusted-kernel-key", "not-a-key"])
    assert bad.exit_code == 2
    assert "64 hex digits" in bad.output
