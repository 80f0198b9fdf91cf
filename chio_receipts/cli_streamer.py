"""CLI commands of the streaming side: ``watch`` (the completion watcher) and ``topics ensure``.

The root app registers them with :func:`register`. Environment variables are read here (typer
``envvar``), nowhere deeper. Both take the Kafka connection flags of ``@kafka_options``
(bootstrap, security protocol, SASL, TLS); ``watch`` also takes the Temporal connection flags of
``@temporal_options`` (address, namespace, TLS, API key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from prometheus_client import CollectorRegistry
from rich.console import Console

from chio_receipts._kafka_options import kafka_options
from chio_receipts._logging import use_level as use_log_level
from chio_receipts._options import DEFAULT_METRICS_HOST, MetricsHost, MetricsPort
from chio_receipts._temporal import TemporalConnection
from chio_receipts._temporal_options import temporal_options
from chio_receipts.schemas import ContractError, KafkaConnection, SubjectStrategy, WireFormat
from chio_receipts.streamer import (
    DEFAULT_LAG_WINDOW_S,
    CompletionWatcher,
    ReceiptStreamer,
    StreamerConfig,
    StreamerError,
    StreamerMetrics,
    TopicsConfig,
    WatcherConfig,
    ensure_topics,
    start_metrics_server,
)

__all__ = [
    "RegistryUrl",
    "SubjectStrategyOption",
    "WireFormatChoice",
    "WireFormatOption",
    "ensure",
    "register",
    "topics_app",
    "watch",
    "wire_format_of",
]

log = logging.getLogger(__name__)
_err = Console(stderr=True, highlight=False)

Prefix = Annotated[
    str,
    typer.Option(envvar="CHIO_TOPIC_PREFIX", help="Prefix prepended to every topic name."),
]
Partitions = Annotated[
    int,
    typer.Option(
        envvar="CHIO_TOPIC_PARTITIONS",
        min=1,
        help="Partitions of the steps and runs topics (always equal: co-partitioning).",
    ),
]


class WireFormatChoice(StrEnum):
    """Framing of the Avro records the command produces."""

    SINGLE_OBJECT = "single_object"
    CONFLUENT = "confluent"


WireFormatOption = Annotated[
    WireFormatChoice,
    typer.Option(
        "--wire-format",
        envvar="CHIO_WIRE_FORMAT",
        help="Avro single-object framing (no registry), or Confluent framing (00 + schema id; "
        "needs --registry-url) as ClickHouse's AvroConfluent and Confluent clients read.",
    ),
]
RegistryUrl = Annotated[
    str | None,
    typer.Option(
        "--registry-url",
        envvar="CHIO_SCHEMA_REGISTRY_URL",
        help="Confluent-compatible schema registry, e.g. http://host:8081 or Apicurio's "
        "http://host:8080/apis/ccompat/v7.",
    ),
]
SubjectStrategyOption = Annotated[
    SubjectStrategy,
    typer.Option(
        "--subject-strategy",
        envvar="CHIO_SUBJECT_STRATEGY",
        help="Registry subject of each schema: topic (<topic>-value, TopicNameStrategy), "
        "record (<record name>) or topic_record (<topic>-<record name>).",
    ),
]


def wire_format_of(choice: WireFormatChoice) -> WireFormat:
    """The configuration value of a ``--wire-format`` choice."""
    return "confluent" if choice is WireFormatChoice.CONFLUENT else "single_object"


def check_framing(
    wire_format: WireFormatChoice, registry_url: str | None, flag: str = "--wire-format"
) -> None:
    """Confluent framing without a registry is a usage error (exit 2)."""
    if wire_format is WireFormatChoice.CONFLUENT and not registry_url:
        raise typer.BadParameter(
            "Confluent framing needs --registry-url (or CHIO_SCHEMA_REGISTRY_URL)",
            param_hint=flag,
        )


topics_app = typer.Typer(help="Kafka topics of the pipeline.", no_args_is_help=True)


@topics_app.callback()
def _topics() -> None:
    """Kafka topics of the pipeline."""


@topics_app.command("ensure")
@kafka_options
def ensure(
    *,
    kafka: KafkaConnection,
    prefix: Prefix = "",
    partitions: Partitions = 6,
    replication_factor: Annotated[int, typer.Option(min=1)] = 1,
    retention_days: Annotated[
        int, typer.Option(min=1, help="Retention of the steps and runs topics.")
    ] = 30,
) -> None:
    """Create the steps, runs, envelopes and dead-letter topics if missing (idempotent)."""
    day_ms = 24 * 3600 * 1000
    config = TopicsConfig(
        prefix=prefix,
        partitions=partitions,
        replication_factor=replication_factor,
        steps_retention_ms=retention_days * day_ms,
        runs_retention_ms=retention_days * day_ms,
    )
    try:
        states = asyncio.run(ensure_topics(kafka, config))
    except StreamerError as exc:
        _err.print(f"[red]topics ensure failed:[/red] {exc}")
        raise typer.Exit(1) from None
    for name, state in states.items():
        # One plain line per topic: greppable, never wrapped.
        typer.echo(f"{name}\t{state.partitions}\t{'created' if state.created else 'exists'}")


@kafka_options
@temporal_options
def watch(
    *,
    kafka: KafkaConnection,
    temporal: TemporalConnection,
    prefix: Prefix = "",
    state_dir: Annotated[
        Path,
        typer.Option(
            envvar="CHIO_WATCHER_DIR",
            help="Checkpoint and spool of the watcher (kept across runs).",
        ),
    ] = Path(".data/watcher"),
    poll_seconds: Annotated[float, typer.Option(min=0.1)] = 2.0,
    lookback_hours: Annotated[
        float | None,
        typer.Option(help="On first start, emit runs closed this recently (default: all)."),
    ] = None,
    query_filter: Annotated[
        str, typer.Option(help="Extra visibility filter ANDed to the query, e.g. TaskQueue=...")
    ] = "",
    lag_window_seconds: Annotated[
        float,
        typer.Option(
            "--lag-window-seconds",
            envvar="CHIO_WATCHER_LAG_WINDOW",
            min=0.0,
            help=(
                "How far below the newest close time emitted each poll lists again, for runs"
                " the visibility store shows late; later ones are not emitted (a warning"
                " counts them)."
            ),
        ),
    ] = DEFAULT_LAG_WINDOW_S,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = DEFAULT_METRICS_HOST,
    once: Annotated[bool, typer.Option(help="Poll once and exit.")] = False,
    wire_format: WireFormatOption = WireFormatChoice.SINGLE_OBJECT,
    registry_url: RegistryUrl = None,
    subject_strategy: SubjectStrategyOption = SubjectStrategy.TOPIC,
) -> None:
    """Emit a run-completion event for every workflow run that closes on the Temporal server."""
    use_log_level(logging.INFO)
    check_framing(wire_format, registry_url)
    start_from = (
        datetime.now(UTC) - timedelta(hours=lookback_hours) if lookback_hours is not None else None
    )
    streamer_config = StreamerConfig(
        kafka=kafka,
        spool_dir=str(state_dir / "spool"),
        topics=TopicsConfig(prefix=prefix),
        client_id="chio-receipts-watcher",
        source="urn:chio-receipts:watcher",
        durability="before_execute",
        wire_format=wire_format_of(wire_format),
        registry_url=registry_url,
        subject_strategy=subject_strategy,
    )
    watcher_config = WatcherConfig(
        checkpoint_path=str(state_dir / "checkpoint.json"),
        poll_interval_s=poll_seconds,
        start_from=start_from,
        query_filter=query_filter,
        lag_window_s=lag_window_seconds,
    )
    registry = CollectorRegistry(auto_describe=True)
    metrics = StreamerMetrics(registry)
    if metrics_port is not None:
        start_metrics_server(metrics_port, registry, addr=metrics_host)
    try:
        asyncio.run(_watch(temporal, streamer_config, watcher_config, metrics, once))
    except StreamerError as exc:
        _err.print(f"[red]watcher failed:[/red] {exc}")
        raise typer.Exit(1) from None


async def _watch(
    temporal: TemporalConnection,
    streamer_config: StreamerConfig,
    watcher_config: WatcherConfig,
    metrics: StreamerMetrics,
    once: bool,
) -> None:
    try:
        client = await asyncio.wait_for(temporal.connect(), 30)
    except (TimeoutError, RuntimeError, OSError, ContractError) as exc:
        _err.print(f"[red]cannot connect to Temporal at {temporal.address}:[/red] {exc}")
        raise typer.Exit(1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with ReceiptStreamer(streamer_config, metrics=metrics) as sink:
        watcher = CompletionWatcher(client, sink, watcher_config, metrics=metrics)
        if once:
            n = await watcher.poll_once()
            typer.echo(f"emitted {n} run completions")
            if not await sink.flush(30):
                _err.print(f"{sink.pending} completions left in the spool for the next run")
        else:
            await watcher.run(stop)


def register(app: typer.Typer) -> None:
    """Add ``watch`` and ``topics ensure`` to ``app``."""
    app.command("watch")(watch)
    app.add_typer(topics_app, name="topics")


if __name__ == "__main__":  # a standalone entry for child processes in tests
    _app = typer.Typer(add_completion=False)
    register(_app)
    _app(sys.argv[1:])
