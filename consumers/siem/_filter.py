"""Which OCSF events are exported (pure). A denial always passes unless dropped explicitly; a real
gap (an attempt Temporal started whose receipt does not exist) always passes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chio_receipts.consumers.siem._ocsf import is_deny, is_gap

__all__ = ["EventFilter"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventFilter:
    """Which events to export. A denial always passes unless ``drop_denies`` is set; a real gap
    (a MISSING attempt of an envelope) always passes: no filter hides a missing receipt."""

    deny_only: bool = False
    tool_servers: frozenset[str] | None = None
    drop_denies: bool = False

    def keep(self, event: Mapping[str, Any]) -> bool:
        """True when ``event`` is exported."""
        if is_gap(event):
            return True
        if is_deny(event):
            return not self.drop_denies
        if self.deny_only:
            return False
        if self.tool_servers is not None:
            return str(event.get("api", {}).get("service", {}).get("name")) in self.tool_servers
        return True
