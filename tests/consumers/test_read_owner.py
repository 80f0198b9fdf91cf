"""Reading while the builder runs: the owner of an embedded database serves read-only queries.

Real Kafka and chDB throughout. chDB is one engine per process, so every reader here is another
process: a clickhouse-connect HTTP client in a child, and the ``query``/``verify`` CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ClickHouseSink,
    ReadEndpointConfig,
    chdb_path,
    open_reader,
    owner_pid,
    read_endpoint,
)
from chio_receipts.consumers._readendpoint import ENDPOINT_NAME
from chio_receipts.demo._report import read_summary_from
from chio_receipts.schemas import KafkaConnection, KeyPair, Secret, TopicNames
from tests.support.builder_service import Running
from tests.support.consumer_factory import completion, completion_value, signed_run
from tests.support.helpers import eventually
from tests.support.kafka_topics import make_topics, produce

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
WORKER = KeyPair.from_seed("worker-read-owner", b"\x05" * 32)
BUILDER_SEED = b"\x06" * 32
BUILDER = KeyPair.from_seed("builder-read-owner", BUILDER_SEED)

# What a ClickHouse user would run: clickhouse-connect's own HTTP client, nothing of ours.
READER = r"""
import json, sys
import clickhouse_connect
from clickhouse_connect.driver.exceptions import DatabaseError

host, port = sys.argv[1], int(sys.argv[2])
client = clickhouse_connect.get_client(host=host, port=port)
out = {
    "one": client.command("SELECT 1"),
    "steps": client.query(
        "SELECT toString(receipt_id), workflow_id, activity_id, toString(verdict) "
        "FROM step_receipts ORDER BY workflow_id, activity_id"
    ).result_rows,
    "envelopes": client.query(
        "SELECT workflow_id, step_count, deny_count FROM workflow_receipts FINAL "
        "WHERE workflow_id LIKE {p:String} ORDER BY workflow_id",
        parameters={"p": sys.argv[3] + "%"},
    ).result_rows,
    "df_rows": len(client.query_df("SELECT workflow_id FROM step_receipts")),
    "arrow_rows": client.query_arrow("SELECT workflow_id FROM step_receipts").num_rows,
    "refused": {},
}
writes = {
    "insert": "INSERT INTO step_receipts (workflow_id) VALUES ('forged')",
    "drop": "DROP TABLE step_receipts",
    "alter": "ALTER TABLE step_receipts DELETE WHERE 1",
    "set": "SET readonly = 0",
    "truncate": "TRUNCATE TABLE workflow_receipts",
    "multi": "SELECT 1; DROP TABLE step_receipts",
    "outfile": "SELECT * FROM step_receipts INTO OUTFILE 'stolen.tsv'",
    "table_function": "SELECT * FROM file('/etc/hostname', 'LineAsString')",
}
for name, sql in writes.items():
    try:
        client.command(sql)
        out["refused"][name] = None
    except DatabaseError as exc:
        out["refused"][name] = [exc.code, str(exc)]
try:
    client.insert("step_receipts", [["forged"]], column_names=["workflow_id"])
    out["refused"]["client_insert"] = None
except DatabaseError as exc:
    out["refused"]["client_insert"] = [exc.code, str(exc)]
