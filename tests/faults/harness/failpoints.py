"""Failpoints of the harness's own code (the oracle sink, the test activities).

Same convention as the project's: ``CHIO_FAILPOINT`` names points, comma separated, each
``name[@n][=action]``; the point fires on its ``n``-th hit (default 1) with ``exit``
(``os._exit(137)``, like ``kill -9``) or ``raise`` (:class:`FailpointFired`). Inert when unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ENV_VAR", "FailpointFired", "failpoint", "spec"]

ENV_VAR = "CHIO_FAILPOINT"


class FailpointFired(Exception):
    """A failpoint armed with the ``raise`` action fired."""


@dataclass(slots=True)
class _Point:
    at: int
    action: str
    hits: int = 0


def _parse(text: str) -> dict[str, _Point]:
    points: dict[str, _Point] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, action = item.partition("=")
        name, _, at = name.partition("@")
        points[name] = _Point(at=int(at or "1"), action=action or "exit")
    return points


_POINTS = _parse(os.environ.get(ENV_VAR, ""))


def failpoint(name: str) -> None:
    """Fire ``name`` if armed and this is its configured hit."""
    point = _POINTS.get(name) if _POINTS else None
    if point is None:
        return
    point.hits += 1
    if point.hits != point.at:
        return
    if point.action == "raise":
        raise FailpointFired(f"failpoint {name} fired")
    os._exit(137)


def spec(name: str, *, at: int = 1, action: str = "exit") -> dict[str, str]:
    """The environment that arms one point in a child process."""
    return {ENV_VAR: f"{name}@{at}={action}"}
