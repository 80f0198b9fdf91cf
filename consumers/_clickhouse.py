"""The ClickHouse side: client lifecycle, migrations, idempotent batch inserts, read-backs.

One client per process, driven from one worker thread (the chDB engine releases the GIL, so
inserts overlap decoding on the event loop). clickhouse-connect errors never escape: they become
:class:`SinkDataError` (the rows are bad: dead-letter them) or :class:`SinkUnavailable` (retry,
commit nothing). An embedded ``chdb://`` path is owned by one process; the owner holds an
advisory lock file ``chio-owner.lock`` in the data directory so other processes can say so, and
serves read-only queries over ClickHouse's HTTP interface while it runs (``read_endpoint``; see
``_readserver``). :func:`open_reader` is how every read tool opens the database: directly, or
through the owner's advertised endpoint when another live process owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, DataError

from chio_receipts.consumers._errors import (
    ConfigError,
    DatabaseBusy,
    FailpointError,
    SinkDataError,
    SinkError,
    SinkUnavailable,
)
from chio_receipts.consumers._failpoints import failpoint
from chio_receipts.consumers._readendpoint import ReadEndpointConfig, read_endpoint
from chio_receipts.consumers._readserver import ReadServer
from chio_receipts.consumers._rows import (
    ENVELOPE_COLUMNS,
    OUTCOME_COLUMNS,
    STEP_COLUMNS,
    EnvelopeRow,
    OutcomeRow,
    StepRow,
)
from chio_receipts.schemas import AsyncService, Secret

__all__ = [
    "ClickHouseConfig",
    "ClickHouseSink",
    "StoredRuns",
    "chdb_path",
    "cluster_ddl",
    "cluster_role_ddl",
    "cluster_statements",
    "migrations",
    "open_client",
    "open_reader",
    "owner_pid",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
LOCK_NAME = "chio-owner.lock"
_NEVER_WIDE = 1 << 62
# Server error codes meaning "these rows are wrong" (retrying the same rows cannot help).
_DATA_CODES = frozenset({6, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 131, 190, 349, 354, 395, 691})
_CODE_RE = re.compile(r"Code: (\d+)")

_BINARY = {
    "prev_hash": "bytes",
    "chio_signed": "bytes",
    "signature": "bytes",
    "wire": "bytes",
    "chain_root": "bytes",
}
# How a column is read back so the typed row gets its field's type (ids as str, timestamps as
# int microseconds); every select item is aliased to its column name, and rows are built from
# the result's column names.
_READ_AS = {
    "receipt_id": "toString(receipt_id)",
    "outcome_id": "toString(outcome_id)",
    "ended_at": "toUnixTimestamp64Micro(ended_at)",
    "verdict": "toString(verdict)",
    "scheduled_at": "toUnixTimestamp64Micro(scheduled_at)",
    "evaluated_at": "toUnixTimestamp64Micro(evaluated_at)",
    "started_at": "toUnixTimestamp64Micro(started_at)",
    "completed_at": (
        "if(isNull(completed_at), NULL, toUnixTimestamp64Micro(assumeNotNull(completed_at)))"
    ),
}


def select_list(columns: Sequence[str]) -> str:
    """The select items reading ``columns`` back, each aliased to its column name."""
    return ", ".join(f"{_READ_AS[c]} AS {c}" if c in _READ_AS else c for c in columns)


STEP_SELECT = select_list(STEP_COLUMNS)
ENVELOPE_SELECT = select_list(ENVELOPE_COLUMNS)
OUTCOME_SELECT = select_list(OUTCOME_COLUMNS)
_COLUMNS = {
    "step_receipts": STEP_COLUMNS,
    "workflow_receipts": ENVELOPE_COLUMNS,
    "step_outcomes": OUTCOME_COLUMNS,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClickHouseConfig:
    """Where and how to write. ``dsn``: ``chdb:///path`` (embedded) or ``http(s)://...``."""

    dsn: str
    ttl_days: int | None = None
    apply_roles: bool = True
    connect_timeout: float = 10.0
    send_receive_timeout: float = 60.0
    # A ClickHouse cluster name: migrations run ON CLUSTER with replicated local tables and
    # Distributed read tables (see cluster_ddl), and inserts go to the local tables.
    cluster: str | None = None
    # Where the owner of an embedded database serves read-only queries (None: nowhere). Has no
    # effect with a server DSN: the server serves reads itself.
    read_endpoint: ReadEndpointConfig | None = None

    def __post_init__(self) -> None:
        if self.cluster is not None:
            check_cluster_name(self.cluster)

    @property
    def embedded(self) -> bool:
        """True for a chDB DSN."""
        return self.dsn.startswith("chdb:")