print(json.dumps(out))
"""


def _runs(prefix: str, n: int, steps: int) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    step_msgs, run_msgs, receipts = [], [], {}
    for r in range(n):
        wf, rid = f"{prefix}-{r}", "run-1"
        key = f"default/{wf}/{rid}".encode()
        run = signed_run(WORKER, wf, rid, steps, deny=(1,))
        receipts[wf] = [signed for signed, _ in run]
        step_msgs += [(key, wire, None) for _, wire in run]
        run_msgs.append((key, completion_value(completion(wf, rid, expected=steps)), None))
    return step_msgs, run_msgs, receipts


def _builder_config(bootstrap: str, dsn: str, topics: TopicNames) -> BuilderConfig:
    return BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=bootstrap),
        clickhouse=ClickHouseConfig(dsn=dsn, read_endpoint=ReadEndpointConfig()),
        builder_key=BUILDER,
        public_keys={WORKER.key_id: WORKER.public_key},
        topics=topics,
        group_id=f"g-{topics.steps}",
        poll_timeout_ms=100,
    )


async def _python(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run ``python args`` in a child without blocking the loop (the owner serves on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _embedded(dsn: str) -> Path:
    path = chdb_path(dsn)
    if path is None:
        pytest.skip("the read endpoint is for an embedded (chDB) database")
    return path


async def test_a_clickhouse_http_client_reads_what_the_builder_wrote_and_cannot_write(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    path = _embedded(clickhouse_dsn)
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    prefix = unique("http")
    steps, runs, receipts = _runs(prefix, 3, 3)
    await produce(kafka_bootstrap, topics.steps, steps)
    await produce(kafka_bootstrap, topics.runs, runs)
    async with Running(_builder_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:
        count = "SELECT count() FROM workflow_receipts FINAL"
        await eventually(lambda: _equals(running.scalar(count), 3), timeout=60)
        endpoint = read_endpoint(path)
        assert endpoint is not None
        assert (endpoint.host, endpoint.pid, endpoint.token_required) == (
            "127.0.0.1",
            os.getpid(),
            False,
        )
        code, out, err = await _python("-c", READER, endpoint.host, str(endpoint.port), prefix)
        assert code == 0, err
        seen = json.loads(out)
        stored_steps = await running.scalar("SELECT count() FROM step_receipts")
        stored_envelopes = await running.scalar("SELECT count() FROM workflow_receipts")
        running.check()

    assert seen["one"] == 1
    produced = sorted(
        [r.receipt_id, wf, r.activity_id, "DENY" if r.activity_id == "1" else "ALLOW"]
        for wf, run in receipts.items()
        for r in run
    )
    assert sorted(seen["steps"]) == produced
    assert seen["envelopes"] == [[f"{prefix}-{r}", 3, 1] for r in range(3)]
    assert seen["df_rows"] == seen["arrow_rows"] == 9
    reasons = {
        "insert": "not INSERT",
        "drop": "not DROP",
        "alter": "not ALTER",
        "set": "not SET",
        "truncate": "not TRUNCATE",
        "multi": "multi-statements are not allowed",
        "outfile": "INTO OUTFILE is not allowed",
        "table_function": "Cannot execute query in readonly mode",  # ClickHouse's own refusal
        "client_insert": "not INSERT",
    }
    for name, says in reasons.items():
        refused = seen["refused"][name]
        assert refused is not None, f"{name} was not refused"
        assert refused[0] == 164, refused
        assert says in refused[1], refused
        assert "READONLY" in refused[1]
    # Nothing changed, and nothing was written next to the database either.
    assert (stored_steps, stored_envelopes) == (9, 3)
    assert not list(REPO.glob("stolen.tsv"))
    assert not (path / ENDPOINT_NAME).exists()  # withdrawn on a clean stop


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_token_guards_the_endpoint(clickhouse_dsn: str, tmp_path: Path) -> None:
    path = _embedded(clickhouse_dsn)
    token = "t0ken-" + os.urandom(8).hex()
    config = ClickHouseConfig(
        dsn=clickhouse_dsn, read_endpoint=ReadEndpointConfig(token=Secret(token))
    )
    async with ClickHouseSink(config) as sink:
        assert sink.reader is not None
        endpoint = read_endpoint(path)
        assert endpoint is not None
        assert endpoint.token_required
        assert token not in (path / ENDPOINT_NAME).read_text()
        cli = ["-m", "chio_receipts.cli_consumers", "query", "SELECT 41 + 1 AS n"]
        cli += ["--format", "jsonl", "--dsn", clickhouse_dsn]
        env = {"CHIO_READ_TOKEN": ""}
        code, out, err = await _python(*cli, env=env)
        assert code == 2
        assert "CHIO_READ_TOKEN" in err
        assert token not in err
        code, out, err = await _python(*cli, env={"CHIO_READ_TOKEN": "wrong"})
        assert code == 2
        assert "516" in err
        assert "Authentication failed" in err
        code, out, err = await _python(*cli, env={"CHIO_READ_TOKEN": token})
        assert code == 0, err
        assert json.loads(out) == {"n": 42}
        token_file = tmp_path / "read-token"
        token_file.write_text(token + "\n")
        code, out, err = await _python(*cli, "--read-token-file", str(token_file), env=env)
        assert code == 0, err
        # X-ClickHouse-Key, as other ClickHouse clients send it.
        http = (
            "import sys, urllib.request\n"
            "req = urllib.request.Request(f'http://{sys.argv[1]}:{sys.argv[2]}/?query=SELECT%207',"
            " headers={'X-ClickHouse-Key': sys.argv[3]})\n"
            "print(urllib.request.urlopen(req).read().decode().strip())\n"
        )
        code, out, err = await _python("-c", http, endpoint.host, str(endpoint.port), token)
        assert (code, out.strip()) == (0, "7"), err


def _consume(
    bootstrap: str, dsn: str, topics: TopicNames, tmp_path: Path
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps({"keys": [{"key_id": WORKER.key_id, "public_key": WORKER.public_key.hex()}]})
    )
    builder = tmp_path / "builder-key.json"
    builder.write_text(json.dumps({"key_id": BUILDER.key_id, "seed": BUILDER_SEED.hex()}))
    args = [
        sys.executable, "-m", "chio_receipts.cli_consumers", "consume",
        "--bootstrap", bootstrap, "--dsn", dsn, "--keys", str(keys),
        "--builder-key", str(builder), "--group", f"g-{topics.steps}",
        "--steps-topic", topics.steps, "--runs-topic", topics.runs,
        "--envelopes-topic", topics.envelopes, "--dlq-topic", topics.dlq,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHIO_READ_")}
    child = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return child, keys, builder


async def test_query_verify_and_the_report_read_through_the_running_builder(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    _embedded(clickhouse_dsn)
    data_dir = tmp_path / "data"
    dsn = f"chdb://{data_dir / 'clickhouse'}"  # the default DSN of CHIO_DATA_DIR=data_dir
    path = _embedded(dsn)
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    prefix = unique("cli")
    steps, runs, _ = _runs(prefix, 3, 3)
    await produce(kafka_bootstrap, topics.steps, steps)
    await produce(kafka_bootstrap, topics.runs, runs)
    child, keys, builder = _consume(kafka_bootstrap, dsn, topics, tmp_path)

    def envelopes() -> int:
        client = open_reader(dsn)  # through the child's endpoint once it serves
        try:
            return int(client.command("SELECT count() FROM workflow_receipts FINAL"))
        finally:
            client.close()

    async def written() -> bool:
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
        if owner_pid(path) != child.pid or read_endpoint(path) is None:
            return False
        return await asyncio.to_thread(envelopes) == 3

    sql = (
        "SELECT workflow_id, activity_id, verdict, scope, evaluated_at, prev_hash "
        f"FROM step_receipts WHERE startsWith(workflow_id, '{prefix}') "
        "ORDER BY workflow_id, activity_id"
    )
    verify = ["verify", "--workflow-id", f"{prefix}-1", "--keys", str(keys)]
    commands = {
        "table": ["query", sql],
        "json": ["query", sql, "--format", "json"],
        "csv": ["query", sql, "--format", "csv"],
        "verify": [*verify, "--builder-key", str(builder)],
    }
    env = {"CHIO_DATA_DIR": str(data_dir), "CHIO_CLICKHOUSE_DSN": "", "COLUMNS": "200"}
    module = ["-m", "chio_receipts.cli_consumers"]
    run_ids = ["run-1"]
    try:
        await eventually(written, timeout=90, interval=0.5)
        endpoint = read_endpoint(path)
        assert endpoint is not None
        assert endpoint.pid == child.pid
        live = {}
        for name, args in commands.items():
            code, out, err = await _python(*module, *args, env=env)
            assert code == 0, (name, err)
            live[name] = out
        code, out, err = await _python(*module, "query", "DROP TABLE step_receipts", env=env)
        assert code == 2
        assert "not DROP" in err
        assert len(err.strip().splitlines()) == 1
        live_summary = await read_summary_from(dsn, run_ids)
    finally:
        child.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(child.wait, 60) == 0
    assert not (path / ENDPOINT_NAME).exists()

    assert live["verify"].startswith("OK")
    documents = json.loads(live["json"])
    assert len(documents) == 9
    assert sorted({d["workflow_id"] for d in documents}) == [f"{prefix}-{r}" for r in range(3)]
    for name, args in commands.items():  # the same output read directly, the builder stopped
        code, out, err = await _python(*module, *args, env=env)
        assert code == 0, (name, err)
        assert out == live[name], name
    direct_summary = await read_summary_from(dsn, run_ids)
    assert live_summary.step_rows == 9
    assert live_summary == direct_summary


# Raw HTTP, as any ClickHouse HTTP client speaks it: (method, path, body, headers).
PROBES = r"""
import json, sys, urllib.error, urllib.request
base = f"http://{sys.argv[1]}:{sys.argv[2]}"
probes = json.loads(sys.stdin.read())
out = {}
for name, (method, path, body, headers) in probes.items():
    data = body.encode("latin-1") if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req) as resp:
            out[name] = [resp.status, dict(resp.headers), resp.read().decode()]
    except urllib.error.HTTPError as err:
        out[name] = [err.code, dict(err.headers), err.read().decode()]
    out[name][1] = {k.lower(): v for k, v in out[name][1].items()}  # names are case-blind
