"""Fault-suite fixtures and the summary table printed at the end of the session."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault matrix table (rows run in this session)."""
    from tests.support.faults.report import RESULTS, table

    if not RESULTS:
        return
    terminalreporter.section("fault matrix")
    for line in table():
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "ClickHouse rows ran against "
        + (
            "the server in CHIO_TEST_CLICKHOUSE_DSN"
            if os.environ.get("CHIO_TEST_CLICKHOUSE_DSN")
            else "embedded chDB, ClickHouse faults injected with failpoints in the sink"
        )
    )


@pytest.fixture
async def make_pipeline(
    stack: Any, temporal_client: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Any]]:
    """make_pipeline(**options) -> a started-nothing Pipeline on the session stack."""
    from tests.support.faults.pipeline import Pipeline, PipelineOptions, clickhouse_dsn_for

    made: list[Any] = []

    def make(**options: Any) -> Any:
        name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-24:].strip("-")
        name = f"{name}-{uuid.uuid4().hex[:6]}"
        p = Pipeline(
            tmp_path / f"pipeline-{len(made)}",
            name=name,
            bootstrap=stack.kafka_bootstrap,
            temporal_address=stack.temporal_address,
            client=temporal_client,
            dsn=clickhouse_dsn_for(tmp_path / f"pipeline-{len(made)}"),
            options=PipelineOptions(**options),
        )
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()
