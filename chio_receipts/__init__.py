"""chio-receipts application: the CLI, the local stack and the demo that wire the packages."""

from __future__ import annotations

__all__: list[str] = []
