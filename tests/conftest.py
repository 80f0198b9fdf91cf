"""Session fixtures: one real Temporal dev server and one real Kafka broker per test session.

They start only when a test asks for them; a service that cannot start fails the tests that
need it with the stack's own message (never a skip).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from temporalio.client import Client

from chio_receipts.stack import (
    ApicurioRegistry,
    LocalStack,
    RegistryConfig,
    StackConfig,
    StackError,
)

REPO = Path(__file__).resolve().parent.parent


def _cache_dir() -> Path:
    return Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache"))


@pytest.fixture(scope="session")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalStack]:
    """A running local stack (Kafka + Temporal) for the whole session."""
    data_dir = tmp_path_factory.mktemp("stack")
    local = LocalStack(StackConfig(data_dir=data_dir, cache_dir=_cache_dir()))
    try:
        await local.start()
    except StackError as exc:
        pytest.fail(f"the local stack could not start:\n{exc}", pytrace=False)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
async def schema_registry_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """Confluent-compatible API URL of a real schema registry (Apicurio Registry, in memory),
    started once per session when a test asks for it; a start failure fails those tests."""
    registry = ApicurioRegistry(
        RegistryConfig(data_dir=tmp_path_factory.mktemp("registry"), cache_dir=_cache_dir())
    )
    try:
        await registry.start()
    except StackError as exc:
        pytest.fail(f"the schema registry could not start:\n{exc}", pytrace=False)
    try:
        yield registry.url
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(stack: LocalStack) -> str:
    """bootstrap.servers of the session's real Kafka broker."""
    return stack.kafka_bootstrap


@pytest.fixture(scope="session")
def temporal_address(stack: LocalStack) -> str:
    """host:port of the session's real Temporal dev server."""
    return stack.temporal_address


@pytest.fixture(scope="session")
async def temporal_client(temporal_address: str) -> Client:
    """A client connected to the session's Temporal dev server."""
    return await Client.connect(temporal_address)


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """unique("topic") -> a name unique to this test (topics, task queues, databases)."""
    base = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[-40:].strip("-").lower()

    def make(prefix: str) -> str:
        return f"{prefix}-{base}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def clickhouse_dsn(tmp_path: Path) -> str:
    """A fresh chDB DSN per test, or the server DSN in CHIO_TEST_CLICKHOUSE_DSN."""
    server = os.environ.get("CHIO_TEST_CLICKHOUSE_DSN")
    return server if server else f"chdb://{tmp_path / 'clickhouse'}"
