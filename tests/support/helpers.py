"""Test helpers: poll for side effects instead of sleeping."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 30.0,
    interval: float = 0.1,
) -> Any:
    """Call ``predicate`` (sync or async) until it returns something truthy; return that.

    Raises AssertionError with the last value (or exception) when ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except AssertionError as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout}s; last value: {last!r}")
        await asyncio.sleep(interval)
