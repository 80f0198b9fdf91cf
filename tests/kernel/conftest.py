"""The real Chio kernel's binaries, built by ``make kernel`` into ``$CHIO_CACHE_DIR/kernel/bin``.

Tests that need one skip (with the reason) when it is not built: the Rust build takes 15-25
minutes once, so it is not part of ``make test``; ``make test-kernel`` builds and runs them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def kernel_bin_dir() -> Path:
    return Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache")) / "kernel" / "bin"


def kernel_binary(name: str) -> Path:
    """The path of a kernel binary, or skip the test with what to run."""
    path = kernel_bin_dir() / name
    if not os.access(path, os.X_OK):
        pytest.skip(f"{name} is not built: run `make kernel` (Rust 1.93+, 20-50 minutes once)")
    return path


@pytest.fixture(scope="session")
def kernel_verify() -> Callable[[Sequence[str], str], list[str]]:
    """kernel_verify(lines, mode) -> one verdict per line from ``chio-receipt-verify --<mode>``."""
    binary = kernel_binary("chio-receipt-verify")

    def run(lines: Sequence[str], mode: str = "receipts") -> list[str]:
        assert all("\n" not in line and line.strip() for line in lines)
        done = subprocess.run(
            [str(binary), f"--{mode}"],
            input="".join(line + "\n" for line in lines),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        verdicts = done.stdout.splitlines()
        assert len(verdicts) == len(lines), done.stdout
        return verdicts

    return run
