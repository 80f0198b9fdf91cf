"""A child process with its log in a file, stopped with SIGTERM, a wait, then SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from chio_receipts.stack._errors import PortBusyError

__all__ = [
    "ManagedProcess",
    "free_port",
    "log_tail",
    "pid_alive",
    "require_port_free",
    "stop_pid",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def require_port_free(component: str, port: int, flag: str) -> None:
    """Raise :class:`PortBusyError` when ``port`` on 127.0.0.1 cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise PortBusyError(
                component,
                f"port {port} busy",
                f"stop what listens on {port} (`ss -ltnp | grep {port}`) or pass {flag} 0 "
                "to pick a free port",
            ) from None


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        data = path.read_bytes()[-16_384:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True while a process with ``pid`` exists (and is not a zombie we own)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        waited = 0
    if waited == pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``pid``, wait up to ``timeout``, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


class ManagedProcess:
    """One service process in its own session, its output appended to ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id while started."""
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the process detached in a new session (so a group signal reaches children)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process group (kill -9, SIGSTOP, SIGCONT in fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None
