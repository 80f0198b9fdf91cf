"""The real Chio kernel's binaries, built by ``make kernel`` into ``$CHIO_CACHE_DIR/kernel/bin``.

Tests that need one skip (with the reason) when it is not built: the Rust build takes 15-25
minutes once, so it is not part of ``make test``; ``make test-kernel`` builds and runs them.
Shared by ``tests/kernel`` (its ``kernel_verify`` fixture) and the demo's oracle test.
"""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

KernelVerify = Callable[[Sequence[str], str], list[str]]
"""``verify(lines, mode)``: one verdict per line from ``chio-receipt-verify --<mode>``."""


def kernel_bin_dir() -> Path:
    return Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache")) / "kernel" / "bin"


def kernel_binary(name: str) -> Path:
    """The path of a kernel binary, or skip the test with what to run."""
    path = kernel_bin_dir() / name
    if not os.access(path, os.X_OK):
        pytest.skip(f"{name} is not built: run `make kernel` (Rust 1.93+, 20-50 minutes once)")
    return path


def kernel_verifier() -> KernelVerify:
    """``chio-receipt-verify`` as a function (skips the test when it is not built)."""
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


def tampered_receipts(receipt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Copies of a signed Chio receipt, each with one thing changed after signing (its id and
    signature kept): every verifier must refuse each of them."""

    def changed(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        copy_ = copy.deepcopy(receipt)
        edit(copy_)
        return copy_

    def reason(r: dict[str, Any]) -> None:
        # An allow has no reason: a "reason" added to it is an unknown field, which both the
        # kernel and our verifier drop before canonicalising, so it is not a change. Rewrite
        # the tool server instead.
        if "reason" in r["decision"]:
            r["decision"]["reason"] = str(r["decision"]["reason"]) + " (rewritten)"
        else:
            r["tool_server"] = r["tool_server"] + "-x"

    def verdict(r: dict[str, Any]) -> None:
        if r["decision"]["verdict"] == "deny":
            r["decision"] = {"verdict": "allow"}
        else:
            r["decision"] = {"verdict": "deny", "reason": "flipped", "guard": "kernel"}

    def parameters(r: dict[str, Any]) -> None:
        r["action"]["parameters"] = {**r["action"]["parameters"], "injected": 1}

    def signature(r: dict[str, Any]) -> None:
        sig = r["signature"]
        r["signature"] = sig[:5] + ("0" if sig[5] != "0" else "1") + sig[6:]

    def tool(r: dict[str, Any]) -> None:
        r["tool_name"] = r["tool_name"] + "-x"

    def timestamp(r: dict[str, Any]) -> None:
        r["timestamp"] = r["timestamp"] + 1

    return {
        "reason": changed(reason),
        "verdict": changed(verdict),
        "parameters": changed(parameters),
        "signature": changed(signature),
        "tool": changed(tool),
        "timestamp": changed(timestamp),
    }
