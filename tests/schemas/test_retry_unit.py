"""``retry_async``: callables returning awaitables, retriable and final errors, the stop event."""

from __future__ import annotations

import asyncio

import pytest

from chio_receipts.schemas import ChioReceiptsError, RetryPolicy, retry_async

pytestmark = pytest.mark.unit
FAST = RetryPolicy(initial_seconds=0.001, maximum_seconds=0.01)


class _Transient(ChioReceiptsError):
    retriable = True


async def test_a_lambda_returning_a_coroutine_is_awaited_and_retried() -> None:
    calls: list[int] = []

    async def flaky() -> tuple[int, int]:
        calls.append(1)
        if len(calls) < 3:
            raise _Transient("not yet")
        return (1, 2)

    a, b = await retry_async(lambda: flaky(), policy=FAST)
    assert (a, b) == (1, 2)
    assert len(calls) == 3


async def test_a_final_error_is_raised_at_once() -> None:
    calls: list[int] = []

    async def refused() -> None:
        calls.append(1)
        raise ChioReceiptsError("no")

    with pytest.raises(ChioReceiptsError, match="no"):
        await retry_async(refused, policy=FAST)
    assert len(calls) == 1


async def test_a_set_stop_event_ends_the_waiting_with_the_last_error() -> None:
    stop = asyncio.Event()
    calls: list[int] = []

    async def down() -> None:
        calls.append(1)
        if len(calls) == 2:
            stop.set()
        raise _Transient(f"down {len(calls)}")

    with pytest.raises(_Transient, match="down 2"):
        await asyncio.wait_for(retry_async(down, policy=FAST, stop=stop), 5)
