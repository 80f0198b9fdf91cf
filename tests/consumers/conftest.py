"""Make the repository root importable ahead of this test folder's namespace-package twin.

``tests/<name>`` shares its name with the top-level package it tests; with pytest's rootdir
insertion, ``import <name>`` would otherwise resolve to this folder as a namespace package.
A regular package anywhere on ``sys.path`` wins over a namespace portion, so appending the
root is enough.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


@pytest.fixture
def clickhouse_dsn(clickhouse_dsn: str, unique: Callable[[str], str]) -> str:
    """The session's DSN; on a ClickHouse server, a database of this test's own (the
    consumer creates it), so tests that count rows never see each other's."""
    if clickhouse_dsn.startswith("chdb:"):
        return clickhouse_dsn
    parsed = urlparse(clickhouse_dsn)
    database = unique("t").replace("-", "_")[:60]
    return urlunparse(parsed._replace(path=f"/{database}"))
