"""Process-level configuration, read from the environment in one place (the CLI entry point)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AppConfig", "load_config"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AppConfig:
    """Where the local stack keeps its data and its downloaded jars."""

    data_dir: Path
    cache_dir: Path
    clickhouse_dsn: str | None


def load_config() -> AppConfig:
    """Read CHIO_DATA_DIR, CHIO_CACHE_DIR and CHIO_CLICKHOUSE_DSN (defaults: ./.data, ./.cache)."""
    return AppConfig(
        data_dir=Path(os.environ.get("CHIO_DATA_DIR", ".data")).resolve(),
        cache_dir=Path(os.environ.get("CHIO_CACHE_DIR", ".cache")).resolve(),
        clickhouse_dsn=os.environ.get("CHIO_CLICKHOUSE_DSN") or None,
    )
