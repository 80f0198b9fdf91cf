"""The Temporal connection flags, the metrics bind address and the log format of the commands.

The flags are parsed by the real CLI (the command's Temporal call is replaced by a recorder) and
the recorded :class:`TemporalConnection` is turned into ``Client.connect`` arguments; the commands
connect to a real dev server with the defaults in ``test_cli_streamer`` and ``tests/interceptor``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import TLSConfig
from typer.testing import CliRunner

import chio_receipts.cli as cli
import chio_receipts.demo._worker as demo_worker
import chio_receipts.streamer as streamer
from chio_receipts import _logging, cli_streamer
from chio_receipts._temporal import TemporalConnection
from chio_receipts.cli import app
from chio_receipts.schemas import ContractError, KafkaConnection, Secret

pytestmark = pytest.mark.unit

_VARIABLES = (
    "CHIO_TEMPORAL_ADDRESS",
    "CHIO_TEMPORAL_NAMESPACE",
    "CHIO_TEMPORAL_TLS",
    "CHIO_TEMPORAL_TLS_CERT",
    "CHIO_TEMPORAL_TLS_KEY",
    "CHIO_TEMPORAL_TLS_CA",
    "CHIO_TEMPORAL_TLS_SERVER_NAME",
    "CHIO_TEMPORAL_API_KEY",
    "CHIO_METRICS_HOST",
    "CHIO_METRICS_PORT",
    "CHIO_LOG_FORMAT",
    "CHIO_KAFKA_BOOTSTRAP",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pems(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("cert", "key", "ca"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(f"-----{name}-----\n".encode())
    return files


def _watch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> Any:
    """Run ``watch --once`` with ``args``; returns (result, recorded TemporalConnection)."""
    seen: dict[str, Any] = {}

    async def record(temporal: TemporalConnection, *_: Any) -> None:
        seen["temporal"] = temporal

    monkeypatch.setattr(cli_streamer, "_watch", record)
    result = CliRunner().invoke(app, ["watch", "--once", "--state-dir", str(tmp_path / "w"), *args])
    return result, seen.get("temporal")


def test_watch_defaults_to_the_local_plaintext_frontend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result, temporal = _watch(monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert temporal == TemporalConnection()
    assert temporal.address == "127.0.0.1:7233"
    assert temporal.connect_kwargs() == {"namespace": "default"}


def test_watch_builds_an_mtls_connection(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pems: dict[str, Path]
) -> None:
    result, temporal = _watch(
        monkeypatch,
        tmp_path,
        "--temporal-address", "ns.a1b2c.tmprl.cloud:7233",
        "--temporal-namespace", "ns.a1b2c",
        "--temporal-tls-cert", str(pems["cert"]),
        "--temporal-tls-key", str(pems["key"]),
        "--temporal-tls-ca", str(pems["ca"]),
        "--temporal-tls-server-name", "frontend.internal",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert temporal == TemporalConnection(
        address="ns.a1b2c.tmprl.cloud:7233",
        namespace="ns.a1b2c",
        tls_cert=pems["cert"],
        tls_key=pems["key"],
        tls_ca=pems["ca"],
        tls_server_name="frontend.internal",
    )
    assert temporal.connect_kwargs() == {
        "namespace": "ns.a1b2c",
        "tls": TLSConfig(
            server_root_ca_cert=b"-----ca-----\n",
            domain="frontend.internal",
            client_cert=b"-----cert-----\n",
            client_private_key=b"-----key-----\n",
        ),
    }


def test_the_api_key_comes_from_the_environment_implies_tls_and_never_prints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHIO_TEMPORAL_API_KEY", "key-from-env")
    monkeypatch.setenv("CHIO_TEMPORAL_ADDRESS", "eu-west-1.aws.api.temporal.io:7233")
    monkeypatch.setenv("CHIO_TEMPORAL_NAMESPACE", "prod.a1b2c")
    result, temporal = _watch(monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert temporal.api_key == Secret("key-from-env")
    assert temporal.uses_tls
    assert temporal.connect_kwargs() == {
        "namespace": "prod.a1b2c",
        "tls": TLSConfig(),
        "api_key": "key-from-env",
    }
    assert "key-from-env" not in repr(temporal)
    assert "key-from-env" not in str(temporal)
    assert "key-from-env" not in result.output


def test_tls_with_the_system_trust_store_and_the_older_spellings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result, temporal = _watch(
        monkeypatch, tmp_path, "--temporal", "t:7233", "--namespace", "n", "--temporal-tls"
    )
    assert result.exit_code == 0, result.output
    assert temporal.connect_kwargs() == {"namespace": "n", "tls": TLSConfig()}
    assert temporal.address == "t:7233"


def test_a_certificate_without_its_key_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pems: dict[str, Path]
) -> None:
    result, temporal = _watch(monkeypatch, tmp_path, "--temporal-tls-cert", str(pems["cert"]))
    assert result.exit_code == 2
    assert temporal is None
    assert "key" in result.output


def test_a_missing_tls_file_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result, temporal = _watch(monkeypatch, tmp_path, "--temporal-tls-ca", str(tmp_path / "no"))
    assert result.exit_code == 2
    assert temporal is None


def test_a_tls_file_gone_before_connecting_is_a_contract_error(tmp_path: Path) -> None:
    connection = TemporalConnection(tls_ca=tmp_path / "gone.pem")
    with pytest.raises(ContractError, match="cannot read"):
        connection.connect_kwargs()


def test_watch_binds_its_metrics_where_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served: list[tuple[int, str]] = []
    monkeypatch.setattr(
        cli_streamer, "start_metrics_server", lambda port, _r, *, addr: served.append((port, addr))
    )
    result, _ = _watch(monkeypatch, tmp_path, "--metrics-port", "9464")
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("CHIO_METRICS_HOST", "0.0.0.0")
    result, _ = _watch(monkeypatch, tmp_path, "--metrics-port", "9465")
    assert result.exit_code == 0, result.output
    assert served == [(9464, "127.0.0.1"), (9465, "0.0.0.0")]


def test_worker_takes_the_temporal_flags_and_the_metrics_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pems: dict[str, Path]
) -> None:
    seen: dict[str, Any] = {}

    async def record(settings: demo_worker.WorkerSettings, stop: object) -> None:
        seen["settings"] = settings

    served: list[tuple[int, str]] = []
    monkeypatch.setattr(demo_worker, "run_worker", record)
    monkeypatch.setattr(
        streamer, "start_metrics_server", lambda port, _r, *, addr: served.append((port, addr))
    )
    monkeypatch.setenv("CHIO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CHIO_TEMPORAL_API_KEY", "worker-key")
    result = CliRunner().invoke(
        app,
        [
            "worker", "--default-capability", "cap-1", "--task-queue", "q",
            "--temporal-address", "t.example:7233", "--temporal-namespace", "n1",
            "--temporal-tls-ca", str(pems["ca"]),
            "--metrics-port", "9466", "--metrics-host", "10.0.0.5",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert settings.temporal_connection() == TemporalConnection(
        address="t.example:7233", namespace="n1", tls_ca=pems["ca"], api_key=Secret("worker-key")
    )
    assert (settings.temporal_address, settings.namespace) == ("t.example:7233", "n1")
    assert settings.metrics is not None
    assert served == [(9466, "10.0.0.5")]
    assert "worker-key" not in repr(settings)


def test_worker_settings_without_a_connection_are_plaintext(tmp_path: Path) -> None:
    settings = demo_worker.WorkerSettings(
        temporal_address="h:1",
        namespace="n",
        sidecar_url="http://s",
        kafka=KafkaConnection(),
        spool_dir=tmp_path,
        task_queue="q",
        argument_key=demo_worker.ArgumentKey.generate(),
    )
    assert settings.temporal_connection() == TemporalConnection(address="h:1", namespace="n")


@pytest.fixture
def _restore_root_logging() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers, root.level = handlers, level


@pytest.mark.usefixtures("_restore_root_logging")
def test_log_format_json_writes_one_object_per_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _logging.configure("json", logging.INFO)
    logging.getLogger("chio.test").info("run %s closed", "wf-1")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("chio.test").exception("failed")
    lines = capsys.readouterr().err.splitlines()
    first = json.loads(lines[0])
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "INFO"
    assert first["logger"] == "chio.test"
    assert first["message"] == "run wf-1 closed"
    assert first["time"].endswith("+00:00")
    second = json.loads(lines[1])
    assert "ValueError: boom" in second["exception"]
    assert len(lines) == 2  # the traceback stays inside its one line


@pytest.mark.usefixtures("_restore_root_logging")
def test_log_format_text_and_one_handler_only(capsys: pytest.CaptureFixture[str]) -> None:
    _logging.configure("json")
    _logging.configure("text", "info")
    _logging.use_level("warning")
    logging.getLogger("chio.test").info("hidden")
    logging.getLogger("chio.test").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert err.count("shown") == 1
    assert " WARNING chio.test: shown" in err


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, "text"),
        (["--log-format", "json"], {}, "json"),
        ([], {"CHIO_LOG_FORMAT": "json"}, "json"),
    ],
)
def test_the_root_command_takes_the_log_format(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], expected: str
) -> None:
    chosen: list[str] = []
    monkeypatch.setattr(cli, "configure_logging", chosen.append)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, [*args, "sidecar", "keys", "list", "--help"])
    assert result.exit_code == 0, result.output
    assert chosen == [expected]


def test_an_unknown_log_format_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["--log-format", "xml", "sidecar", "--help"])
    assert result.exit_code == 2
