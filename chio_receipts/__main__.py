"""``python -m chio_receipts`` runs the CLI."""

from __future__ import annotations

from chio_receipts.cli import main

main()
