"""The cluster form of the migrations against a real ClickHouse.

Every generated statement is parsed by ClickHouse's own parser (chDB, or the server in
CHIO_TEST_CLICKHOUSE_DSN). Running them needs a server that is part of a cluster (chDB has no
``ON CLUSTER``): set CHIO_TEST_CLICKHOUSE_DSN and CHIO_TEST_CLICKHOUSE_CLUSTER (a cluster of the
server's ``remote_servers`` with ``{shard}`` and ``{replica}`` macros and Keeper configured).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from chio_receipts.consumers import (
    ClickHouseConfig,
    ClickHouseSink,
    ConfigError,
    open_client,
    step_row,
)
from chio_receipts.consumers._clickhouse import (
    MIGRATIONS_TABLE_DDL,
    cluster_ddl,
    cluster_statements,
    migrations,
)
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.schemas import KeyPair
from tests.support.consumer_factory import signed_run

pytestmark = pytest.mark.integration
KEY = KeyPair.generate("worker-cluster")
SERVER = os.environ.get("CHIO_TEST_CLICKHOUSE_DSN", "")
CLUSTER = os.environ.get("CHIO_TEST_CLICKHOUSE_CLUSTER", "")


def test_clickhouse_parses_every_generated_statement(clickhouse_dsn: str) -> None:
    statements = cluster_ddl(MIGRATIONS_TABLE_DDL, "chio", "receipts")
    for migration in migrations():
        statements += cluster_statements(migration.sql, "chio", "receipts")
    client = open_client(clickhouse_dsn, create=True)
    try:
        for statement in statements:
            formatted = client.command(
                "SELECT formatQuery({q:String})", parameters={"q": statement}
            )
            assert "ON CLUSTER chio" in str(formatted), statement[:200]
    finally:
        client.close()


async def test_a_cluster_on_the_embedded_database_is_refused(tmp_path: Path) -> None:
    sink = ClickHouseSink(ClickHouseConfig(dsn=f"chdb://{tmp_path / 'ch'}", cluster="chio"))
    with pytest.raises(ConfigError, match="needs a ClickHouse server DSN"):
        await sink.start()
    await sink.close()


@pytest.mark.skipif(
    not (SERVER and CLUSTER),
    reason="running the cluster DDL needs a ClickHouse server in a cluster: set "
    "CHIO_TEST_CLICKHOUSE_DSN and CHIO_TEST_CLICKHOUSE_CLUSTER (chDB has no ON CLUSTER)",
)
async def test_cluster_migrations_and_deduplicated_inserts_on_a_server() -> None:
    database = f"chio_cluster_{uuid.uuid4().hex[:8]}"
    dsn = urlparse(SERVER)._replace(path=f"/{database}").geturl()
    admin = open_client(urlparse(SERVER)._replace(path="/default").geturl())
    rows = [
        step_row(decode_plain(wire).record, wire, 0, i)
        for i, (_, wire) in enumerate(signed_run(KEY, "wf-cluster", "r", 3))
    ]
    try:
        config = ClickHouseConfig(dsn=dsn, cluster=CLUSTER, apply_roles=False, ttl_days=30)
        async with ClickHouseSink(config) as sink:  # creates the database on every node
            _, nodes = await sink.query(
                "SELECT count() FROM clusterAllReplicas({c:String}, system.databases) "
                "WHERE name = currentDatabase()",
                {"c": CLUSTER},
            )
            _, replicas = await sink.query(
                "SELECT count() FROM system.clusters WHERE cluster = {c:String}", {"c": CLUSTER}
            )
            assert nodes == replicas
            _, engines = await sink.query(
                "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
            )
            by_name = dict(engines)
            for table in ("step_receipts", "workflow_receipts", "step_outcomes"):
                assert by_name[table] == "Distributed"
                assert by_name[f"{table}_local"].startswith("Replicated")
            assert by_name["schema_migrations_local"] == "ReplicatedReplacingMergeTree"
            await sink.insert_steps(rows, "steps:t:0:0-2")
            await sink.insert_steps(rows, "steps:t:0:0-2")
            _, count = await sink.query(
                "SELECT count() FROM step_receipts SETTINGS prefer_localhost_replica = 1"
            )
            assert count == [(3,)]
            _, counted = await sink.query("SELECT sum(total) FROM deny_counts_hourly")
            assert counted == [(3,)]  # the view fired on the local table, once
            _, ddl = await sink.query("SHOW CREATE TABLE step_receipts_local")
            assert "toIntervalDay(30)" in ddl[0][0]
            assert "replicated_deduplication_window = 10000" in ddl[0][0]
            _, versions = await sink.query("SELECT version FROM schema_migrations FINAL")
            assert sorted(v for (v,) in versions) == [m.version for m in migrations()]
        async with ClickHouseSink(config) as sink:  # applied again: nothing to do
            _, again = await sink.query("SELECT count() FROM schema_migrations")
            assert again == [(len(migrations()),)]
        single = ClickHouseSink(ClickHouseConfig(dsn=dsn, apply_roles=False))
        with pytest.raises(ConfigError, match="migrated for a cluster"):
            await single.start()
        await single.close()
    finally:
        admin.command(f"DROP DATABASE IF EXISTS {database} ON CLUSTER '{CLUSTER}' SYNC")
        admin.close()
