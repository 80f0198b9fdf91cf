"""The ``chio-receipts`` command line."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from chio_receipts import cli_approvals, cli_consumers, cli_sidecar, cli_streamer
from chio_receipts._config import load_config
from chio_receipts._kafka_options import kafka_options
from chio_receipts._logging import LogFormat
from chio_receipts._logging import configure as configure_logging
from chio_receipts._options import (
    DEFAULT_METRICS_HOST,
    MetricsHost,
    MetricsPort,
    SidecarTokenOption,
)
from chio_receipts._temporal import TemporalConnection
from chio_receipts._temporal_options import temporal_options
from chio_receipts.schemas import KafkaConnection, SubjectStrategy
from chio_receipts.stack import (
    APICURIO_VERSION,
    KAFKA_VERSION,
    LocalStack,
    StackConfig,
    StackError,
    ensure_kafka_jars,
    ensure_registry_package,
    java_binary,
    port_open,
    read_state,
    stop_recorded,
    temporal_binary,
)

__all__ = ["app", "main"]

T = TypeVar("T")
console = Console()
err = Console(stderr=True)

app = typer.Typer(
    help="Signed receipts for every Temporal activity, streamed through Kafka into ClickHouse.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
dev = typer.Typer(help="The local stack: Temporal dev server + Kafka broker + chDB.")
app.add_typer(dev, name="dev")
app.add_typer(cli_sidecar.app, name="sidecar")
cli_streamer.register(app)
cli_consumers.register(app)
cli_approvals.register(app)


@app.callback()
def _root(
    log_format: Annotated[
        LogFormat,
        typer.Option(
            envvar="CHIO_LOG_FORMAT",
            help="Log lines as plain text or as one JSON object per line "
            "(time, level, logger, message).",
        ),
    ] = "text",
) -> None:
    """Signed receipts for every Temporal activity, streamed through Kafka into ClickHouse."""
    configure_logging(log_format)


def run_or_exit(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; a StackError becomes one clear message and exit code 1."""
    try:
        return asyncio.run(main())
    except StackError as exc:
        err.print(f"[bold red]error[/]: {exc.render()}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        # asyncio.run cancelled the main task, so every finally block (and with it every
        # process stop) has already run.
        err.print("interrupted: everything this command started has been stopped")
        raise typer.Exit(130) from None


WithRegistry = Annotated[
    bool,
    typer.Option(
        "--with-registry",
        envvar="CHIO_DEV_WITH_REGISTRY",
        help="Also the Confluent-compatible schema registry (Apicurio Registry, in memory).",
    ),
]


@dev.command("fetch")
def dev_fetch(with_registry: WithRegistry = False) -> None:
    """Check Java and download the Kafka jars (Maven) and check the Temporal binary."""
    cfg = load_config()
    try:
        java = java_binary()
        libs = ensure_kafka_jars(cfg.cache_dir)
        temporal = temporal_binary()
        registry = ensure_registry_package(cfg.cache_dir) if with_registry else None
    except StackError as exc:
        err.print(f"[bold red]error[/]: {exc.render()}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"java: {java}\nkafka {KAFKA_VERSION} jars: {libs}\ntemporal: {temporal}")
    if registry is not None:
        console.print(f"apicurio registry {APICURIO_VERSION}: {registry}")


@dev.command("up")
def dev_up(
    temporal_port: Annotated[int, typer.Option(help="Temporal gRPC port (0 = free)")] = 7233,
    kafka_port: Annotated[int, typer.Option(help="Kafka port (0 = free)")] = 9092,
    with_registry: WithRegistry = False,
    registry_port: Annotated[int, typer.Option(help="Schema registry port (0 = free)")] = 8081,
) -> None:
    """Start the local stack in the background and record it in <data dir>/stack.json."""
    cfg = load_config()
    state = read_state(cfg.data_dir)
    if state is not None and port_open(state.kafka_bootstrap):
        console.print(f"already running: {state}")
        return

    async def up() -> None:
        stack = LocalStack(
            StackConfig(
                data_dir=cfg.data_dir,
                cache_dir=cfg.cache_dir,
                temporal_port=temporal_port,
                kafka_port=kafka_port,
                clickhouse_dsn=cfg.clickhouse_dsn,
                with_registry=with_registry,
                registry_port=registry_port,
            )
        )
        await stack.start()
        stack.write_state()
        registry = f"registry: {stack.registry_url}\n" if stack.registry_url else ""
        console.print(
            f"temporal: {stack.temporal_address}\nkafka:    {stack.kafka_bootstrap}\n"
            f"{registry}clickhouse: {stack.clickhouse_dsn}\nlogs:     {cfg.data_dir}/*/*.log\n"
            "stop with: chio-receipts dev down"
        )

    run_or_exit(up)


@dev.command("down")
def dev_down() -> None:
    """Stop the stack started by `dev up`."""
    stopped = stop_recorded(load_config().data_dir)
    console.print("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


@dev.command("status")
def dev_status() -> None:
    """Show whether the stack started by `dev up` is up."""
    state = read_state(load_config().data_dir)
    if state is None:
        console.print("not running (no stack.json)")
        raise typer.Exit(3)
    table = Table("component", "address", "up")
    table.add_row("temporal", state.temporal_address, str(port_open(state.temporal_address)))
    table.add_row("kafka", state.kafka_bootstrap, str(port_open(state.kafka_bootstrap)))
    if state.registry_url:
        address = state.registry_url.split("//", 1)[-1].split("/", 1)[0]
        table.add_row("registry", state.registry_url, str(port_open(address)))
    table.add_row("clickhouse", state.clickhouse_dsn, "embedded")
    console.print(table)


@app.command("demo")
def demo_command(
    keep: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = False,
    report: Annotated[
        Path | None, typer.Option(help="Where to write the HTML report (<data dir>/report.html).")
    ] = None,
) -> None:
    """The main job: start the local stack, run the demo workflows, show the receipts."""
    from chio_receipts.demo._run import DemoOptions, run_demo

    cfg = load_config()
    result = run_or_exit(
        lambda: run_demo(
            cfg,
            console=console,
            options=DemoOptions(keep=keep, report_path=report, restore_logging=False),
        )
    )
    if result.verify_failures:
        raise typer.Exit(1)


@app.command("worker")
@kafka_options
@temporal_options
def worker_command(
    *,
    kafka: KafkaConnection,
    temporal: TemporalConnection,
    task_queue: Annotated[str, typer.Option(help="Task queue to serve.")] = "chio-demo",
    sidecar_url: Annotated[
        str, typer.Option(envvar="CHIO_SIDECAR_URL", help="Policy sidecar URL.")
    ] = "http://127.0.0.1:9090",
    sidecar_token: SidecarTokenOption = None,
    spool_dir: Annotated[
        Path | None, typer.Option(help="Receipt spool directory (<data dir>/spool-<queue>).")
    ] = None,
    default_capability: Annotated[
        str | None,
        typer.Option(
            envvar="CHIO_DEFAULT_CAPABILITY",
            help="Capability granted to every run on this task queue; minted if omitted.",
        ),
    ] = None,
    identity: Annotated[str | None, typer.Option(help="Worker identity.")] = None,
    redact_parameters: Annotated[
        bool,
        typer.Option(
            "--redact-parameters",
            envvar="CHIO_REDACT_PARAMETERS",
            help="Receipts sign only the hash of each activity's arguments, not the arguments.",
        ),
    ] = False,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = DEFAULT_METRICS_HOST,
    wire_format: cli_streamer.WireFormatOption = cli_streamer.WireFormatChoice.SINGLE_OBJECT,
    registry_url: cli_streamer.RegistryUrl = None,
    subject_strategy: cli_streamer.SubjectStrategyOption = SubjectStrategy.TOPIC,
) -> None:
    """Run a demo worker: the demo's workflows and activities behind the interceptor."""
    cli_streamer.check_framing(wire_format, registry_url)
    import os
    import signal

    from chio_receipts.demo._worker import DEFAULT_SCOPE, WorkerSettings, run_worker
    from chio_receipts.interceptor import ArgumentKey, ChioClient
    from chio_receipts.streamer import StreamerMetrics, start_metrics_server

    cfg = load_config()
    secret = os.environ.get("CHIO_ARGUMENT_KEY")
    if secret:
        key = ArgumentKey.from_hex(os.environ.get("CHIO_ARGUMENT_KEY_ID", "args-1"), secret)
    else:
        err.print("warning: CHIO_ARGUMENT_KEY not set; argument digests use a per-process key")
        key = ArgumentKey.generate()
    metrics = None
    if metrics_port is not None:
        registry = CollectorRegistry(auto_describe=True)
        metrics = StreamerMetrics(registry)
        start_metrics_server(metrics_port, registry, addr=metrics_host)

    async def main() -> None:
        capability = default_capability
        if capability is None:
            async with ChioClient(sidecar_url, token=sidecar_token) as chio:
                token = await chio.create_capability(
                    f"agent:{task_queue}", DEFAULT_SCOPE, 24 * 3600
                )
                capability = token.id
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(
            WorkerSettings(
                temporal_address=temporal.address,
                namespace=temporal.namespace,
                temporal=temporal,
                metrics=metrics,
                sidecar_url=sidecar_url,
                sidecar_token=sidecar_token,
                kafka=kafka,
                spool_dir=spool_dir or cfg.data_dir / f"spool-{task_queue}",
                task_queue=task_queue,
                argument_key=key,
                default_capability_id=capability,
                identity=identity,
                redact_parameters=redact_parameters,
                wire_format=cli_streamer.wire_format_of(wire_format),
                registry_url=registry_url,
                subject_strategy=subject_strategy,
            ),
            stop,
        )

    run_or_exit(main)


def main() -> None:
    """Console-script entry point."""
    app()
