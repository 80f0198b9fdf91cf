"""The read endpoint's pure parts: the statement check, the HTTP status of an error code, the
bind option, and the advertised endpoint file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chio_receipts.consumers import ConfigError
from chio_receipts.consumers._readendpoint import (
    ENDPOINT_NAME,
    ReadEndpoint,
    ReadEndpointConfig,
    parse_read_bind,
    pid_alive,
    read_endpoint,
    remove_endpoint,
    write_endpoint,
)
from chio_receipts.consumers._readserver import http_status
from chio_receipts.consumers._readsql import Refused, check_read
from chio_receipts.schemas import Secret

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("sql", "keyword", "fmt"),
    [
        ("SELECT 1", "SELECT", None),
        ("  select count() from step_receipts;  ", "SELECT", None),
        ("SELECT 1;\n-- trailing comment\n", "SELECT", None),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "WITH", None),
        ("(SELECT 1) UNION ALL (SELECT 2)", "SELECT", None),
        ("SHOW TABLES", "SHOW", None),
        ("DESCRIBE TABLE step_receipts", "DESCRIBE", None),
        ("desc step_receipts", "DESC", None),
        ("EXISTS TABLE step_receipts", "EXISTS", None),
        ("EXPLAIN SELECT 1", "EXPLAIN", None),
        ("/* why */ -- and\n# more\nSELECT 1", "SELECT", None),
        ("SELECT 1\n FORMAT Native", "SELECT", "Native"),
        ("SELECT 1 FORMAT JSONEachRow SETTINGS max_threads = 1", "SELECT", "JSONEachRow"),
        ("SELECT format FROM t", "SELECT", None),
        ("SELECT 'a;b', \"c;d\", `e;f`, $$g;h$$ FROM t", "SELECT", None),
        ("SELECT 'it''s; fine', 'esc\\'; aped'", "SELECT", None),
        ("SELECT (SELECT 1 FORMAT JSON)", "SELECT", None),
        ("SELECT a$b FROM t", "SELECT", None),
    ],
)
def test_reads_pass(sql: str, keyword: str, fmt: str | None) -> None:
    statement = check_read(sql)
    assert statement.keyword == keyword
    assert statement.output_format == fmt


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("INSERT INTO step_receipts VALUES (1)", "not INSERT"),
        ("ALTER TABLE step_receipts DELETE WHERE 1", "not ALTER"),
        ("DROP TABLE step_receipts", "not DROP"),
        ("CREATE TABLE x (a Int8) ENGINE = Memory", "not CREATE"),
        ("TRUNCATE TABLE step_receipts", "not TRUNCATE"),
        ("SYSTEM FLUSH LOGS", "not SYSTEM"),
        ("KILL QUERY WHERE 1", "not KILL"),
        ("OPTIMIZE TABLE step_receipts FINAL", "not OPTIMIZE"),
        ("SET readonly = 0", "not SET"),
        ("RENAME TABLE a TO b", "not RENAME"),
        ("GRANT SELECT ON *.* TO x", "not GRANT"),
        ("USE system", "not USE"),
        ("-- SELECT\nDELETE FROM t WHERE 1", "not DELETE"),
        ("/* SELECT */ DROP TABLE t", "not DROP"),
        ("SELECT 1; DROP TABLE t", "multi-statements"),
        ("SELECT 1;;", "multi-statements"),
        ("SELECT 'x'; SELECT 2", "multi-statements"),
        ("SELECT $$'$$; DROP TABLE t -- '", "multi-statements"),
        ("SELECT $x$ a $x$; DROP TABLE t", "multi-statements"),
        ("SELECT 1 /* nested /* */ ; DROP TABLE t */", "multi-statements"),
        ("SELECT 1 INTO OUTFILE 'out.csv'", "INTO OUTFILE"),
        ("WITH 1 AS x SELECT x into outfile 'y'", "INTO OUTFILE"),
        ("'SELECT'", "not 'SELECT'"),
    ],
)
def test_everything_else_is_refused_with_a_reason(sql: str, says: str) -> None:
    with pytest.raises(Refused) as caught:
        check_read(sql)
    assert says in caught.value.reason
    assert (caught.value.code, caught.value.name, caught.value.status) == (164, "READONLY", 403)


@pytest.mark.parametrize("sql", ["", "  ;  ", "-- nothing", "SELECT 'open", "SELECT 1 /* open"])
def test_malformed_text_is_a_syntax_error(sql: str) -> None:
    with pytest.raises(Refused) as caught:
        check_read(sql)
    assert (caught.value.code, caught.value.name, caught.value.status) == (62, "SYNTAX_ERROR", 400)


def test_http_status_follows_clickhouse() -> None:
    assert http_status(164) == 403
    assert http_status(62) == 400
    assert http_status(60) == 404
    assert http_status(81) == 404
    assert http_status(516) == 401
    assert http_status(159) == 408
    assert http_status(396) == 500


def test_read_bind() -> None:
    assert parse_read_bind("off") is None
    assert parse_read_bind("") is None
    assert parse_read_bind(None) is None
    cfg = parse_read_bind("127.0.0.1:0")
    assert cfg is not None
    assert (cfg.host, cfg.port, cfg.token) == ("127.0.0.1", 0, None)
    v6 = parse_read_bind("[::1]:8123")
    assert v6 is not None
    assert (v6.host, v6.port) == ("::1", 8123)
    with pytest.raises(ConfigError, match="needs a read token"):
        parse_read_bind("0.0.0.0:8123")
    wide = parse_read_bind("0.0.0.0:8123", Secret("s3cret"))
    assert wide is not None
    assert wide.token is not None
    assert "s3cret" not in repr(wide)
    for bad in ("8123", "host:", "host:port", ":80"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_read_bind(bad)
    with pytest.raises(ConfigError, match="out of range"):
        ReadEndpointConfig(port=70000)
    with pytest.raises(ConfigError, match="empty"):
        ReadEndpointConfig(token=Secret(""))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_endpoint_file_round_trip_stale_and_removal(tmp_path: Path) -> None:
    mine = ReadEndpoint(host="127.0.0.1", port=8123, pid=os.getpid(), token_required=True)
    assert read_endpoint(tmp_path) is None
    path = write_endpoint(tmp_path, mine)
    assert path.name == ENDPOINT_NAME
    assert read_endpoint(tmp_path) == mine
    assert [p.name for p in tmp_path.iterdir()] == [ENDPOINT_NAME]  # no temporary left
    assert set(json.loads(path.read_text())) == {"host", "port", "pid", "token_required"}

    # Another live process's advert is not withdrawn by this one.
    other = ReadEndpoint(host="0.0.0.0", port=9000, pid=os.getppid(), token_required=False)
    write_endpoint(tmp_path, other)
    assert read_endpoint(tmp_path) == other
    assert other.connect_host == "127.0.0.1"
    remove_endpoint(tmp_path, os.getpid())
    assert read_endpoint(tmp_path) == other
    remove_endpoint(tmp_path, os.getppid())
    assert read_endpoint(tmp_path) is None

    # A stale file (its process is gone) is ignored, and removable by anyone.
    dead = _dead_pid()
    assert not pid_alive(dead)
    write_endpoint(tmp_path, ReadEndpoint(host="::", port=1, pid=dead, token_required=False))
    assert read_endpoint(tmp_path) is None
    remove_endpoint(tmp_path, os.getpid())
    assert not (tmp_path / ENDPOINT_NAME).exists()

    for text in ("{", '{"host": "h"}', '{"host": "h", "port": 0, "pid": 1, "token_required": 0}'):
        (tmp_path / ENDPOINT_NAME).write_text(text)
        assert read_endpoint(tmp_path) is None
