"""CLI commands of the consumer side: ``consume``, ``siem-export``, ``query``, ``verify``.

The root app registers them with :func:`register`. Environment variables are read here (typer
``envvar``), nowhere deeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import typer
from prometheus_client import start_http_server
from rich.console import Console
from rich.table import Table

from chio_receipts._config import load_config
from chio_receipts._kafka_options import kafka_options
from chio_receipts._logging import use_level as use_log_level
from chio_receipts._options import DEFAULT_METRICS_HOST, MetricsHost, MetricsPort
from chio_receipts.cli_streamer import (
    SubjectStrategyOption,
    WireFormatChoice,
    check_framing,
    wire_format_of,
)
from chio_receipts.consumers import (
    DEFAULT_READ_BIND,
    BuilderConfig,
    ClickHouseConfig,
    ConsumerError,
    DatabaseBusy,
    KeyRing,
    ReadEndpointConfig,
    ReceiptBuilderService,
    chdb_path,
    load_keys_file,
    open_reader,
    parse_kernel_keys,
    parse_read_bind,
    verify_run,
)
from chio_receipts.schemas import (
    ChioReceiptsError,
    Codec,
    KafkaConnection,
    KeyPair,
    RetryPolicy,
    SchemaRegistryClient,
    Secret,
    SubjectStrategy,
    TopicNames,
    retry_async,
)
from chio_receipts.stack import default_clickhouse_dsn

__all__ = [
    "builder_key",
    "consume",
    "query",
    "register",
    "render_rows",
    "siem_export",
    "verify",
]

_log = logging.getLogger(__name__)
_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


def _default_dsn() -> str:
    # The same database `dev up` and the demo write: <CHIO_DATA_DIR>/clickhouse.
    return default_clickhouse_dsn(load_config().data_dir)


RegistryUrl = Annotated[
    str | None,
    typer.Option(
        envvar="CHIO_SCHEMA_REGISTRY_URL",
        help="Confluent-compatible schema registry (to read Confluent-framed messages)",
    ),
]
Dsn = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="CHIO_CLICKHOUSE_DSN",
        help="chdb:///path (embedded, default <CHIO_DATA_DIR>/clickhouse) or "
        "http(s)://user:pw@host:port/db",
    ),
]
Cluster = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        envvar="CHIO_CLICKHOUSE_CLUSTER",
        help="ClickHouse cluster the migrations target (server DSN only): ON CLUSTER, "
        "Replicated* local tables <name>_local, Distributed tables <name>; inserts go to the "
        "local tables of the DSN's node",
    ),
]
ReadBind = Annotated[
    str,
    typer.Option(
        "--read-bind",
        envvar="CHIO_READ_BIND",
        help="HOST:PORT where the owner of an embedded database serves read-only queries over "
        "ClickHouse's HTTP interface (port 0: any free port; 'off': none); beyond loopback it "
        "needs a read token. Advertised in <database>/chio-read-endpoint.json.",
    ),
]
ReadTokenFile = Annotated[
    Path | None,
    typer.Option(
        "--read-token-file",
        envvar="CHIO_READ_TOKEN_FILE",
        exists=True,
        dir_okay=False,
        readable=True,
        help="File holding the read endpoint's token (or CHIO_READ_TOKEN, environment only).",
    ),
]
KeysFile = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        envvar="CHIO_KEYS_FILE",
        help='JSON public keys: {"keys":[{"key_id","public_key"}]} or {key_id: public_key}',
    ),
]
KeyUrl = Annotated[
    str | None,
    typer.Option("--key-url", envvar="CHIO_SIDECAR_URL", help="sidecar serving GET /v1/keys"),
]
TrustedKernelKeys = Annotated[
    list[str] | None,
    typer.Option(
        "--trusted-kernel-key",
        envvar="CHIO_TRUSTED_KERNEL_KEYS",
        help="hex Ed25519 public key of a Chio kernel whose receipts are trusted (repeatable; "
        "the environment variable takes a comma-separated list); every key of --keys / "
        "--key-url is trusted as well",
    ),
]
BuilderKeyFile = Annotated[
    Path,
    typer.Option(
        "--builder-key",
        envvar="CHIO_BUILDER_KEY_FILE",
        help="the builder's Ed25519 key (JSON key_id + seed); created when missing",
    ),
]
_BUILDER_KEY_DEFAULT = Path(".data/builder-key.json")
_TOPICS = TopicNames()


def builder_key(path: Path, *, create: bool = True) -> KeyPair:
    """The builder's signing key from ``path`` (created with mode 0600 when missing), and its
    public half written next to it as ``<name>.pub.json`` (a ``--keys`` file)."""
    if not path.exists():
        if not create:
            raise ConsumerError(f"builder key file {path} does not exist")
        seed = os.urandom(32)
        key_id = (
            "builder-" + hashlib.sha256(KeyPair.from_seed("x", seed).public_key).hexdigest()[:12]
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"key_id": key_id, "seed": seed.hex()}, fh)
    try:
        doc = json.loads(path.read_text("utf-8"))
        key = KeyPair.from_seed(str(doc["key_id"]), bytes.fromhex(str(doc["seed"])))
    except (OSError, ValueError, KeyError) as exc:
        raise ConsumerError(f"cannot read builder key file {path}: {exc}") from exc
    pub = path.with_name(path.stem + ".pub.json")
    document = {"keys": [{"key_id": key.key_id, "public_key": key.public_key.hex()}]}
    if not pub.exists():
        pub.write_text(json.dumps(document), "utf-8")
    return key


def _builder_public(path: Path) -> dict[str, bytes]:
    pub = path.with_name(path.stem + ".pub.json")
    if pub.exists():
        return load_keys_file(pub)
    if path.exists():
        key = builder_key(path, create=False)
        return {key.key_id: key.public_key}
    return {}


def _kernel_keys(values: Sequence[str] | None) -> frozenset[str]:
    """The trusted kernel keys of ``--trusted-kernel-key`` / ``CHIO_TRUSTED_KERNEL_KEYS``."""
    items = [part for value in values or () for part in value.split(",")]
    try:
        return parse_kernel_keys(items)
    except ValueError as exc:
        raise ConsumerError(str(exc)) from None


def _read_token(path: Path | None) -> Secret | None:
    """The read endpoint's token: the file's first line, else CHIO_READ_TOKEN (never printed)."""
    if path is not None:
        try:
            text = path.read_text("utf-8").strip()
        except OSError as exc:
            raise ConsumerError(f"cannot read the read token file {path}: {exc}") from None
        if not text:
            raise ConsumerError(f"the read token file {path} is empty")
        return Secret(text.splitlines()[0].strip())
    value = os.environ.get("CHIO_READ_TOKEN", "").strip()
    return Secret(value) if value else None


def _fail(message: str, code: int = 2) -> typer.Exit:
    _err.print(f"error: {message}", markup=False, soft_wrap=True)
    return typer.Exit(code)


def _setup_logging() -> None:
    use_log_level(os.environ.get("CHIO_LOG_LEVEL", "INFO"))


class _Service(Protocol):
    @property
    def metrics(self) -> Any: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def run(self, stop: asyncio.Event | None = None) -> None: ...


async def _run_until_signalled(service: _Service) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # A broker (or sidecar) that is not up yet is waited for, not a crash loop.
    try:
        await retry_async(
            service.start,
            policy=RetryPolicy(initial_seconds=1.0, maximum_seconds=30.0, describe="start"),
            stop=stop,
        )
    except ChioReceiptsError:
        if not stop.is_set():
            raise
    if stop.is_set():
        await service.stop()
        return
    try:
        await service.run(stop)
    finally:
        await service.stop()


@kafka_options
def consume(
    *,
    kafka: KafkaConnection,
    dsn: Dsn = None,
    keys: KeysFile = None,
    key_url: KeyUrl = None,
    trusted_kernel_key: TrustedKernelKeys = None,
    builder_key_file: BuilderKeyFile = _BUILDER_KEY_DEFAULT,
    group: Annotated[str, typer.Option(help="consumer group id")] = "chio-receipt-builder",
    steps_topic: Annotated[str, typer.Option()] = _TOPICS.steps,
    runs_topic: Annotated[str, typer.Option()] = _TOPICS.runs,
    envelopes_topic: Annotated[str, typer.Option()] = _TOPICS.envelopes,
    dlq_topic: Annotated[str, typer.Option()] = _TOPICS.dlq,
    grace_seconds: Annotated[
        float, typer.Option(help="wait this long for missing steps before an incomplete envelope")
    ] = 60.0,
    ttl_days: Annotated[int | None, typer.Option(help="ClickHouse TTL of receipts")] = None,
    cluster: Cluster = None,
    read_bind: ReadBind = DEFAULT_READ_BIND,
    read_token_file: ReadTokenFile = None,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = DEFAULT_METRICS_HOST,
    registry_url: RegistryUrl = None,
    envelope_wire_format: Annotated[
        WireFormatChoice,
        typer.Option(
            "--envelope-wire-format",
            envvar="CHIO_ENVELOPE_WIRE_FORMAT",
            help="Framing of the published envelopes: single_object, or confluent (registered "
            "in --registry-url).",
        ),
    ] = WireFormatChoice.SINGLE_OBJECT,
    subject_strategy: SubjectStrategyOption = SubjectStrategy.TOPIC,
) -> None:
    """Build signed workflow envelopes from the receipt topics into ClickHouse (exactly once)."""
    _setup_logging()
    check_framing(envelope_wire_format, registry_url, "--envelope-wire-format")
    try:
        public = load_keys_file(keys) if keys else {}
        config = BuilderConfig(
            kafka=kafka,
            clickhouse=_clickhouse_config(
                dsn or _default_dsn(),
                ttl_days,
                cluster,
                parse_read_bind(read_bind, _read_token(read_token_file)),
            ),
            builder_key=builder_key(builder_key_file),
            public_keys=public,
            key_url=key_url,
            trusted_kernel_keys=_kernel_keys(trusted_kernel_key),
            topics=TopicNames(
                steps=steps_topic, runs=runs_topic, envelopes=envelopes_topic, dlq=dlq_topic
            ),
            group_id=group,
            grace_seconds=grace_seconds,
            registry_url=registry_url,
            envelope_wire_format=wire_format_of(envelope_wire_format),
            subject_strategy=subject_strategy,
        )
        _serve(ReceiptBuilderService(config), metrics_port, metrics_host)
    except ConsumerError as exc:
        raise _fail(str(exc)) from None


def _clickhouse_config(
    dsn: str,
    ttl_days: int | None,
    cluster: str | None,
    read_endpoint: ReadEndpointConfig | None = None,
) -> ClickHouseConfig:
    if cluster and dsn.startswith("chdb:"):
        raise ConsumerError("--cluster needs a ClickHouse server DSN (--dsn http(s)://...)")
    try:
        return ClickHouseConfig(
            dsn=dsn,
            ttl_days=ttl_days,
            cluster=cluster or None,
            # A server serves reads itself: the read endpoint is for an embedded database.
            read_endpoint=read_endpoint if dsn.startswith("chdb:") else None,
        )
    except ValueError as exc:
        raise ConsumerError(str(exc)) from None


@kafka_options
def siem_export(
    *,
    kafka: KafkaConnection,
    output: Annotated[
        str,
        typer.Option(
            help="jsonl:<path>|jsonl:- (stdout) | hec:<url> | elastic:<url> | "
            "syslog+tcp://host:port | syslog+udp://host:port"
        ),
    ] = "jsonl:-",
    hec_token: Annotated[
        str | None, typer.Option(envvar="CHIO_HEC_TOKEN", help="Splunk HEC token")
    ] = None,
    index: Annotated[str | None, typer.Option(help="Elastic index / Splunk index")] = None,
    keys: KeysFile = None,
    key_url: KeyUrl = None,
    trusted_kernel_key: TrustedKernelKeys = None,
    group: Annotated[str, typer.Option()] = "chio-siem-exporter",
    steps_topic: Annotated[str, typer.Option()] = _TOPICS.steps,
    envelopes_topic: Annotated[str | None, typer.Option(help="also export envelopes")] = None,
    dlq_topic: Annotated[
        str, typer.Option(help="where batches the output refuses go")
    ] = _TOPICS.dlq,
    deny_only: Annotated[bool, typer.Option(help="export denials only")] = False,
    drop_denies: Annotated[
        bool, typer.Option(help="explicitly drop denials too (otherwise never dropped)")
    ] = False,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = DEFAULT_METRICS_HOST,
    registry_url: RegistryUrl = None,
) -> None:
    """Export receipts as OCSF API Activity events to a file, Splunk, Elastic or syslog."""
    _setup_logging()
    from chio_receipts.consumers.siem import ExporterConfig, SiemExporter, parse_output

    try:
        config = ExporterConfig(
            kafka=kafka,
            output=parse_output(output, token=hec_token, index=index),
            public_keys=load_keys_file(keys) if keys else {},
            key_url=key_url,
            trusted_kernel_keys=_kernel_keys(trusted_kernel_key),
            group_id=group,
            topics=TopicNames(
                steps=steps_topic,
                envelopes=envelopes_topic or _TOPICS.envelopes,
                dlq=dlq_topic,
            ),
            export_envelopes=envelopes_topic is not None,
            deny_only=deny_only,
            drop_denies=drop_denies,
            registry_url=registry_url,
        )
        _serve(SiemExporter(config), metrics_port, metrics_host)
    except ConsumerError as exc:
        raise _fail(str(exc)) from None


def _serve(service: _Service, metrics_port: int | None, metrics_host: str) -> None:
    """Serve ``service``'s metrics (when a port is given) and run it until SIGINT/SIGTERM."""
    if metrics_port is not None:
        start_http_server(metrics_port, addr=metrics_host, registry=service.metrics.registry)
    asyncio.run(_run_until_signalled(service))


