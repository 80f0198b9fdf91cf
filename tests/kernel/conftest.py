"""The real Chio kernel's binaries (``make kernel``); the helpers live in
:mod:`tests.support.kernel` so other directories (the demo's oracle) can use them too.

Tests that need one skip (with the reason) when it is not built: the Rust build takes 15-25
minutes once, so it is not part of ``make test``; ``make test-kernel`` builds and runs them.
"""

from __future__ import annotations

import pytest

from tests.support.kernel import KernelVerify, kernel_bin_dir, kernel_binary, kernel_verifier

__all__ = ["kernel_bin_dir", "kernel_binary", "kernel_verify"]


@pytest.fixture(scope="session")
def kernel_verify() -> KernelVerify:
    """kernel_verify(lines, mode) -> one verdict per line from ``chio-receipt-verify --<mode>``."""
    return kernel_verifier()
