"""``consume --cluster`` / CHIO_CLICKHOUSE_CLUSTER reach the ClickHouse config (parsing only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from chio_receipts import cli_consumers
from chio_receipts.cli import app

pytestmark = pytest.mark.unit


@pytest.fixture
def configs(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    monkeypatch.delenv("CHIO_CLICKHOUSE_CLUSTER", raising=False)
    monkeypatch.setattr(cli_consumers, "ReceiptBuilderService", seen.append)
    monkeypatch.setattr(cli_consumers, "_serve", lambda *_: None)
    return seen


def _args(tmp_path: Path, dsn: str) -> list[str]:
    return ["consume", "--builder-key", str(tmp_path / "k.json"), "--dsn", dsn]


def test_the_cluster_comes_from_the_flag_or_the_environment(
    configs: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = "http://127.0.0.1:8123/receipts"
    result = CliRunner().invoke(app, [*_args(tmp_path, server), "--cluster", "chio"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("CHIO_CLICKHOUSE_CLUSTER", "prod_cluster")
    assert CliRunner().invoke(app, _args(tmp_path, server)).exit_code == 0
    monkeypatch.delenv("CHIO_CLICKHOUSE_CLUSTER")
    assert CliRunner().invoke(app, _args(tmp_path, server)).exit_code == 0
    assert [c.clickhouse.cluster for c in configs] == ["chio", "prod_cluster", None]


def test_a_cluster_with_the_embedded_database_or_a_bad_name_is_refused(
    configs: list[Any], tmp_path: Path
) -> None:
    embedded = CliRunner().invoke(app, [*_args(tmp_path, "chdb:///x"), "--cluster", "chio"])
    assert embedded.exit_code == 2
    assert "server DSN" in embedded.output
    bad = CliRunner().invoke(
        app, [*_args(tmp_path, "http://127.0.0.1:8123/db"), "--cluster", "a b"]
    )
    assert bad.exit_code == 2
    assert "invalid ClickHouse cluster name" in bad.output
    assert configs == []
