"""The cluster form of the migrations (``--cluster``): exact statements for representative
ones, and properties over every shipped migration file."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from chio_receipts.consumers._clickhouse import (
    DEDUP_WINDOW_SECONDS,
    MIGRATIONS_TABLE_DDL,
    ClickHouseConfig,
    cluster_ddl,
    cluster_role_ddl,
    cluster_statements,
    migrations,
    split_statements,
)

pytestmark = pytest.mark.unit

CLUSTER = "chio"
DB = "receipts"


def _all_statements() -> list[tuple[str, str]]:
    """(source statement, generated statement) over every migration and schema_migrations."""
    pairs = [(MIGRATIONS_TABLE_DDL, out) for out in cluster_ddl(MIGRATIONS_TABLE_DDL, CLUSTER, DB)]
    for migration in migrations():
        for statement in split_statements(migration.sql):
            pairs += [(statement, out) for out in cluster_ddl(statement, CLUSTER, DB)]
    return pairs


def _tables() -> dict[str, str]:
    """Every table the single-node DDL creates, with its source statement."""
    found = {"schema_migrations": MIGRATIONS_TABLE_DDL}
    for migration in migrations():
        for statement in split_statements(migration.sql):
            m = re.match(r"CREATE TABLE IF NOT EXISTS (\w+)", statement)
            if m:
                found[m.group(1)] = statement
    return found


def _migration(version: int) -> str:
    (found,) = [m.sql for m in migrations() if m.version == version]
    return found


def test_a_table_becomes_a_replicated_local_table_and_a_distributed_one() -> None:
    statements = cluster_statements(_migration(2), CLUSTER, DB)
    assert statements[0] == (
        "CREATE TABLE IF NOT EXISTS deny_counts_hourly_local ON CLUSTER 'chio'\n(\n"
        "    hour         DateTime('UTC'),\n"
        "    tool_server  LowCardinality(String),\n"
        "    tool         LowCardinality(String),\n"
        "    total        UInt64,\n"
        "    denied       UInt64\n)\n"
        "ENGINE = ReplicatedSummingMergeTree("
        "'/clickhouse/tables/{shard}/{database}/deny_counts_hourly_local', '{replica}')\n"
        "PARTITION BY toYYYYMM(hour)\n"
        "ORDER BY (hour, tool_server, tool)\n"
        "SETTINGS replicated_deduplication_window = 10000, "
        "replicated_deduplication_window_seconds = 604800"
    )
    assert statements[1] == (
        "CREATE TABLE IF NOT EXISTS deny_counts_hourly ON CLUSTER 'chio' "
        "AS deny_counts_hourly_local\n"
        "ENGINE = Distributed('chio', receipts, deny_counts_hourly_local)"
    )


def test_the_materialized_view_fires_on_the_local_table_and_fills_the_local_table() -> None:
    statements = cluster_statements(_migration(2), CLUSTER, DB)
    assert statements[2] == (
        "CREATE MATERIALIZED VIEW IF NOT EXISTS deny_counts_hourly_mv ON CLUSTER 'chio' "
        "TO deny_counts_hourly_local AS\n"
        "SELECT\n"
        "    toStartOfHour(evaluated_at) AS hour,\n"
        "    tool_server,\n"
        "    tool,\n"
        "    count() AS total,\n"
        "    countIf(verdict = 'DENY') AS denied\n"
        "FROM step_receipts_local\n"
        "GROUP BY hour, tool_server, tool"
    )


def test_add_column_applies_to_the_local_and_the_distributed_table() -> None:
    assert cluster_statements(_migration(4), CLUSTER, DB) == [
        "ALTER TABLE step_receipts_local ON CLUSTER 'chio' "
        "ADD COLUMN IF NOT EXISTS trace_id String CODEC(ZSTD(1)) AFTER chio_signed,\n"
        "    ADD COLUMN IF NOT EXISTS span_id String CODEC(ZSTD(1)) AFTER trace_id",
        "ALTER TABLE step_receipts ON CLUSTER 'chio' "
        "ADD COLUMN IF NOT EXISTS trace_id String CODEC(ZSTD(1)) AFTER chio_signed,\n"
        "    ADD COLUMN IF NOT EXISTS span_id String CODEC(ZSTD(1)) AFTER trace_id",
    ]


def test_the_version_column_of_a_replacing_table_is_kept() -> None:
    local, distributed = cluster_ddl(_tables()["workflow_receipts"], CLUSTER, DB)
    assert (
        "ENGINE = ReplicatedReplacingMergeTree("
        "'/clickhouse/tables/{shard}/{database}/workflow_receipts_local', '{replica}', revision)"
    ) in local
    assert distributed.endswith(
        "ENGINE = Distributed('chio', receipts, workflow_receipts_local, "
        "cityHash64(namespace, workflow_id, run_id))"
    )


def test_other_alters_apply_to_the_local_table_only() -> None:
    ttl = "ALTER TABLE step_receipts MODIFY TTL toDateTime(evaluated_at) + INTERVAL 30 DAY"
    assert cluster_ddl(ttl, CLUSTER, DB) == [
        "ALTER TABLE step_receipts_local ON CLUSTER 'chio' "
        "MODIFY TTL toDateTime(evaluated_at) + INTERVAL 30 DAY"
    ]


def test_column_changes_follow_on_the_distributed_table_and_mixed_alters_are_refused() -> None:
    modify = "ALTER TABLE step_outcomes MODIFY COLUMN error_type String"
    assert [o.split(" ON CLUSTER")[0] for o in cluster_ddl(modify, CLUSTER, DB)] == [
        "ALTER TABLE step_outcomes_local",
        "ALTER TABLE step_outcomes",
    ]
    mixed = "ALTER TABLE step_outcomes ADD COLUMN x String, MODIFY TTL toDateTime(ended_at)"
    with pytest.raises(ValueError, match="two statements"):
        cluster_ddl(mixed, CLUSTER, DB)


def test_every_statement_runs_on_the_cluster() -> None:
    pairs = _all_statements()
    assert len(pairs) > 20
    for _, out in pairs:
        assert re.match(r"(CREATE|ALTER) ", out), out[:200]
        assert " ON CLUSTER 'chio'" in out.split("\n")[0], out[:200]
        assert out.count("ON CLUSTER") == 1, out[:200]


def test_no_table_stays_non_replicated() -> None:
    for _, out in _all_statements():
        for engine in re.findall(r"ENGINE = (\w+)", out):
            assert engine == "Distributed" or engine.startswith("Replicated"), out[:200]
            if engine.startswith("Replicated"):
                assert "MergeTree" in engine
        assert "non_replicated_deduplication_window" not in out


def test_every_local_table_keeps_the_deduplication_window_of_the_single_node_table() -> None:
    for name, source in _tables().items():
        local, _ = cluster_ddl(source, CLUSTER, DB)
        single = re.search(r"non_replicated_deduplication_window = (\d+)", source)
        window = single.group(1) if single else "10000"
        assert f"replicated_deduplication_window = {window}," in local, name
        assert f"replicated_deduplication_window_seconds = {DEDUP_WINDOW_SECONDS}" in local
        assert f"/{{database}}/{name}_local', '{{replica}}'" in local


def test_every_table_has_a_distributed_table_under_its_own_name() -> None:
    generated = [out for _, out in _all_statements()]
    for name, source in _tables().items():
        distributed = [
            out
            for out in generated
            if out.startswith(f"CREATE TABLE IF NOT EXISTS {name} ON CLUSTER")
        ]
        assert len(distributed) == 1, name
        assert (
            f"AS {name}_local\nENGINE = Distributed('chio', receipts, {name}_local"
            in (distributed[0])
        )
        sharded = "run_id" in source
        assert distributed[0].endswith("cityHash64(namespace, workflow_id, run_id))") is sharded


def test_views_read_the_distributed_tables() -> None:
    local_names = [f"{name}_local" for name in _tables()]
    for source, out in _all_statements():
        if re.match(r"CREATE (OR REPLACE )?VIEW", source):
            assert not any(local in out for local in local_names), out[:200]
            expected = source.strip().rstrip(";").strip()
            assert out.replace(" ON CLUSTER 'chio'", "", 1) == expected


def test_every_column_added_to_a_table_is_added_on_both_tables() -> None:
    for source, _ in _all_statements():
        if not source.startswith("ALTER TABLE"):
            continue
        table = source.split()[2]
        outs = cluster_ddl(source, CLUSTER, DB)
        assert [o.split(" ON CLUSTER")[0] for o in outs] == [
            f"ALTER TABLE {table}_local",
            f"ALTER TABLE {table}",
        ]


def test_roles_are_granted_on_the_cluster_and_on_the_local_tables() -> None:
    text = resources.files("chio_receipts.consumers").joinpath("sql", "roles.sql").read_text()
    out = [
        o for s in split_statements(text.replace("{db}", DB)) for o in cluster_role_ddl(s, CLUSTER)
    ]
    assert "CREATE ROLE IF NOT EXISTS chio_writer ON CLUSTER 'chio'" in out
    assert "GRANT ON CLUSTER 'chio' INSERT ON receipts.step_receipts_local TO chio_writer" in out
    assert "GRANT ON CLUSTER 'chio' chio_writer TO chio_builder" in out
    assert "GRANT ON CLUSTER 'chio' SELECT ON receipts.* TO chio_analyst" in out
    assert all("ON CLUSTER 'chio'" in o for o in out)


@pytest.mark.parametrize("bad", ["", "a b", "x'; DROP", "c)"])
def test_a_cluster_name_that_is_not_a_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cluster name"):
        ClickHouseConfig(dsn="http://localhost:8123/db", cluster=bad)
    with pytest.raises(ValueError, match="cluster name"):
        cluster_ddl(MIGRATIONS_TABLE_DDL, bad, DB)