def chdb_path(dsn: str) -> Path | None:
    """The on-disk path of a ``chdb:///path`` DSN (None for memory or a server DSN)."""
    if not dsn.startswith("chdb:"):
        return None
    parsed = urlparse(dsn)
    location = parsed.path if not parsed.netloc else ""
    if location in ("", "memory", ":memory:"):
        return None
    return Path(location)


def owner_pid(path: Path) -> int | None:
    """The pid of the live process owning chDB ``path``, or None when nobody holds it."""
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _busy_message(path: Path, pid: int | None) -> str:
    who = f"the running consumer (pid {pid})" if pid and pid > 0 else "another process"
    return (
        f"the ClickHouse database at {path} is owned by {who}; "
        "stop it first or point at a ClickHouse server DSN"
    )


def translate(exc: Exception, what: str) -> SinkError:
    """Map a clickhouse-connect (or serialization) error to the package's tree."""
    text = str(exc)
    if "EmbeddedServer" in text or "Unable to open the chdb engine" in text:
        return DatabaseBusy(f"{what}: the chDB path is owned by another process")
    if isinstance(exc, DataError | TypeError | ValueError | OverflowError | KeyError):
        return SinkDataError(f"{what}: {type(exc).__name__}: {text[:500]}")
    if isinstance(exc, DatabaseError):
        code = getattr(exc, "code", None)
        if code is None:
            found = _CODE_RE.search(text)
            code = int(found.group(1)) if found else None
        if code is not None and int(code) in _DATA_CODES:
            return SinkDataError(f"{what}: {text[:500]}")
    return SinkUnavailable(f"{what}: {type(exc).__name__}: {text[:500]}")


def _create_database(
    dsn: str, connect_timeout: float, timeout: float, cluster: str | None = None
) -> None:
    """Create the database a server DSN names (``http://host:port/<db>``) if it is missing (on
    every node of ``cluster`` when one is given)."""
    parsed = urlparse(dsn)
    database = parsed.path.strip("/").split("/")[0]
    if not database or not re.fullmatch(r"[A-Za-z0-9_]+", database):
        return
    admin = clickhouse_connect.get_client(
        dsn=parsed._replace(path="/default").geturl(),
        connect_timeout=connect_timeout,
        send_receive_timeout=timeout,
    )
    try:
        on = f" ON CLUSTER '{check_cluster_name(cluster)}'" if cluster else ""
        admin.command(f"CREATE DATABASE IF NOT EXISTS {database}{on}")
    finally:
        admin.close()


def open_client(
    dsn: str,
    *,
    connect_timeout: float = 10.0,
    timeout: float = 60.0,
    create: bool = False,
    cluster: str | None = None,
) -> Any:
    """A clickhouse-connect client for ``dsn`` (blocking; errors translated). ``create``
    creates the database of a server DSN first (the consumer does; read tools do not), on every
    node of ``cluster`` when one is given."""
    path = chdb_path(dsn)
    if path is not None:
        pid = owner_pid(path)
        if pid is not None and pid != os.getpid():
            raise DatabaseBusy(_busy_message(path, pid))
        path.mkdir(parents=True, exist_ok=True)
    try:
        if dsn.startswith("chdb:"):
            return clickhouse_connect.get_client(dsn=dsn)
        if create:
            _create_database(dsn, connect_timeout, timeout, cluster)
        return clickhouse_connect.get_client(
            dsn=dsn, connect_timeout=connect_timeout, send_receive_timeout=timeout
        )
    except (ClickHouseError, OSError, RuntimeError) as exc:
        err = translate(exc, "connect")
        if isinstance(err, DatabaseBusy) and path is not None:
            raise DatabaseBusy(_busy_message(path, owner_pid(path))) from exc
        raise err from exc


