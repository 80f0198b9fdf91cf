"""A component that cannot start says which, why and what to do, in one message."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chio_receipts.cli import app
from chio_receipts.stack import (
    APICURIO_VERSION,
    ApicurioRegistry,
    KafkaBroker,
    KafkaConfig,
    PortBusyError,
    RegistryConfig,
    StackError,
    TemporalConfig,
    TemporalServer,
    java_binary,
)


@pytest.fixture
def busy_port() -> object:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.mark.unit
def test_busy_temporal_port_names_the_port_and_the_fix(busy_port: int, tmp_path: Path) -> None:
    with pytest.raises(PortBusyError) as info:
        TemporalServer(TemporalConfig(data_dir=tmp_path, port=busy_port))
    text = str(info.value)
    assert text.startswith(f"temporal: port {busy_port} busy")
    assert "--temporal-port 0" in text


@pytest.mark.unit
def test_busy_kafka_port_names_the_port_and_the_fix(busy_port: int, tmp_path: Path) -> None:
    with pytest.raises(PortBusyError) as info:
        KafkaBroker(KafkaConfig(data_dir=tmp_path, cache_dir=tmp_path, port=busy_port))
    assert str(info.value).startswith(f"kafka: port {busy_port} busy")


@pytest.mark.unit
def test_missing_java_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk-here"))
    with pytest.raises(StackError) as info:
        java_binary()
    assert str(info.value).startswith("kafka: java not found")
    assert "JDK 17+" in str(info.value)


@pytest.mark.unit
def test_cli_prints_one_line_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk-here"))
    monkeypatch.setenv("CHIO_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["dev", "fetch"])
    assert result.exit_code == 1
    assert "java not found" in result.output
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_cli_status_without_a_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIO_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["dev", "status"])
    assert result.exit_code == 3
    assert "not running" in result.output


HELP_COMMANDS = [
    ["--help"],
    ["dev", "--help"],
    ["dev", "up", "--help"],
    ["dev", "down", "--help"],
    ["dev", "status", "--help"],
    ["dev", "fetch", "--help"],
    ["demo", "--help"],
    ["sidecar", "serve", "--help"],
    ["topics", "ensure", "--help"],
    ["watch", "--help"],
    ["consume", "--help"],
    ["siem-export", "--help"],
    ["query", "--help"],
    ["verify", "--help"],
]


@pytest.mark.unit
def test_every_command_has_help() -> None:
    runner = CliRunner()
    for argv in HELP_COMMANDS:
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, argv
        assert "Usage" in result.output


@pytest.mark.unit
def test_cluster_ids_never_look_like_an_option() -> None:
    from chio_receipts.stack._kafka import _cluster_id

    ids = [_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.unit
def test_busy_registry_port_names_the_port_and_the_fix(busy_port: int, tmp_path: Path) -> None:
    with pytest.raises(PortBusyError) as info:
        ApicurioRegistry(RegistryConfig(data_dir=tmp_path, cache_dir=tmp_path, port=busy_port))
    assert str(info.value).startswith(f"registry: port {busy_port} busy")
    assert "--registry-port 0" in str(info.value)


@pytest.mark.unit
async def test_a_registry_that_exits_while_starting_is_an_error_with_its_log(
    tmp_path: Path,
) -> None:
    # A cached package whose runner jar is not a jar: java exits at once.
    home = tmp_path / "cache" / f"apicurio-registry-{APICURIO_VERSION}"
    home.mkdir(parents=True)
    (home / f"apicurio-registry-app-{APICURIO_VERSION}-runner.jar").write_text("not a jar")
    (home / ".complete").write_text(APICURIO_VERSION)
    registry = ApicurioRegistry(RegistryConfig(data_dir=tmp_path, cache_dir=tmp_path / "cache"))
    with pytest.raises(StackError) as info:
        await registry.start()
    text = str(info.value)
    assert text.startswith("registry: Apicurio Registry exited with code"), text
    assert "last log lines" in text
    assert registry.process is None
