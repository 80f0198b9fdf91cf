"""Migrations, TTL and deduplicated inserts on ClickHouse (chDB by default)."""

from __future__ import annotations

import pytest

from chio_receipts.consumers import ClickHouseConfig, ClickHouseSink, step_row
from chio_receipts.consumers._clickhouse import migrations
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.schemas import KeyPair
from tests.support.consumer_factory import signed_run

pytestmark = pytest.mark.integration
KEY = KeyPair.generate("worker-sink")


async def test_migrations_are_recorded_once_and_ttl_is_applied(clickhouse_dsn: str) -> None:
    async with ClickHouseSink(ClickHouseConfig(dsn=clickhouse_dsn)) as sink:
        _, first = await sink.query("SELECT version, name FROM schema_migrations ORDER BY version")
    async with ClickHouseSink(ClickHouseConfig(dsn=clickhouse_dsn, ttl_days=30)) as sink:
        _, again = await sink.query("SELECT version, name FROM schema_migrations ORDER BY version")
        _, ddl = await sink.query("SHOW CREATE TABLE step_receipts")
    assert [v for v, _ in first] == [m.version for m in migrations()]
    assert [v for v, _ in first][:4] == [1, 2, 3, 4]
    assert again == first
    assert "TTL" in ddl[0][0]
    assert "toIntervalDay(30)" in ddl[0][0]


async def test_same_token_inserts_once_different_token_twice(clickhouse_dsn: str) -> None:
    rows = [
        step_row(decode_plain(wire).record, wire, 0, i)
        for i, (_, wire) in enumerate(signed_run(KEY, "wf-sink", "r", 3))
    ]
    async with ClickHouseSink(ClickHouseConfig(dsn=clickhouse_dsn)) as sink:
        await sink.insert_steps(rows, "steps:t:0:0-2")
        await sink.insert_steps(rows, "steps:t:0:0-2")
        _, count = await sink.query("SELECT count() FROM step_receipts")
        assert count == [(3,)]
        _, denied = await sink.query("SELECT sum(total) FROM deny_counts_hourly")
        assert denied == [(3,)]  # the deduplicated block did not feed the view again
