"""JSON lines output: one OCSF event per line to a file (appended, fsync'd per batch) or stdout."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from chio_receipts.consumers._errors import OutputUnavailable

__all__ = ["JsonLinesOutput"]


class JsonLinesOutput:
    """One JSON object per line to a file (appended, fsync'd per batch) or stdout (``-``)."""

    name = "jsonl"

    def __init__(self, target: str) -> None:
        self._target = target
        self._fh: Any = None

    async def __aenter__(self) -> Self:
        if self._target != "-" and self._fh is None:
            path = Path(self._target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = await asyncio.to_thread(path.open, "a", encoding="utf-8")
        return self

    async def __aexit__(self, *exc: object) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()

    async def write(self, batch: Sequence[Mapping[str, Any]]) -> None:
        """Write and flush the batch."""
        text = "".join(json.dumps(e, separators=(",", ":"), sort_keys=True) + "\n" for e in batch)
        try:
            if self._fh is None:
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                await asyncio.to_thread(self._write, text)
        except OSError as exc:
            raise OutputUnavailable(f"jsonl: {exc}") from exc

    def _write(self, text: str) -> None:
        self._fh.write(text)
        self._fh.flush()
        os.fsync(self._fh.fileno())
