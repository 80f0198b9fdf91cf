"""The read endpoint options of ``consume`` (parsing only: the service is built, not run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from chio_receipts import cli_consumers
from chio_receipts.cli import app

pytestmark = pytest.mark.unit


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ClickHouse configs of the services ``consume`` would run."""
    seen: list[Any] = []

    def keep(service: Any, metrics_port: Any, metrics_host: Any) -> None:
        seen.append(service.sink._config)

    for name in ("CHIO_READ_BIND", "CHIO_READ_TOKEN", "CHIO_READ_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli_consumers, "_serve", keep)
    return seen


def _consume(tmp_path: Path, *args: str, dsn: str = "chdb:///unused") -> Any:
    base = ["consume", "--builder-key", str(tmp_path / "k.json"), "--dsn", dsn]
    return CliRunner().invoke(app, [*base, *args])


def test_consume_serves_reads_on_a_free_loopback_port_by_default(
    built: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _consume(tmp_path).exit_code == 0
    assert _consume(tmp_path, "--read-bind", "off").exit_code == 0
    monkeypatch.setenv("CHIO_READ_BIND", "[::1]:8124")
    assert _consume(tmp_path).exit_code == 0
    # A server serves reads itself.
    assert _consume(tmp_path, dsn="http://127.0.0.1:8123/db").exit_code == 0
    default, off, v6, server = built
    assert (default.read_endpoint.host, default.read_endpoint.port) == ("127.0.0.1", 0)
    assert default.read_endpoint.token is None
    assert off.read_endpoint is None
    assert (v6.read_endpoint.host, v6.read_endpoint.port) == ("::1", 8124)
    assert server.read_endpoint is None


def test_beyond_loopback_a_token_is_required_and_never_printed(
    built: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _consume(tmp_path, "--read-bind", "0.0.0.0:8124")
    assert result.exit_code == 2
    assert "needs a read token" in result.output
    assert _consume(tmp_path, "--read-bind", "nonsense").exit_code == 2

    secret = "s3cret-read-token"
    token_file = tmp_path / "token"
    token_file.write_text(secret + "\n")
    result = _consume(tmp_path, "--read-bind", "0.0.0.0:8124", "--read-token-file", str(token_file))
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("CHIO_READ_TOKEN", secret)
    assert _consume(tmp_path, "--read-bind", "0.0.0.0:8125").exit_code == 0
    from_file, from_env = built
    for config in (from_file, from_env):
        assert config.read_endpoint.token.reveal() == secret
        assert secret not in repr(config)
    token_file.write_text("")
    result = _consume(tmp_path, "--read-token-file", str(token_file))
    assert result.exit_code == 2
    assert "empty" in result.output