def open_reader(
    dsn: str,
    *,
    token: Secret | None = None,
    connect_timeout: float = 10.0,
    timeout: float = 60.0,
) -> Any:
    """A clickhouse-connect client to read ``dsn`` with (blocking; errors translated).

    An embedded database owned by another live process is read through the owner's advertised
    read endpoint (an HTTP client; ``token`` when the endpoint wants one), else it is opened
    directly as :func:`open_client` does. The owner alive with no endpoint advertised is
    :class:`DatabaseBusy`, as before."""
    path = chdb_path(dsn)
    if path is not None:
        pid = owner_pid(path)
        if pid is not None and pid != os.getpid():
            endpoint = read_endpoint(path)
            if endpoint is None or (pid > 0 and endpoint.pid != pid):
                raise DatabaseBusy(_busy_message(path, pid))
            if endpoint.token_required and token is None:
                raise ConfigError(
                    f"the process owning {path} (pid {endpoint.pid}) serves reads with a token: "
                    "set CHIO_READ_TOKEN or --read-token-file"
                )
            try:
                return clickhouse_connect.get_client(
                    host=endpoint.connect_host,
                    port=endpoint.port,
                    username="default",
                    password=token.reveal() if token is not None else "",
                    connect_timeout=connect_timeout,
                    send_receive_timeout=timeout,
                    compress=False,
                    autogenerate_session_id=False,
                )
            except (ClickHouseError, OSError) as exc:
                where = f"{endpoint.connect_host}:{endpoint.port}"
                raise translate(
                    exc, f"read through pid {endpoint.pid} ({where}) owning {path}"
                ) from exc
    return open_client(dsn, connect_timeout=connect_timeout, timeout=timeout)


@dataclass(frozen=True, slots=True)
class _Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


