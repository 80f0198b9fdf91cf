"""Failpoints of the harness's own code (the oracle sink, the test activities).

The mechanism is the project's own (``consumers.failpoint``): ``CHIO_FAILPOINT`` names points,
comma separated, each ``name[@n][=action]``; the point fires on its ``n``-th hit (default 1) with
``exit`` (``os._exit(137)``, like ``kill -9``) or ``raise``. Inert when unset.
"""

from __future__ import annotations

from chio_receipts.consumers import failpoint

__all__ = ["ENV_VAR", "failpoint", "spec"]

ENV_VAR = "CHIO_FAILPOINT"


def spec(name: str, *, at: int = 1, action: str = "exit") -> dict[str, str]:
    """The environment that arms one point in a child process."""
    return {ENV_VAR: f"{name}@{at}={action}"}