print(json.dumps(out))
"""

_FORM = (
    '--b\r\nContent-Disposition: form-data; name="query"\r\n\r\nSELECT {x:String} AS x\r\n'
    '--b\r\nContent-Disposition: form-data; name="param_x"\r\n\r\nfrom a form\r\n--b--\r\n'
)


async def test_the_http_protocol_answers_like_clickhouse_and_never_500(
    clickhouse_dsn: str,
) -> None:
    path = _embedded(clickhouse_dsn)
    form = {"Content-Type": "multipart/form-data; boundary=b"}
    probes: dict[str, tuple[str, str, str | None, dict[str, str]]] = {
        "ping": ("GET", "/ping", None, {}),
        "root": ("GET", "/", None, {}),
        "get": ("GET", "/?query=SELECT%2040%2B2%20AS%20n&query_id=q-1", None, {}),
        "json": ("POST", "/?default_format=JSONEachRow", "SELECT 1 AS a, 'x' AS b", {}),
        "own_format": ("POST", "/", "SELECT 7 AS s FORMAT CSVWithNames", {}),
        "form": ("POST", "/", _FORM, form),
        "same_setting": ("POST", "/?readonly=1", "SELECT 3", {}),
        "database": ("POST", "/?database=system", "SELECT currentDatabase()", {}),
        "empty": ("POST", "/", "", {}),
        "unterminated": ("POST", "/", "SELECT 'open", {}),
        "syntax": ("POST", "/", "SELECT FROM WHERE", {}),
        "unknown_table": ("POST", "/", "SELECT * FROM no_such_table", {}),
        "unknown_database": ("POST", "/?database=nope", "SELECT 1", {}),
        "changed_setting": ("POST", "/?max_threads=1", "SELECT 1", {}),
        "unknown_setting": ("POST", "/?no_such_setting=1", "SELECT 1", {}),
        "bad_format": ("POST", "/?default_format=Dataframe", "SELECT 1", {}),
        "not_utf8": ("POST", "/", "SELECT '\xff'", {}),
        "big": ("POST", "/", "SELECT '" + "x" * (1024 * 1024 + 10) + "'", {}),
        "encoding": ("POST", "/", "SELECT 1", {"Content-Encoding": "xz"}),
        "bad_gzip": ("POST", "/", "SELECT 1", {"Content-Encoding": "gzip"}),
        "file_part": ("POST", "/", _FORM.replace('name="param_x"', 'name="t"; filename="t"'), form),
        "path": ("GET", "/replicas_status", None, {}),
        "method": ("PUT", "/", "SELECT 1", {}),
        "insert": (
            "POST",
            "/?query=INSERT%20INTO%20step_receipts%20FORMAT%20Native",
            "\x00\xff",
            {},
        ),
    }
    async with ClickHouseSink(
        ClickHouseConfig(dsn=clickhouse_dsn, read_endpoint=ReadEndpointConfig())
    ) as sink:
        assert sink.reader is not None
        endpoint = read_endpoint(path)
        assert endpoint is not None
        code, out, err = await _python(
            "-c", PROBES, endpoint.host, str(endpoint.port), stdin=json.dumps(probes).encode()
        )
    assert code == 0, err
    seen = json.loads(out)
    assert seen["ping"][0] == seen["root"][0] == 200
    assert seen["ping"][2] == seen["root"][2] == "Ok.\n"
    status, headers, body = seen["get"]
    assert (status, body) == (200, "42\n")
    assert headers["x-clickhouse-query-id"] == "q-1"
    assert headers["x-clickhouse-format"] == "TabSeparated"
    assert headers["x-clickhouse-timezone"]
    assert headers["x-clickhouse-server-display-name"]
    assert json.loads(headers["x-clickhouse-summary"])["read_rows"] == "1"
    assert seen["json"][:1] == [200]
    assert json.loads(seen["json"][2]) == {"a": 1, "b": "x"}
    assert seen["json"][1]["x-clickhouse-format"] == "JSONEachRow"
    assert seen["own_format"][2] == '"s"\n7\n'
    assert seen["own_format"][1]["x-clickhouse-format"] == "CSVWithNames"
    assert seen["form"][:3:2] == [200, "from a form\n"]
    assert seen["same_setting"][:3:2] == [200, "3\n"]
    assert seen["database"][:3:2] == [200, "system\n"]
    expected = {
        "empty": (400, 62, "empty query"),
        "unterminated": (400, 62, "unterminated quoted text"),
        "syntax": (400, 62, "SYNTAX_ERROR"),
        "unknown_table": (404, 60, "UNKNOWN_TABLE"),
        "unknown_database": (404, 81, "UNKNOWN_DATABASE"),
        "changed_setting": (403, 164, "Cannot modify 'max_threads' setting in readonly mode"),
        "unknown_setting": (404, 115, "Unknown setting 'no_such_setting'"),
        "bad_format": (404, 73, "Unknown format Dataframe"),
        "not_utf8": (400, 62, "not UTF-8"),
        "big": (413, 62, "request larger than"),
        "encoding": (415, 48, "Content-Encoding xz"),
        "bad_gzip": (400, 62, "cannot decode the gzip body"),
        "file_part": (400, 48, "external data is not supported"),
        "path": (404, 1, "There is no handle /replicas_status"),
        "method": (405, 1, "HTTP method PUT"),
        "insert": (403, 164, "not INSERT"),
    }
    for name, (want_status, want_code, says) in expected.items():
        status, headers, body = seen[name]
        assert (status, headers.get("x-clickhouse-exception-code")) == (
            want_status,
            str(want_code),
        ), (name, body)
        assert body.startswith(f"Code: {want_code}. DB::Exception: "), (name, body)
        assert says in body, (name, body)
