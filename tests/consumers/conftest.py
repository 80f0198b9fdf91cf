"""Fixtures of the consumer tests."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlparse, urlunparse

import pytest


@pytest.fixture
def clickhouse_dsn(clickhouse_dsn: str, unique: Callable[[str], str]) -> str:
    """The session's DSN; on a ClickHouse server, a database of this test's own (the
    consumer creates it), so tests that count rows never see each other's."""
    if clickhouse_dsn.startswith("chdb:"):
        return clickhouse_dsn
    parsed = urlparse(clickhouse_dsn)
    database = unique("t").replace("-", "_")[:60]
    return urlunparse(parsed._replace(path=f"/{database}"))