def _open_for_read(dsn: str, token_file: Path | None = None) -> Any:
    """A client reading ``dsn``: directly, or through the read endpoint of the process that
    owns the embedded database while it runs."""
    path = chdb_path(dsn)
    if path is not None and not path.exists():
        raise _fail(f"no ClickHouse database at {path} (has the consumer run yet?)")
    try:
        return open_reader(dsn, token=_read_token(token_file))
    except DatabaseBusy as exc:
        raise _fail(
            f"{exc}; it serves no read endpoint (started with --read-bind off?). chDB allows "
            "one process per path"
        ) from None
    except ConsumerError as exc:
        raise _fail(f"cannot open ClickHouse: {exc}") from None


QueryFormat = Literal["table", "csv", "tsv", "json", "jsonl"]


def query(
    sql: Annotated[str, typer.Argument(help="the SQL to run (read-only use)")],
    dsn: Dsn = None,
    output_format: Annotated[
        QueryFormat,
        typer.Option(
            "--format",
            help="table (for people), csv or tsv (with a header line), json (one array) or "
            "jsonl (one object per line)",
        ),
    ] = "table",
    read_token_file: ReadTokenFile = None,
) -> None:
    """Run a SQL query on the receipt database and print the result (a table by default).

    While ``consume`` owns the embedded database, the query runs through its read endpoint
    (read-only: anything but one SELECT, WITH, SHOW, DESCRIBE, EXISTS or EXPLAIN is refused).
    """
    client = _open_for_read(dsn or _default_dsn(), read_token_file)
    try:
        result = client.query(sql)
    except Exception as exc:  # noqa: BLE001 - any engine error becomes one line, no traceback
        raise _fail(str(exc).strip().splitlines()[0][:500]) from None
    finally:
        with contextlib.suppress(Exception):
            client.close()
    names = [str(name) for name in result.column_names]
    rows = result.result_rows
    if output_format == "table":
        table = Table(show_lines=False)
        for name in names:
            table.add_column(name)
        for row in rows:
            table.add_row(*(_cell(v) for v in row))
        _out.print(table)
        _out.print(f"{len(rows)} row(s)", style="dim")
    else:
        sys.stdout.write(render_rows(names, rows, output_format))


