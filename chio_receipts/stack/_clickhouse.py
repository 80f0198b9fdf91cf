"""ClickHouse through clickhouse-connect: the embedded chDB engine by default, a server by DSN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import clickhouse_connect

from chio_receipts.stack._errors import StackError

__all__ = ["connect_clickhouse", "default_clickhouse_dsn", "is_chdb"]


def default_clickhouse_dsn(data_dir: Path) -> str:
    """``chdb:///<data dir>/clickhouse``: the engine in-process, data on disk."""
    return f"chdb://{(data_dir / 'clickhouse').resolve()}"


def is_chdb(dsn: str) -> bool:
    """True for a chDB (embedded) DSN."""
    return dsn.startswith("chdb:")


def connect_clickhouse(dsn: str) -> Any:
    """A clickhouse-connect client for ``dsn``; a failure becomes one clear StackError."""
    try:
        return clickhouse_connect.get_client(dsn=dsn)
    except Exception as exc:
        text = str(exc)
        if "EmbeddedServer" in text or "lock" in text.lower():
            raise StackError(
                "clickhouse",
                f"the chDB database of {dsn} is open in another process",
                "one process owns a chDB path: stop the consumer (`chio-receipts dev down`) or "
                "query through a ClickHouse server DSN",
            ) from exc
        raise StackError(
            "clickhouse", f"cannot open {dsn}: {type(exc).__name__}: {text[:300]}"
        ) from exc
