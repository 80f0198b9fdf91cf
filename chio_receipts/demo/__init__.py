"""The demo pipeline run by `chio-receipts demo` (the README's first command)."""

from __future__ import annotations

from chio_receipts.demo._run import run_demo

__all__ = ["run_demo"]
