"""Child processes the fault suite can ``kill -9``, ``SIGSTOP``/``SIGCONT``, stop and restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Child", "rss_bytes"]

REPO = Path(__file__).resolve().parents[3]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


class Child:
    """One child process running ``python -m <module> <args>``, logging to ``log_path``."""

    def __init__(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.args = list(args)
        self.log_path = log_path
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Start (again); ``env`` adds to the environment of this start only."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        # Failpoints are armed per start only, never inherited from the test process.
        full = {k: v for k, v in os.environ.items() if k != "CHIO_FAILPOINT"}
        full.update({"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
        full.update(self.env)
        full.update(env or {})
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=REPO,
                env=full,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self.starts += 1

    @property
    def pid(self) -> int:
        """The running process's pid (0 when not running)."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else 0

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        """Exit code once exited (negative: killed by that signal)."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` if running."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """Wait for exit; returns the code (TimeoutError after ``timeout``)."""
        assert self.proc is not None
        code = await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
        self.exit_codes.append(code)
        return code

    async def kill9(self) -> None:
        """``kill -9`` and reap."""
        if self.alive():
            self.signal(signal.SIGKILL)
            await self.wait(10)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        if not self.alive():
            return self.returncode() or 0
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return await self.wait(timeout)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the child's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
