"""Argument parsing of the Kafka commands: their flags build the right ``KafkaConnection``.

Only the parsing is checked here (the command's Kafka call is replaced by a recorder); the
commands themselves run against real brokers in ``test_cli_streamer`` (plaintext) and
``tests/faults/test_kafka_sasl.py`` (SASL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import chio_receipts.demo._worker as demo_worker
from chio_receipts import cli_streamer
from chio_receipts.cli import app
from chio_receipts.schemas import KafkaConnection, Secret
from chio_receipts.streamer import DEFAULT_LAG_WINDOW_S, TopicsConfig

pytestmark = pytest.mark.unit

SASL_FLAGS = [
    "--bootstrap", "broker-1:9094,broker-2:9094",
    "--kafka-security-protocol", "SASL_PLAINTEXT",
    "--kafka-sasl-mechanism", "SCRAM-SHA-512",
    "--kafka-sasl-username", "chio-writer",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_kafka_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CHIO_KAFKA_BOOTSTRAP",
        "CHIO_KAFKA_SECURITY_PROTOCOL",
        "CHIO_KAFKA_SASL_MECHANISM",
        "CHIO_KAFKA_SASL_USERNAME",
        "CHIO_KAFKA_SASL_PASSWORD",
        "CHIO_KAFKA_SSL_CAFILE",
        "CHIO_KAFKA_SSL_CERTFILE",
        "CHIO_KAFKA_SSL_KEYFILE",
        "CHIO_KAFKA_SSL_KEY_PASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)


def test_topics_ensure_builds_a_sasl_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def record(kafka: KafkaConnection, config: TopicsConfig) -> dict[str, Any]:
        seen.update(kafka=kafka, config=config)
        return {}

    monkeypatch.setattr(cli_streamer, "ensure_topics", record)
    monkeypatch.setenv("CHIO_KAFKA_SASL_PASSWORD", "pw-from-env")
    result = CliRunner().invoke(
        app, ["topics", "ensure", *SASL_FLAGS, "--prefix", "t.", "--partitions", "3"]
    )
    assert result.exit_code == 0, result.output
    assert seen["kafka"] == KafkaConnection(
        bootstrap_servers="broker-1:9094,broker-2:9094",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="chio-writer",
        sasl_password=Secret("pw-from-env"),
    )
    kwargs = seen["kafka"].client_kwargs()
    assert kwargs["sasl_plain_password"] == "pw-from-env"
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert seen["config"].steps == "t.chio.receipts.steps.v1"
    assert seen["config"].partitions == 3
    assert "pw-from-env" not in repr(seen["kafka"])


def test_topics_ensure_without_a_sasl_password_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def unreachable(kafka: KafkaConnection, config: TopicsConfig) -> dict[str, Any]:
        raise AssertionError("must not be called")

    monkeypatch.setattr(cli_streamer, "ensure_topics", unreachable)
    result = CliRunner().invoke(app, ["topics", "ensure", *SASL_FLAGS])
    assert result.exit_code == 2
    assert "SASL" in result.output


def test_watch_takes_the_kafka_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    async def record(temporal: object, streamer_config: Any, *_: Any) -> None:
        seen["kafka"] = streamer_config.kafka

    monkeypatch.setattr(cli_streamer, "_watch", record)
    ca = tmp_path / "ca.pem"
    result = CliRunner().invoke(
        app,
        [
            "watch", "--once", "--bootstrap", "b:9093", "--kafka-security-protocol", "ssl",
            "--kafka-ssl-cafile", str(ca), "--state-dir", str(tmp_path / "w"),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["kafka"] == KafkaConnection(
        bootstrap_servers="b:9093", security_protocol="SSL", ssl_cafile=str(ca)
    )


def test_watch_takes_its_lag_window_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[float] = []

    async def record(temporal: object, streamer_config: Any, watcher_config: Any, *_: Any) -> None:
        seen.append(watcher_config.lag_window_s)

    monkeypatch.setattr(cli_streamer, "_watch", record)
    monkeypatch.delenv("CHIO_WATCHER_LAG_WINDOW", raising=False)
    base = ["watch", "--once", "--state-dir", str(tmp_path / "w")]
    runner = CliRunner()
    assert runner.invoke(app, base).exit_code == 0
    assert runner.invoke(app, [*base, "--lag-window-seconds", "120"]).exit_code == 0
    monkeypatch.setenv("CHIO_WATCHER_LAG_WINDOW", "7.5")
    assert runner.invoke(app, base).exit_code == 0
    assert seen == [DEFAULT_LAG_WINDOW_S, 120.0, 7.5]
    refused = runner.invoke(app, [*base, "--lag-window-seconds", "-1"])
    assert refused.exit_code == 2


def test_worker_takes_the_kafka_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    async def record(settings: demo_worker.WorkerSettings, stop: object) -> None:
        seen["kafka"] = settings.kafka

    monkeypatch.setattr(demo_worker, "run_worker", record)
    monkeypatch.setenv("CHIO_KAFKA_SASL_PASSWORD", "pw-from-env")
    monkeypatch.setenv("CHIO_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(
        app, ["worker", *SASL_FLAGS, "--default-capability", "cap-1", "--task-queue", "q"]
    )
    assert result.exit_code == 0, result.output
    assert seen["kafka"].security_protocol == "SASL_PLAINTEXT"
    assert seen["kafka"].sasl_username == "chio-writer"
    assert seen["kafka"].client_kwargs()["sasl_plain_password"] == "pw-from-env"