def render_rows(names: list[str], rows: Sequence[Sequence[Any]], output_format: str) -> str:
    """``rows`` (with column ``names``) as csv, tsv, json or jsonl text; binary values as hex."""
    if output_format in ("json", "jsonl"):
        documents = [{n: _plain(v) for n, v in zip(names, row, strict=True)} for row in rows]
        if output_format == "json":
            return json.dumps(documents, ensure_ascii=False, indent=2) + "\n"
        return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
    if output_format == "tsv":
        # ClickHouse's TabSeparatedWithNames escaping: one record per line whatever the values.
        lines = ["\t".join(_tsv(n) for n in names)]
        lines += ["\t".join(_tsv(_text(v)) for v in row) for row in rows]
        return "".join(line + "\n" for line in lines)
    if output_format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(names)
        writer.writerows([_text(v) for v in row] for row in rows)
        return buffer.getvalue()
    raise ValueError(f"unknown output format {output_format!r}")


def _cell(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _text(value: Any) -> str:
    """A value as one csv/tsv field: NULL is empty, composite values are JSON."""
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(_plain(value), ensure_ascii=False)
    plain = _plain(value)
    return plain if isinstance(plain, str) else json.dumps(plain)


def _tsv(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _plain(value: Any) -> Any:
    """``value`` as JSON data: bytes as hex, times as ISO 8601, decimals and UUIDs as text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


def verify(
    workflow_id: Annotated[str, typer.Option("--workflow-id", help="workflow id to verify")],
    run_id: Annotated[str | None, typer.Option("--run-id", help="only this run")] = None,
    dsn: Dsn = None,
    keys: KeysFile = None,
    key_url: KeyUrl = None,
    trusted_kernel_key: TrustedKernelKeys = None,
    builder_key_file: BuilderKeyFile = _BUILDER_KEY_DEFAULT,
    registry_url: RegistryUrl = None,
    read_token_file: ReadTokenFile = None,
) -> None:
    """Verify a workflow's receipts from ClickHouse rows alone: OK or exactly what is wrong.

    Checks every step signature and Chio kernel receipt, the prev_hash chain, every outcome
    record (its Chio receipt and the decision it follows), and each envelope's steps, outcome
    records, attempt accounts, chain root and builder signature. Every attempt Temporal started
    that nothing accounts for is named (workflow, run, activity, attempt) and fails the check;
    unsigned outcome records are listed as notes. While ``consume`` owns the embedded database,
    the rows are read through its read endpoint.
    """
    try:
        ring = KeyRing(
            load_keys_file(keys) if keys else {},
            url=key_url,
            trusted_kernel_keys=_kernel_keys(trusted_kernel_key),
        )
        if key_url:
            asyncio.run(ring.refresh(force=True))
        all_keys = {**ring.keys, **_builder_public(builder_key_file)}
        trusted = ring.trusted_hex
    except ConsumerError as exc:
        raise _fail(str(exc)) from None
    client = _open_for_read(dsn or _default_dsn(), read_token_file)
    # Stored Confluent-framed steps of another writer schema are read through the registry.
    codec = Codec(SchemaRegistryClient(registry_url)) if registry_url else None
    try:
        report = verify_run(
            client, workflow_id, run_id, keys=all_keys, trusted_kernel_keys=trusted, codec=codec
        )
    except ConsumerError as exc:
        raise _fail(str(exc)) from None
    finally:
        with contextlib.suppress(Exception):
            client.close()
    _out.print(report.summary(), markup=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``consume``, ``siem-export``, ``query`` and ``verify`` to ``app``."""
    app.command("consume")(consume)
    app.command("siem-export")(siem_export)
    app.command("query")(query)
    app.command("verify")(verify)


if __name__ == "__main__":  # a standalone entry for child processes in tests
    _app = typer.Typer(add_completion=False)
    register(_app)
    _app(sys.argv[1:])
