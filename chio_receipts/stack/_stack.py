"""The local stack: Temporal dev server + Kafka broker (+ the ClickHouse DSN), started together,
plus a Confluent-compatible schema registry (Apicurio) when asked for.

Used by the CLI (`chio-receipts dev up|down|status`) and by the test fixtures. The CLI leaves the
services running after it exits, so it records their pids and ports in ``<data dir>/stack.json``.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from chio_receipts.stack._clickhouse import default_clickhouse_dsn
from chio_receipts.stack._errors import StackError
from chio_receipts.stack._kafka import KafkaBroker, KafkaConfig
from chio_receipts.stack._process import pid_alive, stop_pid
from chio_receipts.stack._registry import ApicurioRegistry, RegistryConfig
from chio_receipts.stack._temporal import TemporalConfig, TemporalServer

__all__ = ["LocalStack", "StackConfig", "StackState", "read_state", "stop_recorded"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StackConfig:
    """Configuration of the local stack (ports 0 = pick free ports)."""

    data_dir: Path
    cache_dir: Path
    temporal_port: int = 0
    kafka_port: int = 0
    kafka_heap: str = "512m"
    clickhouse_dsn: str | None = None
    with_registry: bool = False
    """Also start Apicurio Registry (Confluent-compatible API) for Confluent framing."""
    registry_port: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StackState:
    """What a running stack looks like from outside: addresses and pids."""

    temporal_address: str
    kafka_bootstrap: str
    clickhouse_dsn: str
    temporal_pid: int
    kafka_pid: int
    data_dir: str
    registry_url: str = ""
    """Confluent-compatible API of the registry; "" when the stack runs without one."""
    registry_pid: int = 0


class LocalStack:
    """Starts Temporal and Kafka; an idempotent async context manager."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.temporal = TemporalServer(
            TemporalConfig(data_dir=config.data_dir, port=config.temporal_port)
        )
        self.kafka = KafkaBroker(
            KafkaConfig(
                data_dir=config.data_dir,
                cache_dir=config.cache_dir,
                port=config.kafka_port,
                heap=config.kafka_heap,
            )
        )
        self.registry = (
            ApicurioRegistry(
                RegistryConfig(
                    data_dir=config.data_dir, cache_dir=config.cache_dir, port=config.registry_port
                )
            )
            if config.with_registry
            else None
        )
        self.clickhouse_dsn = config.clickhouse_dsn or default_clickhouse_dsn(config.data_dir)
        self._started = False

    @property
    def temporal_address(self) -> str:
        """host:port of the Temporal frontend."""
        return self.temporal.address

    @property
    def kafka_bootstrap(self) -> str:
        """bootstrap.servers of the broker."""
        return self.kafka.bootstrap

    @property
    def registry_url(self) -> str:
        """Confluent-compatible API of the registry ("" without one)."""
        return self.registry.url if self.registry is not None else ""

    async def start(self) -> None:
        """Start the services (Kafka first: its JVM takes longest); stop all on failure."""
        if self._started:
            return
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self.kafka.start()
            await self.temporal.start()
            if self.registry is not None:
                await self.registry.start()
        except BaseException:
            self.stop()
            raise
        self._started = True

    def state(self) -> StackState:
        """The running stack's addresses and pids."""
        return StackState(
            temporal_address=self.temporal_address,
            kafka_bootstrap=self.kafka_bootstrap,
            clickhouse_dsn=self.clickhouse_dsn,
            temporal_pid=(self.temporal.process.pid or 0) if self.temporal.process else 0,
            kafka_pid=(self.kafka.process.pid or 0) if self.kafka.process else 0,
            data_dir=str(self.config.data_dir),
            registry_url=self.registry_url,
            registry_pid=(
                (self.registry.process.pid or 0)
                if self.registry is not None and self.registry.process
                else 0
            ),
        )

    def write_state(self) -> Path:
        """Record the running stack in ``<data dir>/stack.json`` for `dev status|down`."""
        path = self.config.data_dir / "stack.json"
        path.write_text(json.dumps(asdict(self.state()), indent=2))
        return path

    def stop(self) -> None:
        """Stop the registry, Temporal, then Kafka; idempotent."""
        if self.registry is not None:
            self.registry.stop()
        self.temporal.stop()
        self.kafka.stop()
        self._started = False
        (self.config.data_dir / "stack.json").unlink(missing_ok=True)

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def read_state(data_dir: Path) -> StackState | None:
    """The recorded state of a stack started by `dev up`, or None."""
    path = data_dir / "stack.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        return StackState(**raw)
    except TypeError as exc:
        raise StackError("stack", f"{path} is not a stack state file", f"remove {path}") from exc


def port_open(address: str) -> bool:
    """True when a TCP connection to ``host:port`` succeeds within a second."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def stop_recorded(data_dir: Path) -> list[str]:
    """Stop the services recorded in ``stack.json``; returns what was stopped."""
    state = read_state(data_dir)
    if state is None:
        return []
    stopped = []
    recorded = (
        ("registry", state.registry_pid),
        ("temporal", state.temporal_pid),
        ("kafka", state.kafka_pid),
    )
    for name, pid in recorded:
        if pid and pid_alive(pid):
            stop_pid(pid)
            stopped.append(f"{name} (pid {pid})")
    (data_dir / "stack.json").unlink(missing_ok=True)
    return stopped
