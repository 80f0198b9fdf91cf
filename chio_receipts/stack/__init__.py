"""The local stack: a real Temporal dev server, a real Kafka broker, ClickHouse via chDB.

One module for the CLI and the test fixtures; no Docker needed.
"""

from __future__ import annotations

from chio_receipts.stack._clickhouse import connect_clickhouse, default_clickhouse_dsn, is_chdb
from chio_receipts.stack._errors import PortBusyError, StackError
from chio_receipts.stack._kafka import (
    KAFKA_VERSION,
    KafkaBroker,
    KafkaConfig,
    ensure_kafka_jars,
    java_binary,
)
from chio_receipts.stack._process import free_port
from chio_receipts.stack._registry import (
    APICURIO_VERSION,
    CCOMPAT_PATH,
    ApicurioRegistry,
    RegistryConfig,
    ensure_registry_package,
)
from chio_receipts.stack._stack import (
    LocalStack,
    StackConfig,
    StackState,
    port_open,
    read_state,
    stop_recorded,
)
from chio_receipts.stack._temporal import TemporalConfig, TemporalServer, temporal_binary

__all__ = [
    "APICURIO_VERSION",
    "CCOMPAT_PATH",
    "KAFKA_VERSION",
    "ApicurioRegistry",
    "KafkaBroker",
    "KafkaConfig",
    "LocalStack",
    "PortBusyError",
    "RegistryConfig",
    "StackConfig",
    "StackError",
    "StackState",
    "TemporalConfig",
    "TemporalServer",
    "connect_clickhouse",
    "default_clickhouse_dsn",
    "ensure_kafka_jars",
    "ensure_registry_package",
    "free_port",
    "is_chdb",
    "java_binary",
    "port_open",
    "read_state",
    "stop_recorded",
    "temporal_binary",
]
