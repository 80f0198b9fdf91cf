"""``topics ensure`` and ``watch --once`` through the CLI against the real local stack."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from chio_receipts.cli_streamer import register

pytestmark = pytest.mark.integration


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_topics_ensure_and_watch_once(
    kafka_bootstrap: str, temporal_address: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    prefix = unique("cli") + "."
    runner = CliRunner()
    args = ["topics", "ensure", "--bootstrap", kafka_bootstrap, "--prefix", prefix]
    first = runner.invoke(_app(), [*args, "--partitions", "2"])
    assert first.exit_code == 0, first.output
    assert f"{prefix}chio.receipts.steps.v1" in first.output
    assert "created" in first.output
    second = runner.invoke(_app(), [*args, "--partitions", "2"])
    assert second.exit_code == 0, second.output
    assert "created" not in second.output

    watched = runner.invoke(
        _app(),
        [
            "watch", "--once", "--bootstrap", kafka_bootstrap,
            "--temporal-address", temporal_address,
            "--prefix", prefix, "--state-dir", str(tmp_path / "w"),
            "--query-filter", f'TaskQueue = "{unique("none")}"',
        ],
    )  # fmt: skip
    assert watched.exit_code == 0, watched.output
    assert "emitted 0 run completions" in watched.output
    assert (tmp_path / "w" / "checkpoint.json").exists()
