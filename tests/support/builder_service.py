"""A receipt builder service run in the test's own event loop (real Kafka and ClickHouse)."""

from __future__ import annotations

import asyncio
from typing import Any

from chio_receipts.consumers import BuilderConfig, ReceiptBuilderService

__all__ = ["Running"]


class Running:
    """A builder service running in this process until the context exits."""

    def __init__(self, config: BuilderConfig) -> None:
        self.service = ReceiptBuilderService(config)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        await self.service.start()
        self._task = asyncio.create_task(self.service.run(self._stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)
        await self.service.stop()

    def check(self) -> None:
        """Raise what the service loop raised, if it ended."""
        if self._task is not None and self._task.done():
            self._task.result()

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` (after surfacing a crash of the loop)."""
        self.check()
        _, rows = await self.service.sink.query(sql)
        return rows

    async def scalar(self, sql: str) -> Any:
        """The first value of ``sql``."""
        _, rows = await self.service.sink.query(sql)
        return rows[0][0]
