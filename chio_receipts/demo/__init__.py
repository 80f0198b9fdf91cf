"""The demo pipeline run by `chio-receipts demo` (the README's first command).

Deliberately empty: the workflow sandbox imports this package when it loads the demo's
workflows, so nothing heavy may be imported here. Entry points: ``chio_receipts.demo._run``.
"""

from __future__ import annotations

__all__: list[str] = []
