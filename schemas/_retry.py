"""One retry helper for every retry loop of the project: tenacity, full jitter, a stop event.

``retry_async(fn, policy=..., stop=...)`` calls ``fn`` until it returns, retrying the exceptions
that ``policy.retry_on`` accepts (by default those whose ``retriable`` attribute is true) with
exponential backoff and full jitter, so many clients that lost the same broker do not come back
in step. A set ``stop`` event ends the waiting at once and re-raises the last error; so does the
attempt or time budget of the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

from chio_receipts.schemas._errors import is_retriable

__all__ = ["RetryPolicy", "retry_async"]

T = TypeVar("T")
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long and how often to retry.

    The wait before attempt ``n`` is a random value in ``[0, min(maximum, initial * 2**n)]``
    (full jitter). ``attempts`` and ``deadline_seconds`` bound the whole; None means unbounded
    (then only the stop event ends it).
    """

    initial_seconds: float = 0.2
    maximum_seconds: float = 10.0
    attempts: int | None = None
    deadline_seconds: float | None = None
    retry_on: Callable[[BaseException], bool] = field(default=is_retriable)
    describe: str = "operation"
    """Named in the warning logged before each wait (never the arguments of the call)."""


class _StopWhenSet(tenacity.stop.stop_base):
    """Stop retrying once an asyncio event is set (tenacity's own takes a threading event)."""

    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._event.is_set()


async def _sleep_or_stop(stop: asyncio.Event | None, seconds: float) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy | None = None,
    stop: asyncio.Event | None = None,
    on_retry: Callable[[BaseException, int], None] | None = None,
) -> T:
    """``await fn()`` until it succeeds; retry what ``policy.retry_on`` accepts.

    A non-retriable error, a set ``stop`` event, or an exhausted budget re-raises the last error
    unchanged. ``on_retry(error, attempt)`` is called before each wait (metrics, state resets).
    """
    p = policy or RetryPolicy()
    stops: list[tenacity.stop.stop_base] = []
    if p.attempts is not None:
        stops.append(tenacity.stop_after_attempt(p.attempts))
    if p.deadline_seconds is not None:
        stops.append(tenacity.stop_after_delay(p.deadline_seconds))
    if stop is not None:
        stops.append(_StopWhenSet(stop))

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if exc is None:
            return
        _log.warning(
            "%s failed (%s), attempt %d; retrying in %.2fs",
            p.describe,
            type(exc).__name__,
            state.attempt_number,
            state.upcoming_sleep,
        )
        if on_retry is not None:
            on_retry(exc, state.attempt_number)

    async def sleep(seconds: float) -> None:
        await _sleep_or_stop(stop, seconds)

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_any(*stops),
        wait=tenacity.wait_random_exponential(multiplier=p.initial_seconds, max=p.maximum_seconds),
        retry=tenacity.retry_if_exception(p.retry_on),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )

    async def attempt() -> T:
        # tenacity awaits only coroutine functions: a lambda returning an awaitable would come
        # back unawaited, so every call goes through this one.
        return await fn()

    return await retrying(attempt)
