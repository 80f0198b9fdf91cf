"""``async with`` for the objects that own I/O, written once.

Every client, producer, consumer and sink of the project is an idempotent async context manager.
Two shapes recur, and each has a base here:

- :class:`AsyncService`: entering calls ``start()``, leaving calls ``stop()`` (consumers,
  exporters, streamers, spools, sinks);
- :class:`AsyncCloseable`: entering hands the object back as it is, leaving calls ``aclose()``
  (HTTP clients and what wraps them, the httpx convention);
- :class:`Closeable`: the same with plain ``with`` and ``close()``, for objects whose I/O is
  synchronous (the sidecar's SQLite store and data directory).

Subclasses make ``start``, ``stop`` and ``aclose`` idempotent; the bases add no state.
"""

from __future__ import annotations

from typing import Self

__all__ = ["AsyncCloseable", "AsyncService", "Closeable"]


class AsyncService:
    """Base of an object started with :meth:`start` and stopped with :meth:`stop`.

    ``async with service:`` starts it on entry and stops it on exit, exception or not.
    """

    __slots__ = ()

    async def start(self) -> None:
        """Acquire what the object owns (idempotent)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Release what the object owns (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class AsyncCloseable:
    """Base of an object that is usable once built and released with :meth:`aclose`.

    ``async with obj:`` returns ``obj`` and closes it on exit, exception or not.
    """

    __slots__ = ()

    async def aclose(self) -> None:
        """Release what the object owns (idempotent)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class Closeable:
    """Base of an object that is usable once built and released with :meth:`close`.

    ``with obj:`` returns ``obj`` and closes it on exit, exception or not.
    """

    __slots__ = ()

    def close(self) -> None:
        """Release what the object owns (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
