"""The read endpoint of the process owning an embedded database: ClickHouse's HTTP interface,
read-only.

chDB is one engine per process, and one process owns a ``chdb://`` path; while the builder runs,
no other process can open the database. The owner therefore serves what ClickHouse's HTTP
interface serves for reads, so ``query``, ``verify``, the report and any ClickHouse HTTP client
(``clickhouse_connect.get_client(host=..., port=...)``) read through it:

* ``POST /`` (the SQL in the body, after the ``query`` parameter if both are given) and
  ``GET /?query=...``; ``multipart/form-data`` forms (``query`` and ``param_*`` fields) as
  clickhouse-connect sends long bound parameters; ``GET /ping``.
* ``database``, ``default_format`` (TabSeparated), ``query_id`` and ``param_<name>`` parameters;
  other parameters are settings: one equal to the session's value is accepted, another is
  refused as ClickHouse refuses a change in ``readonly=1`` (transport parameters such as
  ``session_id``, ``compress`` or ``wait_end_of_query`` are accepted and have no effect; the
  response is never compressed and always whole).
* Responses carry ``X-ClickHouse-Query-Id``, ``-Format``, ``-Timezone``, ``-Summary`` and
  ``-Server-Display-Name``. Errors are ClickHouse's text (``Code: N. DB::Exception: ...``)
  with ``X-ClickHouse-Exception-Code`` and the status ClickHouse would give: 403 for a refused
  statement, 400/404 for a bad query, 401 for a missing token.

Writes are refused twice: :func:`check_read` lets only one read statement through before
anything runs, and every engine session is opened with ``readonly=1``, so ClickHouse refuses
writes, DDL, table functions and setting changes on its own. Each request runs in one of a few
sessions of the same engine (chDB runs queries of different connections in parallel), so reads
never wait for the builder's inserts nor the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import hmac
import importlib
import json
import logging
import os
import queue
import re
import socket
import time
import uuid
import zlib
from base64 import b64decode
from collections.abc import Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chdb
import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from chio_receipts.consumers._errors import ConfigError
from chio_receipts.consumers._readendpoint import (
    ReadEndpoint,
    ReadEndpointConfig,
    remove_endpoint,
    write_endpoint,
)
from chio_receipts.consumers._readsql import Refused, check_read
from chio_receipts.schemas import AsyncService

__all__ = ["ReadServer", "http_status"]

_log = logging.getLogger(__name__)

# Request parameters of ClickHouse's HTTP interface that are not settings.
_TRANSPORT = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "close_session",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "role",
        "quota_key",
        "user",
        "password",
        "stacktrace",
        "add_http_cors_header",
        # Settings that only shape the HTTP exchange, which this endpoint does not do
        # (progress headers, compression, cancel on close): accepted, no effect.
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "enable_http_compression",
        "http_zlib_compression_level",
        "cancel_http_readonly_queries_on_client_close",
        "http_wait_end_of_query",
        "http_response_buffer_size",
    }
)
_DRAIN_SECONDS = 10.0
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CODE_RE = re.compile(r"Code: (\d+)")
_QUERY_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ERROR_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*$")
# chdb's query() gives these names a Python meaning instead of a ClickHouse output format.
_PYTHON_FORMATS = frozenset({"dataframe", "datastore", "arrowtable", "debug"})
_CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
}

# ClickHouse's HTTP status of an exception code (after its HTTP handler's mapping, for the
# codes a read can meet); anything else is 500.
_BAD_REQUEST = frozenset(
    {
        6, 26, 27, 32, 38, 41, 69, 70, 72, 117, 131, 190, 349, 354, 395,  # cannot parse ...
        10, 15, 16, 36, 43, 44, 47, 53, 62, 169, 179, 184, 215,  # bad query: no column, types
    }
)  # fmt: skip
_NOT_FOUND = frozenset({46, 50, 57, 60, 63, 73, 81, 115, 130, 222})  # unknown function, table
_FORBIDDEN = frozenset({164, 291, 497})  # READONLY, DATABASE_ACCESS_DENIED, ACCESS_DENIED


def http_status(code: int) -> int:
    """The HTTP status ClickHouse answers an exception with ``code`` with."""
    if code in (516, 194, 192):
        return 401
    if code in _FORBIDDEN:
        return 403
    if code in _BAD_REQUEST:
        return 400
    if code in _NOT_FOUND:
        return 404
    if code == 159:
        return 408
    if code == 48:
        return 501
    return 500


class _Failure(Exception):
    """A request answered with a ClickHouse error (``status`` None: ClickHouse's for
    ``code``)."""

    def __init__(self, code: int, name: str, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.name = name
        self.reason = reason
        self.status = status


@dataclass(slots=True)
class _Session:
    """One engine connection (readonly) and the database it has in use."""

    conn: Any
    database: str


@dataclass(frozen=True, slots=True)
class _Result:
    data: bytes
    summary: dict[str, str]


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without signal capture: the owning process keeps its own signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class ReadServer(AsyncService):
    """Serve read-only queries on the embedded database at ``path`` over ClickHouse's HTTP
    interface, and advertise the endpoint in ``path`` while serving. Idempotent start/stop."""

    def __init__(self, path: Path, config: ReadEndpointConfig) -> None:
        self._path = path
        self._config = config
        self._sessions: queue.Queue[_Session] = queue.Queue()
        self._opened: list[_Session] = []
        self._executor: ThreadPoolExecutor | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._settings: dict[str, str] = {}
        self._version = ""
        self._timezone = "UTC"
        self._display_name = socket.gethostname()
        self._endpoint: ReadEndpoint | None = None

    @property
    def endpoint(self) -> ReadEndpoint | None:
        """Where it listens, while serving."""
        return self._endpoint

    async def start(self) -> None:
        """Open the engine sessions, bind, serve, then advertise. Idempotent."""
        if self._task is not None:
            return
        cfg = self._config
        self._executor = ThreadPoolExecutor(cfg.sessions, thread_name_prefix="clickhouse-read")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._open_sessions)
            family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((cfg.host, cfg.port))
            except OSError as exc:
                sock.close()
                raise ConfigError(
                    f"cannot bind the read endpoint to {cfg.host}:{cfg.port}: {exc}"
                ) from exc
            port = sock.getsockname()[1]
            config = uvicorn.Config(
                self._app,
                interface="asgi3",
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_keep_alive=5,
            )
            server = _EmbeddedServer(config)
            self._server = server
            self._task = asyncio.create_task(server.serve(sockets=[sock]))
            try:
                async with asyncio.timeout(10):
                    while not server.started:
                        if self._task.done():
                            await self._task
                            raise ConfigError("the read endpoint stopped during startup")
                        await asyncio.sleep(0.01)
            finally:
                if not server.started:
                    sock.close()
            endpoint = ReadEndpoint(
                host=cfg.host, port=port, pid=os.getpid(), token_required=cfg.token is not None
            )
            write_endpoint(self._path, endpoint)
            self._endpoint = endpoint
            _log.info("serving read-only queries on %s:%d", cfg.host, port)
        except BaseException:
            await self.stop()
            raise

    def _open_sessions(self) -> None:
        cfg = self._config
        # Settings first: once readonly=1 is set the session cannot change any.
        options = (
            f"max_result_bytes={cfg.max_result_bytes}"
            f"&max_execution_time={cfg.max_execution_time}&readonly=1"
        )
        location = f"{os.path.realpath(self._path)}?{options}"
        for _ in range(cfg.sessions):
            try:
                conn = chdb.connect(location)  # type: ignore[no-untyped-call]
            except Exception as exc:
                raise ConfigError(f"cannot open a read session on {self._path}: {exc}") from exc
            session = _Session(conn, "default")
            self._opened.append(session)
            self._sessions.put(session)
        probe = self._opened[0].conn
        head = probe.query("SELECT version(), timezone(), currentDatabase()", "TabSeparated")
        self._version, self._timezone, database = head.bytes().decode().rstrip("\n").split("\t")
        for session in self._opened:
            session.database = database
        rows = probe.query("SELECT name, value FROM system.settings", "JSONEachRow").bytes()
        for line in rows.splitlines():
            row = json.loads(line)
            self._settings[str(row["name"])] = str(row["value"])

    async def stop(self) -> None:
        """Withdraw the advert, stop serving, close the sessions. Idempotent."""
        if self._endpoint is not None:
            remove_endpoint(self._path, os.getpid())
            self._endpoint = None
        server, task = self._server, self._task
        self._server, self._task = None, None
        if server is not None and task is not None:
            server.should_exit = True
            try:
                async with asyncio.timeout(5):
                    await task
            except TimeoutError:
                server.force_exit = True
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        opened, self._opened = self._opened, []
        # A read in flight keeps its session (closing it under a running query is not safe):
        # wait a bounded time for each to come back, close those, leave the rest to the exit.
        idle = await asyncio.to_thread(self._collect, len(opened), _DRAIN_SECONDS)
        if len(idle) < len(opened):
            _log.warning(
                "%d read(s) still running after %.0f s; their sessions stay open",
                len(opened) - len(idle),
                _DRAIN_SECONDS,
            )
        for session in idle:
            with contextlib.suppress(Exception):
                session.conn.close()
        self._sessions = queue.Queue()

    def _collect(self, count: int, timeout: float) -> list[_Session]:
        """Up to ``count`` sessions as they become free, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        idle: list[_Session] = []
        while len(idle) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                idle.append(self._sessions.get(timeout=remaining))
            except queue.Empty:
                break
        return idle

    # -- HTTP ---------------------------------------------------------------------------

    async def _app(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(dict(scope), receive)
        query_id = request.query_params.get("query_id", "")
        if not _QUERY_ID_RE.fullmatch(query_id):  # it goes back in a header
            query_id = str(uuid.uuid4())
        try:
            response = await self._handle(request, query_id)
        except _Failure as failure:
            response = self._error(failure, query_id)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 in ClickHouse's words
            _log.exception("read endpoint failure")
            response = self._error(_Failure(1001, "STD_EXCEPTION", type(exc).__name__), query_id)
        await response(dict(scope), receive, send)

    def _headers(self, query_id: str) -> dict[str, str]:
        return {
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Timezone": self._timezone,
            "X-ClickHouse-Server-Display-Name": self._display_name,
        }

    def _error(self, failure: _Failure, query_id: str) -> Response:
        status = failure.status or http_status(failure.code)
        reason = failure.reason.strip()
        if reason.startswith("Code: "):
            body = reason
        else:
            body = f"Code: {failure.code}. DB::Exception: {reason}. ({failure.name})"
        if "(version " not in body:
            body = f"{body} (version {self._version})"
        headers = {**self._headers(query_id), "X-ClickHouse-Exception-Code": str(failure.code)}
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="chio-receipts"'
        return Response(
            body + "\n", status, headers=headers, media_type="text/plain; charset=UTF-8"
        )

    async def _handle(self, request: Request, query_id: str) -> Response:
        path = request.url.path
        if path == "/ping":
            return Response("Ok.\n", media_type="text/html; charset=UTF-8")
        if path != "/":
            raise _Failure(1, "UNSUPPORTED_METHOD", f"There is no handle {path[:100]}", 404)
        if request.method not in ("GET", "POST"):
            raise _Failure(1, "UNSUPPORTED_METHOD", f"HTTP method {request.method}", 405)
        self._authenticate(request)
        fields = dict(request.query_params)
        body = _decompressed(
            await self._body(request),
            request.headers.get("content-encoding", ""),
            self._config.max_request_bytes,
        )
        content_type = request.headers.get("content-type", "")
        # As ClickHouse: a multipart form carries fields; any other body (``curl -d`` sends
        # form-urlencoded) is SQL text.
        if content_type.startswith("multipart/form-data"):
            fields.update(_form_fields(content_type, body))
            body = b""
        # The body follows the ``query`` parameter (ClickHouse reads an INSERT's data so): an
        # INSERT with binary data is refused as an INSERT before its bytes matter.
        text = body.decode("utf-8", errors="replace")
        sql = fields.get("query", "") + text
        if not sql.strip() and request.method == "GET":
            return Response("Ok.\n", media_type="text/html; charset=UTF-8")
        try:
            statement = check_read(sql)
        except Refused as refused:
            raise _Failure(refused.code, refused.name, refused.reason, refused.status) from None
        if "\ufffd" in text and text.encode("utf-8") != body:
            raise _Failure(62, "SYNTAX_ERROR", "the query is not UTF-8 text", 400)
        fmt = statement.output_format or fields.get("default_format") or "TabSeparated"
        if not _NAME_RE.fullmatch(fmt) or fmt.lower() in _PYTHON_FORMATS:
            raise _Failure(73, "UNKNOWN_FORMAT", f"Unknown format {fmt[:60]}", 404)
        database = fields.get("database") or None
        params: dict[str, str] = {}
        for name, value in fields.items():
            if name.startswith("param_"):
                params[name[6:]] = value
            elif name not in _TRANSPORT:
                self._check_setting(name, value)
        executor = self._executor
        if executor is None:
            raise _Failure(210, "NETWORK_ERROR", "the read endpoint is stopping", 503)
        start = time.monotonic_ns()
        try:
            work = asyncio.get_running_loop().run_in_executor(
                executor, self._run, sql, fmt, params, database
            )
        except RuntimeError:  # the executor was shut down: stopping
            raise _Failure(210, "NETWORK_ERROR", "the read endpoint is stopping", 503) from None
        result = await work
        summary = {**result.summary, "elapsed_ns": str(time.monotonic_ns() - start)}
        headers = {
            **self._headers(query_id),
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Summary": json.dumps(summary, separators=(",", ":")),
        }
        media = _CONTENT_TYPES.get(fmt.lower(), "application/octet-stream")
        return Response(result.data, 200, headers=headers, media_type=media)

    def _authenticate(self, request: Request) -> None:
        token = self._config.token
        if token is None:
            return
        offered: list[str] = []
        key = request.headers.get("x-clickhouse-key")
        if key is not None:
            offered.append(key)
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic":
            with contextlib.suppress(ValueError):
                offered.append(b64decode(value, validate=True).decode().partition(":")[2])
        elif scheme.lower() == "bearer":
            offered.append(value.strip())
        secret = token.reveal().encode()
        if not any(hmac.compare_digest(o.encode(), secret) for o in offered):
            raise _Failure(
                516,
                "AUTHENTICATION_FAILED",
                "Authentication failed: the read endpoint needs its token",
                401,
            )

    async def _body(self, request: Request) -> bytes:
        limit = self._config.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Failure(62, "SYNTAX_ERROR", f"request larger than {limit} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_setting(self, name: str, value: str) -> None:
        current = self._settings.get(name)
        if current is None:
            raise _Failure(115, "UNKNOWN_SETTING", f"Unknown setting '{name[:100]}'")
        if current != value:
            raise _Failure(164, "READONLY", f"Cannot modify '{name}' setting in readonly mode", 403)

    def _run(self, sql: str, fmt: str, params: dict[str, str], database: str | None) -> _Result:
        """Run ``sql`` in a free session (on an executor thread)."""
        session = self._sessions.get()
        try:
            if database is not None and database != session.database:
                self._engine(session, f"USE {_quote_identifier(database)}", "TabSeparated", {})
                session.database = database
            result = self._engine(session, sql, fmt, params)
        finally:
            self._sessions.put(session)
        data = result.bytes() or b""
        summary = {
            "read_rows": str(result.rows_read()),
            "read_bytes": str(result.bytes_read()),
            "written_rows": "0",
            "written_bytes": "0",
            "total_rows_to_read": str(result.rows_read()),
            "result_rows": "0",
            "result_bytes": str(len(data)),
        }
        return _Result(data, summary)

    @staticmethod
    def _engine(session: _Session, sql: str, fmt: str, params: dict[str, str]) -> Any:
        try:
            return session.conn.query(sql, fmt, params=params)
        except Exception as exc:  # noqa: BLE001 - chdb raises ChdbError, RuntimeError and more
            text = str(exc).strip()
            found = _CODE_RE.search(text)
            if found is None:
                raise _Failure(1001, "STD_EXCEPTION", text[:2000] or type(exc).__name__) from None
            code = int(found.group(1))
            text = text[found.start() :]
            name = _ERROR_NAME_RE.search(text)
            raise _Failure(code, name.group(1) if name else "", text[:4000]) from None


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decoded from its ``Content-Encoding`` (as clickhouse-connect compresses an
    insert: an INSERT is then refused as one, not as unreadable bytes), at most ``limit``
    bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity") or not body:
        return body
    out: bytes
    try:
        if encoding in ("gzip", "x-gzip", "deflate"):
            out = zlib.decompressobj(47 if encoding != "deflate" else 15).decompress(
                body, limit + 1
            )
        elif encoding == "lz4":
            frame = importlib.import_module("lz4.frame")
            out = frame.LZ4FrameDecompressor().decompress(body, max_length=limit + 1)
        elif encoding == "zstd":
            zstd = importlib.import_module("backports.zstd")
            out = zstd.ZstdDecompressor().decompress(body, max_length=limit + 1)
        else:
            raise _Failure(48, "NOT_IMPLEMENTED", f"Content-Encoding {encoding[:40]}", 415)
    except (ImportError, zlib.error, RuntimeError, ValueError, OSError) as exc:
        raise _Failure(
            62, "SYNTAX_ERROR", f"cannot decode the {encoding[:40]} body: {type(exc).__name__}"
        ) from None
    if len(out) > limit:
        raise _Failure(62, "SYNTAX_ERROR", f"request larger than {limit} bytes", 413)
    return out


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """The text fields of a multipart form body (``query``, ``param_*``); a file part
    (external data) is refused."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise _Failure(62, "SYNTAX_ERROR", "malformed multipart form", 400)
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_filename() is not None:
            raise _Failure(48, "NOT_IMPLEMENTED", "external data is not supported here", 400)
        payload = part.get_payload(decode=True)
        try:
            fields[name] = payload.decode("utf-8") if isinstance(payload, bytes) else ""
        except UnicodeDecodeError:
            raise _Failure(62, "SYNTAX_ERROR", f"form field {name} is not UTF-8", 400) from None
    return fields
