"""Crash between insert and commit, the query/verify tools, and the example queries."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from chio_receipts.cli_consumers import register
from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ReceiptBuilderService,
    chdb_path,
    open_client,
    owner_pid,
    verify_run,
)
from chio_receipts.consumers._clickhouse import split_statements
from chio_receipts.schemas import KafkaConnection, KeyPair, TopicNames
from tests.support.consumer_factory import completion, completion_value, signed_run
from tests.support.helpers import eventually
from tests.support.kafka_topics import make_topics, produce

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
WORKER = KeyPair.from_seed("worker-crash", b"\x01" * 32)
BUILDER_SEED = b"\x02" * 32
BUILDER = KeyPair.from_seed("builder-crash", BUILDER_SEED)
KEYS = {WORKER.key_id: WORKER.public_key, BUILDER.key_id: BUILDER.public_key}


def _files(tmp_path: Path) -> tuple[Path, Path]:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps({"keys": [{"key_id": WORKER.key_id, "public_key": WORKER.public_key.hex()}]})
    )
    builder = tmp_path / "builder-key.json"
    builder.write_text(json.dumps({"key_id": BUILDER.key_id, "seed": BUILDER_SEED.hex()}))
    return keys, builder


def _child(
    bootstrap: str, dsn: str, topics: TopicNames, tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    keys, builder = _files(tmp_path)
    args = [
        sys.executable, "-m", "chio_receipts.cli_consumers", "consume",
        "--bootstrap", bootstrap, "--dsn", dsn, "--keys", str(keys),
        "--builder-key", str(builder), "--group", f"g-{topics.steps}",
        "--steps-topic", topics.steps, "--runs-topic", topics.runs,
        "--envelopes-topic", topics.envelopes, "--dlq-topic", topics.dlq,
    ]  # fmt: skip
    return subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _produce_runs(
    bootstrap: str, topics: TopicNames, prefix: str, n: int, steps: int
) -> None:
    step_msgs, run_msgs = [], []
    for r in range(n):
        wf, rid = f"{prefix}-{r}", "run-1"
        key = f"default/{wf}/{rid}".encode()
        step_msgs += [(key, w, None) for _, w in signed_run(WORKER, wf, rid, steps, deny=(1,))]
        run_msgs.append((key, completion_value(completion(wf, rid, expected=steps)), None))
    await produce(bootstrap, topics.steps, step_msgs)
    await produce(bootstrap, topics.runs, run_msgs)


def _config(bootstrap: str, dsn: str, topics: TopicNames) -> BuilderConfig:
    return BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=bootstrap),
        clickhouse=ClickHouseConfig(dsn=dsn),
        builder_key=BUILDER,
        public_keys={WORKER.key_id: WORKER.public_key},
        topics=topics,
        group_id=f"g-{topics.steps}",
        poll_timeout_ms=100,
    )


async def _consume_until(config: BuilderConfig, sql: str, expected: Any) -> None:
    """Run the builder in this process until ``sql`` returns ``expected``, then stop it."""
    stop = asyncio.Event()
    async with ReceiptBuilderService(config) as service:
        task = asyncio.create_task(service.run(stop))

        async def done() -> bool:
            if task.done():
                task.result()
            _, rows = await service.sink.query(sql)
            return rows[0][0] == expected

        try:
            await eventually(done, timeout=60)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


async def _wait(proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


async def test_kill_9_between_insert_and_commit_leaves_no_duplicates(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    await _produce_runs(kafka_bootstrap, topics, unique("crash"), 20, 5)
    child = _child(
        kafka_bootstrap,
        clickhouse_dsn,
        topics,
        tmp_path,
        {"CHIO_FAILPOINT": "consumer.after_insert_before_commit"},
    )
    code = await _wait(child)
    assert code == 137, child.stderr.read().decode() if child.stderr else code
    # Restart: everything the dead process inserted is replayed from the last commit.
    await _consume_until(
        _config(kafka_bootstrap, clickhouse_dsn, topics),
        "SELECT count() FROM workflow_receipts FINAL",
        20,
    )
    client = open_client(clickhouse_dsn)
    try:
        for final in ("", "FINAL"):
            rows = client.query(
                f"SELECT count(), uniqExact(receipt_id) FROM step_receipts {final}"
            ).result_rows
            assert rows == [(100, 100)], final
            envs = client.query(
                f"SELECT count(), uniqExact(workflow_id, run_id) FROM workflow_receipts {final}"
            ).result_rows
            assert envs == [(20, 20)], final
    finally:
        client.close()


async def test_query_verify_and_tampering(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    prefix = unique("tools")
    await _produce_runs(kafka_bootstrap, topics, prefix, 4, 3)
    await _consume_until(
        _config(kafka_bootstrap, clickhouse_dsn, topics),
        "SELECT count() FROM workflow_receipts",
        4,
    )
    keys_file, builder_file = _files(tmp_path)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    common = ["--dsn", clickhouse_dsn]
    result = runner.invoke(app, ["query", "SELECT count() AS n FROM step_receipts", *common])
    assert result.exit_code == 0, result.output
    assert "12" in result.output
    verify_args = ["--keys", str(keys_file), "--builder-key", str(builder_file), *common]
    result = runner.invoke(app, ["verify", "--workflow-id", f"{prefix}-0", *verify_args])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK")

    client = open_client(clickhouse_dsn)
    try:
        sync = {"mutations_sync": 2}
        rid = client.query(
            "SELECT toString(receipt_id) FROM step_receipts WHERE workflow_id = {w:String} "
            "ORDER BY toString(receipt_id) LIMIT 1",
            parameters={"w": f"{prefix}-1"},
        ).result_rows[0][0]
        client.command(
            f"ALTER TABLE step_receipts UPDATE reason = 'edited' WHERE receipt_id = '{rid}'",
            settings=sync,
        )
        report = verify_run(client, f"{prefix}-1", keys=KEYS)
        assert not report.ok
        assert any(f"receipt {rid}" in p and "field reason changed" in p for p in report.problems)

        victim = client.query(
            "SELECT toString(receipt_id) FROM step_receipts WHERE workflow_id = {w:String} "
            "AND activity_id = '0'",
            parameters={"w": f"{prefix}-2"},
        ).result_rows[0][0]
        client.command(
            f"ALTER TABLE step_receipts DELETE WHERE receipt_id = '{victim}'", settings=sync
        )
        report = verify_run(client, f"{prefix}-2", keys=KEYS)
        assert any(f"step {victim} has no row (deleted)" in p for p in report.problems)
        assert any("refers to previous step" in p for p in report.problems)

        client.command(
            "ALTER TABLE workflow_receipts UPDATE receipt_ids = arrayReverse(receipt_ids) "
            "WHERE workflow_id = {w:String}",
            parameters={"w": f"{prefix}-3"},
            settings=sync,
        )
        report = verify_run(client, f"{prefix}-3", keys=KEYS)
        assert any("not in receipt-id order" in p for p in report.problems)
        assert any("chain_root does not match" in p for p in report.problems)
        assert verify_run(client, f"{prefix}-0", keys=KEYS).ok
    finally:
        client.close()
    result = runner.invoke(app, ["verify", "--workflow-id", f"{prefix}-1", *verify_args])
    assert result.exit_code == 1
    assert "field reason changed" in result.output
    assert "Traceback" not in result.output


async def test_example_queries_all_run(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    await _produce_runs(kafka_bootstrap, topics, unique("q"), 3, 3)
    await _consume_until(
        _config(kafka_bootstrap, clickhouse_dsn, topics),
        "SELECT count() FROM workflow_receipts",
        3,
    )
    text = (REPO / "consumers" / "sql" / "queries.sql").read_text()
    statements = split_statements(text)
    assert len(statements) >= 8
    client = open_client(clickhouse_dsn)
    try:
        results = {s.split()[1]: client.query(s.rstrip(";")).result_rows for s in statements}
    finally:
        client.close()
    assert all(isinstance(rows, list) for rows in results.values())
    deny = None
    for s, rows in zip(statements, results.values(), strict=True):
        if "deny_rate_hourly" in s:
            deny = rows
    assert deny is not None
    assert sum(r[3] for r in deny) == 9  # total steps
    assert sum(r[4] for r in deny) == 3  # one denial per run


async def test_query_says_when_the_consumer_owns_the_database(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    path = chdb_path(clickhouse_dsn)
    if path is None:
        pytest.skip("only embedded chDB has a single owner")
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    # No read endpoint (with one, `query` reads through it: see test_read_owner.py).
    child = _child(kafka_bootstrap, clickhouse_dsn, topics, tmp_path, {"CHIO_READ_BIND": "off"})
    try:
        await eventually(lambda: owner_pid(path) == child.pid, timeout=60)
        app = typer.Typer()
        register(app)
        result = CliRunner().invoke(app, ["query", "SELECT 1", "--dsn", clickhouse_dsn])
        assert result.exit_code == 2
        assert f"pid {child.pid}" in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert "Traceback" not in result.output
    finally:
        child.send_signal(signal.SIGTERM)
        assert await _wait(child, 60) == 0


@pytest.mark.integration
def test_consume_waits_for_an_unreachable_broker_instead_of_exiting(
    clickhouse_dsn: str, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    from chio_receipts.stack import free_port

    topics = TopicNames(
        steps=unique("steps"), runs=unique("runs"), envelopes=unique("env"), dlq=unique("dlq")
    )
    child = _child(f"127.0.0.1:{free_port()}", clickhouse_dsn, topics, tmp_path)
    try:
        deadline = time.monotonic() + 30
        seen = b""
        assert child.stderr is not None
        os.set_blocking(child.stderr.fileno(), False)
        while b"retrying in" not in seen and time.monotonic() < deadline:
            assert child.poll() is None, seen.decode()
            seen += child.stderr.read() or b""
            time.sleep(0.2)
        assert b"retrying in" in seen, seen.decode()
        assert child.poll() is None  # still waiting, not a crash loop
    finally:
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=30)
    assert code == 0