def migrations() -> list[_Migration]:
    """The numbered migration files of ``consumers/sql`` in order."""
    found: list[_Migration] = []
    for item in resources.files("chio_receipts.consumers").joinpath("sql").iterdir():
        name = item.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append(_Migration(int(name[:4]), name, item.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def split_statements(sql: str) -> list[str]:
    """Statements of a SQL file (``;`` at line end separates; ``--`` comments dropped)."""
    lines = [ln for ln in sql.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";").strip()]


# --- Clusters -------------------------------------------------------------------------------
# With a cluster name every migration statement is rewritten by :func:`cluster_ddl`: each table
# becomes a replicated local table ``<name>_local`` on every node (ON CLUSTER, the Replicated*
# engine of its MergeTree family, the replicated deduplication window sized like the
# non-replicated one of the single-node DDL) plus a ``Distributed`` table under the original
# name, so every query, view and tool keeps reading ``<name>``. The sink inserts into the local
# table of the node its DSN names (see the README, "ClickHouse clusters").
LOCAL_SUFFIX = "_local"
# How long a replicated insert's token is remembered, next to the count of blocks: a hash goes at
# whichever limit comes first. non_replicated_deduplication_window has no time limit and the
# server's default here is one hour; seven days keeps the count the binding limit.
DEDUP_WINDOW_SECONDS = 7 * 24 * 3600
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CLUSTER_RE = re.compile(r"[A-Za-z0-9_.-]+")
_CREATE_TABLE_RE = re.compile(rf"^CREATE TABLE (IF NOT EXISTS )?({_NAME})(\s*\()", re.IGNORECASE)
_ENGINE_RE = re.compile(r"\bENGINE\s*=\s*(\w*MergeTree)\b(\s*\(([^()]*)\))?", re.IGNORECASE)
_NR_WINDOW_RE = re.compile(r"\bnon_replicated_deduplication_window\s*=\s*(\d+)", re.IGNORECASE)
_MV_RE = re.compile(
    rf"^CREATE MATERIALIZED VIEW (IF NOT EXISTS )?({_NAME}) TO ({_NAME})", re.IGNORECASE
)
_VIEW_RE = re.compile(rf"^CREATE (OR REPLACE )?VIEW (IF NOT EXISTS )?({_NAME})", re.IGNORECASE)
_ALTER_RE = re.compile(rf"^ALTER TABLE ({_NAME})\s", re.IGNORECASE)
# Clauses that change the columns, which the Distributed table must follow; every other clause
# (TTL, settings, indexes) concerns the stored parts and applies to the local table alone.
_COLUMN_CLAUSE_RE = re.compile(r"(ADD|DROP|MODIFY|RENAME|COMMENT) COLUMN\b", re.IGNORECASE)
_FROM_RE = re.compile(rf"\b(FROM|JOIN)\s+({_NAME})\b", re.IGNORECASE)
# Columns of the run key: a table having them is sharded by run in its Distributed table.
_RUN_KEY = ("namespace", "workflow_id", "run_id")


def check_cluster_name(cluster: str) -> str:
    """``cluster`` if it is a usable cluster name (it goes into DDL as a string literal)."""
    if not _CLUSTER_RE.fullmatch(cluster):
        raise ValueError(f"invalid ClickHouse cluster name {cluster!r}")
    return cluster


def _quoted(cluster: str) -> str:
    return f"'{cluster}'"


def cluster_ddl(statement: str, cluster: str, database: str) -> list[str]:
    """The statements that apply one migration ``statement`` (as :func:`split_statements`
    returns it) to every node of ``cluster`` in ``database``.

    - ``CREATE TABLE t (...) ENGINE = XMergeTree[(args)] ...``: ``t_local`` ON CLUSTER with
      ``ReplicatedXMergeTree('/clickhouse/tables/{shard}/{database}/t_local', '{replica}'
      [, args])`` and ``replicated_deduplication_window`` (+ ``_seconds``) in place of
      ``non_replicated_deduplication_window``; then ``t`` ON CLUSTER ``AS t_local`` with
      ``ENGINE = Distributed(cluster, database, t_local[, sharding key])``, sharded by the run key
      when the table has one.
    - ``CREATE MATERIALIZED VIEW v TO t AS SELECT ... FROM s``: ON CLUSTER, reading and writing
      the local tables (a view fires on the inserts into ``s_local``).
    - ``CREATE [OR REPLACE] VIEW``: ON CLUSTER, unchanged otherwise (it reads the Distributed
      tables).
    - ``ALTER TABLE t ADD COLUMN ...`` (or DROP, MODIFY, RENAME, COMMENT COLUMN): ON CLUSTER on
      ``t_local`` and on ``t``; any other ``ALTER TABLE t`` (TTL, settings, indexes) applies to
      ``t_local`` only, and one mixing both kinds is refused.
    """
    check_cluster_name(cluster)
    if not re.fullmatch(_NAME, database):
        raise ValueError(f"invalid database name {database!r}")
    text = statement.strip().rstrip(";").strip()
    on = f" ON CLUSTER {_quoted(cluster)}"
    if m := _CREATE_TABLE_RE.match(text):
        return _cluster_table(text, m, cluster, database)
    if m := _MV_RE.match(text):
        rest = text[m.end() :]
        rest = _FROM_RE.sub(lambda f: f"{f.group(1)} {f.group(2)}{LOCAL_SUFFIX}", rest)
        head = f"CREATE MATERIALIZED VIEW {m.group(1) or ''}{m.group(2)}{on}"
        return [f"{head} TO {m.group(3)}{LOCAL_SUFFIX}{rest}"]
    if m := _VIEW_RE.match(text):
        return [f"{text[: m.end()]}{on}{text[m.end() :]}"]
    if m := _ALTER_RE.match(text):
        table, rest = m.group(1), text[m.end() :].lstrip()
        local = f"ALTER TABLE {table}{LOCAL_SUFFIX}{on} {rest}"
        columns = [bool(_COLUMN_CLAUSE_RE.match(c.strip())) for c in _top_level_split(rest)]
        if all(columns):
            return [local, f"ALTER TABLE {table}{on} {rest}"]
        if not any(columns):
            return [local]
        raise ValueError(f"ALTER TABLE {table}: put column and storage changes in two statements")
    raise ValueError(f"no cluster form for statement: {text.splitlines()[0][:80]}")


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses (ALTER clauses)."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


_GRANT_RE = re.compile(r"^GRANT (.+?) ON ([A-Za-z0-9_{}]+)\.([A-Za-z0-9_*]+) TO (.+)$", re.DOTALL)


def cluster_role_ddl(statement: str, cluster: str) -> list[str]:
    """A ``roles.sql`` statement for every node of ``cluster``: ON CLUSTER, and a grant on a
    receipt table also given on its ``_local`` table (the builder inserts there, and a
    Distributed read runs on the local tables of every shard)."""
    check_cluster_name(cluster)
    text = statement.strip().rstrip(";").strip()
    on = f"ON CLUSTER {_quoted(cluster)}"
    if m := re.match(rf"^CREATE ROLE (IF NOT EXISTS )?({_NAME})$", text):
        return [f"{text} {on}"]
    if m := _GRANT_RE.match(text):
        what, db, table, to = m.groups()
        out = [f"GRANT {on} {what} ON {db}.{table} TO {to}"]
        if table != "*":
            out.append(f"GRANT {on} {what} ON {db}.{table}{LOCAL_SUFFIX} TO {to}")
        return out
    if text.startswith("GRANT "):
        return [f"GRANT {on} {text[len('GRANT ') :]}"]
    raise ValueError(f"no cluster form for statement: {text.splitlines()[0][:80]}")


def _cluster_table(text: str, m: re.Match[str], cluster: str, database: str) -> list[str]:
    name = m.group(2)
    local = f"{name}{LOCAL_SUFFIX}"
    engine = _ENGINE_RE.search(text)
    if engine is None:
        raise ValueError(f"table {name}: only MergeTree-family tables have a cluster form")
    family = engine.group(1)
    if family.lower().startswith("replicated"):
        raise ValueError(f"table {name}: already replicated")
    args = [f"'/clickhouse/tables/{{shard}}/{{database}}/{local}'", "'{replica}'"]
    if engine.group(3) and engine.group(3).strip():
        args.append(engine.group(3).strip())
    body = (
        text[: engine.start()]
        + f"ENGINE = Replicated{family}({', '.join(args)})"
        + text[engine.end() :]
    )
    window = _NR_WINDOW_RE.search(body)
    replicated = (
        f"replicated_deduplication_window = {window.group(1) if window else 10000}, "
        f"replicated_deduplication_window_seconds = {DEDUP_WINDOW_SECONDS}"
    )
    if window is not None:
        body = body[: window.start()] + replicated + body[window.end() :]
    elif re.search(r"\bSETTINGS\b", body, re.IGNORECASE):
        body = re.sub(r"\bSETTINGS\b", f"SETTINGS {replicated},", body, count=1)
    else:
        body = f"{body}\nSETTINGS {replicated}"
    on = f" ON CLUSTER {_quoted(cluster)}"
    create = f"CREATE TABLE {m.group(1) or ''}"
    head = f"{create}{local}{on}{m.group(3)}"
    columns = text[m.end() : engine.start()]
    sharded = all(re.search(rf"^\s*{c}\s", columns, re.MULTILINE) for c in _RUN_KEY)
    shard_key = f", cityHash64({', '.join(_RUN_KEY)})" if sharded else ""
    distributed = (
        f"{create}{name}{on} AS {local}\n"
        f"ENGINE = Distributed({_quoted(cluster)}, {database}, {local}{shard_key})"
    )
    return [head + body[m.end() :], distributed]


def cluster_statements(sql: str, cluster: str, database: str) -> list[str]:
    """Every statement of a migration file in its cluster form (see :func:`cluster_ddl`)."""
    return [out for s in split_statements(sql) for out in cluster_ddl(s, cluster, database)]


MIGRATIONS_TABLE_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
    "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
    "ENGINE = ReplacingMergeTree ORDER BY version"
)


