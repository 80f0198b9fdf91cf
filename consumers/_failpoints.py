"""Fault-injection points for the fault suite.

``CHIO_FAILPOINT`` names the points to arm, comma separated, each ``name[@n][=action]``:
the point fires on its ``n``-th hit (default 1) with ``action`` ``exit`` (``os._exit(137)``,
like ``kill -9``: nothing is flushed) or ``raise`` (:class:`FailpointError`). Unset, every point
is inert and costs one dict lookup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from chio_receipts.consumers._errors import FailpointError

__all__ = ["ENV_VAR", "failpoint", "reset_failpoints"]

ENV_VAR = "CHIO_FAILPOINT"


@dataclass(slots=True, kw_only=True)
class _Point:
    at: int
    action: str
    hits: int = field(default=0)


def _parse(spec: str) -> dict[str, _Point]:
    points: dict[str, _Point] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        name, _, at = name.partition("@")
        points[name] = _Point(at=int(at or "1"), action=action or "exit")
    return points


_points: dict[str, _Point] = _parse(os.environ.get(ENV_VAR, ""))


def reset_failpoints(spec: str | None = None) -> None:
    """Re-arm from ``spec`` (or the environment when None); for tests."""
    global _points  # process-wide switchboard, by design
    _points = _parse(os.environ.get(ENV_VAR, "") if spec is None else spec)


def failpoint(name: str) -> None:
    """Fire the point ``name`` if it is armed and this is its configured hit."""
    if not _points:
        return
    point = _points.get(name)
    if point is None:
        return
    point.hits += 1
    if point.hits != point.at:
        return
    if point.action == "raise":
        raise FailpointError(f"failpoint {name} fired")
    os._exit(137)
