"""Confluent framing is chosen by configuration, and refused without a registry."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.cli import app

pytestmark = pytest.mark.unit


def _text(output: str) -> str:
    """The CLI's message without the error box's borders and line breaks."""
    return " ".join(output.replace("│", " ").split())


def _config(**kw: object) -> streamer.StreamerConfig:
    return streamer.StreamerConfig(
        kafka=schemas.KafkaConnection(bootstrap_servers="127.0.0.1:1"), spool_dir="spool", **kw
    )


def test_single_object_is_the_default_and_topic_name_strategy_names_subjects() -> None:
    cfg = _config()
    assert cfg.wire_format == "single_object"
    assert cfg.subject_strategy is schemas.SubjectStrategy.TOPIC
    assert schemas.subject_name(cfg.subject_strategy, "t.steps", schemas.STEP_SCHEMA) == (
        "t.steps-value"
    )


def test_confluent_framing_needs_a_registry() -> None:
    with pytest.raises(ValueError, match="registry_url"):
        _config(wire_format="confluent")
    with pytest.raises(ValueError, match="unknown wire format"):
        _config(wire_format="json")


def test_a_configured_streamer_builds_its_own_confluent_codec(tmp_path: object) -> None:
    cfg = _config(
        wire_format="confluent",
        registry_url="http://127.0.0.1:1/apis/ccompat/v7",
        subject_strategy=schemas.SubjectStrategy.TOPIC_RECORD,
    )
    s = streamer.ReceiptStreamer(cfg)
    assert s.codec is not None
    assert s.codec.wire_format == "confluent"
    assert s.codec.registry is not None
    assert s.codec.registry.url == "http://127.0.0.1:1/apis/ccompat/v7"
    assert s.codec.registry.subject("t", "a.B") == "t-a.B"
    assert streamer.ReceiptStreamer(_config()).codec is None


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["watch", "--wire-format", "confluent", "--once"], "--wire-format"),
        (["worker", "--wire-format", "confluent"], "--wire-format"),
        (["consume", "--envelope-wire-format", "confluent"], "--envelope-wire-format"),
    ],
)
def test_cli_refuses_confluent_framing_without_a_registry(
    args: list[str], flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CHIO_SCHEMA_REGISTRY_URL", raising=False)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Confluent framing needs --registry-url" in _text(result.output)
    assert flag in _text(result.output)


def test_cli_reads_the_framing_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIO_WIRE_FORMAT", "confluent")
    monkeypatch.delenv("CHIO_SCHEMA_REGISTRY_URL", raising=False)
    result = CliRunner().invoke(app, ["watch", "--once"])
    assert result.exit_code == 2, result.output
    assert "Confluent framing needs --registry-url" in _text(result.output)