class ClickHouseSink(AsyncService):
    """Owns the ClickHouse client: migrations at start, batch inserts, read-backs."""

    def __init__(self, config: ClickHouseConfig) -> None:
        self._config = config
        self._client: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._types: dict[str, Any] = {}
        self._reader: ReadServer | None = None

    @property
    def client(self) -> Any:
        """The underlying clickhouse-connect client (for read-only tools)."""
        return self._client

    @property
    def reader(self) -> ReadServer | None:
        """The read endpoint this sink serves (embedded database it owns), while started."""
        return self._reader

    async def start(self) -> None:
        """Take ownership (embedded), connect and migrate. Idempotent."""
        if self._client is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        try:
            await self._run(self._start_sync)
            path = chdb_path(self._config.dsn)
            endpoint = self._config.read_endpoint
            # Only the owner serves reads (another sink of this process shares its engine).
            if endpoint is not None and path is not None and self._lock_fd is not None:
                self._reader = ReadServer(path, endpoint)
                await self._reader.start()
        except BaseException:
            await self.close()
            raise

    def _start_sync(self) -> None:
        path = chdb_path(self._config.dsn)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                pid = owner_pid(path)
                if pid != os.getpid():  # another sink of this process may share the engine
                    raise DatabaseBusy(_busy_message(path, pid)) from None
            else:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
        self._client = open_client(
            self._config.dsn,
            connect_timeout=self._config.connect_timeout,
            timeout=self._config.send_receive_timeout,
            create=True,
            cluster=self._config.cluster,
        )
        self._migrate_sync()
        if self._config.embedded:
            self._compact_parts()
        if self._config.cluster:
            self._sync_replica()
        for table, columns in _COLUMNS.items():
            ctx = self._call(
                partial(self._client.create_insert_context, self._table(table), columns)
            )
            self._types[table] = ctx.column_types

    def _compact_parts(self) -> None:
        """Keep every part of an embedded database compact (one file for all its columns).

        A part past ``min_bytes_for_wide_part`` (10 MB) is written wide, one file per column;
        merging and reading it fans out over the engine's global thread pool, which keeps
        every thread it ever started (three procfs descriptors each): from the first wide part
        on, the builder's threads and descriptors would keep growing."""
        c = self._client
        tables = self._call(
            lambda: (
                c.query(
                    "SELECT name FROM system.tables WHERE database = currentDatabase() "
                    "AND engine LIKE '%MergeTree'"
                ).result_rows
            ),
            "part format settings",
        )
        for (table,) in tables:
            self._call(
                partial(
                    c.command,
                    f"ALTER TABLE `{table}` MODIFY SETTING min_bytes_for_wide_part = {_NEVER_WIDE}",
                ),
                "part format settings",
            )

    def _call(self, fn: Callable[[], _T], what: str = "clickhouse") -> _T:
        try:
            return fn()
        except (ClickHouseError, OSError, TypeError, ValueError, OverflowError, KeyError) as exc:
            raise translate(exc, what) from exc

    def _table(self, name: str) -> str:
        """Where rows of table ``name`` are inserted: its local table on a cluster."""
        return f"{name}{LOCAL_SUFFIX}" if self._config.cluster else name

    def _sync_replica(self) -> None:
        """Have this replica fetch every part the shard's other replicas hold before the builder
        re-hydrates runs from it (a builder that moved to this replica sees what it wrote)."""
        for table in _COLUMNS:
            try:
                self._client.command(f"SYSTEM SYNC REPLICA {table}{LOCAL_SUFFIX}")
            except ClickHouseError as exc:
                _log.warning("SYSTEM SYNC REPLICA %s%s failed: %s", table, LOCAL_SUFFIX, exc)

    def _migrate_sync(self) -> None:
        c = self._client
        cluster = self._config.cluster
        db = ""
        if cluster:
            if self._config.embedded:
                raise ConfigError("a cluster needs a ClickHouse server DSN, not chDB")
            db = str(self._call(lambda: c.command("SELECT currentDatabase()"), "migrate"))

        def ddl(statement: str) -> list[str]:
            return cluster_ddl(statement, cluster, db) if cluster else [statement]

        for statement in ddl(MIGRATIONS_TABLE_DDL):
            self._call(partial(c.command, statement), "migrate")
        engine = self._call(
            lambda: c.command(
                "SELECT engine FROM system.tables "
                "WHERE database = currentDatabase() AND name = 'schema_migrations'"
            ),
            "migrate",
        )
        if bool(cluster) != (str(engine) == "Distributed"):
            raise ConfigError(
                "the database was migrated for a cluster: give the same cluster name"
                if not cluster
                else "the database was migrated without a cluster: --cluster needs a new database"
            )
        done = {
            int(r[0])
            for r in self._call(
                lambda: c.query("SELECT version FROM schema_migrations FINAL").result_rows,
                "migrate",
            )
        }
        for migration in migrations():
            if migration.version in done:
                continue
            for statement in split_statements(migration.sql):
                for applied in ddl(statement):
                    self._call(partial(c.command, applied), f"migration {migration.name}")
            self._call(
                partial(
                    c.insert,
                    self._table("schema_migrations"),
                    [(migration.version, migration.name, migration.checksum)],
                    column_names=("version", "name", "checksum"),
                ),
                "migrate",
            )
            _log.info("applied migration %s", migration.name)
        if self._config.ttl_days:
            days = int(self._config.ttl_days)
            for table, column in (
                ("step_receipts", "evaluated_at"),
                ("workflow_receipts", "started_at"),
                ("step_outcomes", "ended_at"),
            ):
                ttl = f"ALTER TABLE {table} MODIFY TTL toDateTime({column}) + INTERVAL {days} DAY"
                for statement in ddl(ttl):
                    self._call(partial(c.command, statement), "ttl")
        if not self._config.embedded and self._config.apply_roles:
            db = self._call(lambda: c.command("SELECT currentDatabase()"), "roles")
            text = (
                resources.files("chio_receipts.consumers")
                .joinpath("sql", "roles.sql")
                .read_text("utf-8")
            )
            statements = split_statements(text.replace("{db}", str(db)))
            if cluster:
                statements = [out for s in statements for out in cluster_role_ddl(s, cluster)]
            for statement in statements:
                try:
                    c.command(statement)
                except ClickHouseError as exc:
                    # Roles need access management rights; a plain user still ingests.
                    _log.warning("roles not applied (%s): %s", statement.split("\n")[0], exc)
                    break

    async def _run(self, fn: Callable[[], _T]) -> _T:
        if self._executor is None:
            raise SinkUnavailable("the ClickHouse sink is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def insert_steps(self, rows: Sequence[StepRow], token: str) -> None:
        """Insert step rows in one statement, deduplicated by ``token``."""
        values = [row.values() for row in rows]
        await self._run(lambda: self._insert("step_receipts", values, token))

    async def insert_outcomes(self, rows: Sequence[OutcomeRow], token: str) -> None:
        """Insert outcome record rows in one statement, deduplicated by ``token``."""
        values = [row.values() for row in rows]
        await self._run(lambda: self._insert("step_outcomes", values, token))

    async def insert_envelopes(self, rows: Sequence[EnvelopeRow], token: str) -> None:
        """Insert envelope rows in one statement, deduplicated by ``token``."""
        values = [row.values() for row in rows]
        await self._run(lambda: self._insert("workflow_receipts", values, token))

    def _insert(self, table: str, rows: Sequence[tuple[Any, ...]], token: str) -> None:
        if not rows:
            return
        try:
            failpoint("clickhouse.insert")
        except FailpointError as exc:  # an injected write failure is an operational one
            raise SinkUnavailable(f"insert into {table}: {exc}") from exc
        try:
            failpoint(f"clickhouse.refuse.{table}")
        except FailpointError as exc:  # an injected refusal of the rows (a data error)
            raise SinkDataError(f"insert into {table}: {exc}") from exc
        self._call(
            lambda: self._client.insert(
                self._table(table),
                rows,
                column_names=_COLUMNS[table],
                column_types=self._types[table],
                settings={
                    "insert_deduplication_token": token,
                    # A deduplicated block must not feed the materialized views again.
                    "deduplicate_blocks_in_dependent_materialized_views": 1,
                },
            ),
            f"insert into {table}",
        )

    async def query(
        self, sql: str, parameters: Mapping[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a read query; returns (column names, rows)."""

        def run() -> tuple[list[str], list[tuple[Any, ...]]]:
            result = self._call(
                lambda: self._client.query(sql, parameters=parameters, column_formats=_BINARY),
                "query",
            )
            return list(result.column_names), [tuple(r) for r in result.result_rows]

        return await self._run(run)

    async def call(self, fn: Callable[[Any], _T]) -> _T:
        """Run ``fn(client)`` on the sink's own thread (read-only tools such as ``verify_run``
        while the sink is in use: one chDB client is never used from two threads at once)."""
        return await self._run(lambda: fn(self._client))

    async def load_runs(self, keys: Sequence[tuple[str, str, str]]) -> StoredRuns:
        """Stored step rows, outcome rows and the latest envelope row of each run, by run key."""
        return await self._run(lambda: load_runs_sync(self._client, keys))

    async def close(self) -> None:
        """Stop serving reads, close the client, release ownership. Idempotent."""
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()
        client, self._client = self._client, None
        executor, self._executor = self._executor, None
        if client is not None and executor is not None:
            with contextlib.suppress(ClickHouseError, OSError, RuntimeError):
                await asyncio.get_running_loop().run_in_executor(executor, client.close)
        if executor is not None:
            executor.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def stop(self) -> None:
        """Same as :meth:`close` (what leaving ``async with`` calls)."""
        await self.close()


def select_steps(client: Any, where: str, parameters: Mapping[str, Any]) -> list[StepRow]:
    """The step rows matching ``where`` (blocking; clickhouse-connect errors propagate)."""
    result = client.query(
        f"SELECT {STEP_SELECT} FROM step_receipts WHERE {where}",  # noqa: S608 - bound params
        parameters=parameters,
        column_formats=_BINARY,
    )
    names = result.column_names
    return [StepRow.from_columns(names, row) for row in result.result_rows]


def select_envelopes(client: Any, where: str, parameters: Mapping[str, Any]) -> list[EnvelopeRow]:
    """The latest envelope row (highest revision) of each run matching ``where`` (blocking)."""
    result = client.query(
        f"SELECT {ENVELOPE_SELECT} FROM workflow_receipts WHERE {where} "  # noqa: S608
        "ORDER BY revision DESC LIMIT 1 BY namespace, workflow_id, run_id",
        parameters=parameters,
        column_formats=_BINARY,
    )
    names = result.column_names
    return [EnvelopeRow.from_columns(names, row) for row in result.result_rows]


def select_outcomes(client: Any, where: str, parameters: Mapping[str, Any]) -> list[OutcomeRow]:
    """The outcome record rows matching ``where`` (blocking; errors propagate)."""
    result = client.query(
        f"SELECT {OUTCOME_SELECT} FROM step_outcomes WHERE {where}",  # noqa: S608 - bound params
        parameters=parameters,
        column_formats=_BINARY,
    )
    names = result.column_names
    return [OutcomeRow.from_columns(names, row) for row in result.result_rows]


_RunKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class StoredRuns:
    """What storage holds of some runs, by run key: step rows, outcome rows, latest envelope."""

    steps: dict[_RunKey, list[StepRow]]
    outcomes: dict[_RunKey, list[OutcomeRow]]
    envelopes: dict[_RunKey, EnvelopeRow]


def load_runs_sync(client: Any, keys: Sequence[_RunKey]) -> StoredRuns:
    """Blocking form of :meth:`ClickHouseSink.load_runs`."""
    stored = StoredRuns({}, {}, {})
    if not keys:
        return stored
    where = "(namespace, workflow_id, run_id) IN {keys:Array(Tuple(String, String, String))}"
    params = {"keys": list(keys)}
    try:
        for step in select_steps(client, where, params):
            key = (step.namespace, step.workflow_id, step.run_id)
            stored.steps.setdefault(key, []).append(step)
        for outcome in select_outcomes(client, where, params):
            key = (outcome.namespace, outcome.workflow_id, outcome.run_id)
            stored.outcomes.setdefault(key, []).append(outcome)
        for env in select_envelopes(client, where, params):
            stored.envelopes[(env.namespace, env.workflow_id, env.run_id)] = env
    except (ClickHouseError, OSError, TypeError, ValueError, KeyError) as exc:
        raise translate(exc, "load runs") from exc
    return stored
