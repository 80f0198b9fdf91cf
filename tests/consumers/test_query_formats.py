"""``query --format`` on a real chDB database written by the real sink, and its default DSN."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from chio_receipts.cli_consumers import register
from chio_receipts.consumers import ClickHouseConfig, ClickHouseSink, chdb_path, step_row
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.schemas import KeyPair
from tests.support.consumer_factory import signed_run

pytestmark = pytest.mark.integration
KEY = KeyPair.from_seed("worker-query", b"\x03" * 32)
SQL = (
    "SELECT workflow_id, activity_id, verdict, scope, "
    "toDateTime64('2024-01-02 03:04:05', 3, 'UTC') AS at, 'a\\tb\\nc' AS odd, "
    "CAST(NULL, 'Nullable(String)') AS nothing "
    "FROM step_receipts ORDER BY activity_id"
)
NAMES = ["workflow_id", "activity_id", "verdict", "scope", "at", "odd", "nothing"]


async def _three_rows(dsn: str) -> None:
    run = signed_run(KEY, "wf-query", "r-1", 3, deny=(1,))
    rows = [step_row(decode_plain(wire).record, wire, 0, i) for i, (_, wire) in enumerate(run)]
    async with ClickHouseSink(ClickHouseConfig(dsn=dsn)) as sink:
        await sink.insert_steps(rows, "steps:query:0:0-2")


def _query(*args: str) -> str:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["query", SQL, *args])
    assert result.exit_code == 0, result.output
    return result.stdout


async def test_every_output_format(clickhouse_dsn: str) -> None:
    await _three_rows(clickhouse_dsn)
    dsn = ["--dsn", clickhouse_dsn]

    documents = json.loads(_query(*dsn, "--format", "json"))
    assert [list(d) for d in documents] == [NAMES] * 3
    assert {d["workflow_id"] for d in documents} == {"wf-query"}
    assert sorted(d["verdict"] for d in documents) == ["ALLOW", "ALLOW", "DENY"]
    assert all(isinstance(d["scope"], list) for d in documents)
    assert documents[0]["at"].startswith("2024-01-02T03:04:05")
    assert documents[0]["odd"] == "a\tb\nc"
    assert documents[0]["nothing"] is None

    lines = _query(*dsn, "--format", "jsonl").splitlines()
    assert [json.loads(line) for line in lines] == documents

    table = list(csv.reader(io.StringIO(_query(*dsn, "--format", "csv"))))
    assert table[0] == NAMES
    assert len(table) == 4
    assert [row[2] for row in table[1:]] == [d["verdict"] for d in documents]
    assert table[1][3] == json.dumps(documents[0]["scope"])
    assert table[1][5] == "a\tb\nc"
    assert table[1][6] == ""

    tsv = _query(*dsn, "--format", "tsv").splitlines()
    assert len(tsv) == 4  # the tab and newline inside a value are escaped
    assert tsv[0].split("\t") == NAMES
    fields = tsv[1].split("\t")
    assert fields[5] == "a\\tb\\nc"
    assert fields[0] == "wf-query"

    text = _query(*dsn)
    assert "wf-query" in text
    assert "3 row(s)" in text


async def test_an_unknown_format_is_a_usage_error(clickhouse_dsn: str) -> None:
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(
        app, ["query", "SELECT 1", "--dsn", clickhouse_dsn, "--format", "xml"]
    )
    assert result.exit_code == 2


async def test_the_default_database_follows_chio_data_dir(
    clickhouse_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = chdb_path(clickhouse_dsn)
    if path is None:
        pytest.skip("the default DSN is the embedded chDB under the data directory")
    await _three_rows(clickhouse_dsn)
    monkeypatch.delenv("CHIO_CLICKHOUSE_DSN", raising=False)
    monkeypatch.setenv("CHIO_DATA_DIR", str(path.parent))
    assert path.name == "clickhouse"
    lines = _query("--format", "jsonl").splitlines()
    assert len(lines) == 3
    monkeypatch.setenv("CHIO_DATA_DIR", str(Path(path.parent, "elsewhere")))
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["query", "SELECT 1"])
    assert result.exit_code == 2
    assert "elsewhere" in result.output
