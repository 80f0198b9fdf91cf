"""Where the owner of an embedded database serves reads: its configuration and its advert.

The process owning a ``chdb://`` path (the one holding ``chio-owner.lock``) serves read-only
queries over ClickHouse's HTTP interface (see ``_readserver``) and advertises where in
``chio-read-endpoint.json`` next to the lock: host, port, pid, and whether a token is needed
(never the token). The file is written atomically and removed on a clean stop; a reader ignores
one whose pid is not alive (the owner was killed).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from chio_receipts.consumers._errors import ConfigError
from chio_receipts.schemas import Secret

__all__ = [
    "DEFAULT_READ_BIND",
    "ENDPOINT_NAME",
    "ReadEndpoint",
    "ReadEndpointConfig",
    "is_loopback",
    "parse_read_bind",
    "pid_alive",
    "read_endpoint",
    "remove_endpoint",
    "write_endpoint",
]

ENDPOINT_NAME = "chio-read-endpoint.json"
DEFAULT_READ_BIND = "127.0.0.1:0"
_OFF = frozenset({"", "off", "none", "no", "false", "0"})


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")  # noqa: S104 - recognizing it, not binding it


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadEndpointConfig:
    """Where and how the owner of an embedded database serves reads.

    A non-loopback ``host`` needs a ``token`` (checked against the HTTP basic-auth password, the
    ``X-ClickHouse-Key`` header or a bearer token). Every query runs with ``readonly=1`` and the
    two limits below, so one read cannot hold the owner's memory or time without bound.
    """

    host: str = "127.0.0.1"
    port: int = 0
    token: Secret | None = field(default=None, repr=False)
    sessions: int = 2
    """Engine sessions (and threads) serving reads at once; more requests wait for one."""
    max_result_bytes: int = 512 * 1024 * 1024
    max_execution_time: int = 300
    max_request_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"read endpoint port {self.port} is out of range")
        if self.token is None and not is_loopback(self.host):
            raise ConfigError(
                f"the read endpoint binds {self.host}, beyond loopback: it needs a read token "
                "(CHIO_READ_TOKEN or --read-token-file)"
            )
        if self.token is not None and not self.token.reveal():
            raise ConfigError("the read token is empty")


def parse_read_bind(value: str | None, token: Secret | None = None) -> ReadEndpointConfig | None:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; port 0: any free port) as a config, or None
    when ``value`` is empty or ``off``."""
    text = (value or "").strip()
    if text.lower() in _OFF:
        return None
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"read bind {text!r} is not HOST:PORT (or off)")
    return ReadEndpointConfig(host=host, port=int(port), token=token)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadEndpoint:
    """An advertised read endpoint: where to connect, who serves it, whether it wants a token."""

    host: str
    port: int
    pid: int
    token_required: bool

    @property
    def connect_host(self) -> str:
        """The address a local reader connects to (loopback for a wildcard bind)."""
        if _wildcard(self.host):
            return "::1" if ":" in self.host else "127.0.0.1"
        return self.host

    def document(self) -> dict[str, object]:
        """The advertised JSON document."""
        return {
            "host": self.host,
            "port": self.port,
            "pid": self.pid,
            "token_required": self.token_required,
        }


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_endpoint(directory: Path, endpoint: ReadEndpoint) -> Path:
    """Advertise ``endpoint`` in ``directory`` (atomically: a reader sees the old file or the
    new one, never half of one)."""
    target = directory / ENDPOINT_NAME
    tmp = directory / f".{ENDPOINT_NAME}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(endpoint.document(), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


def read_endpoint(directory: Path) -> ReadEndpoint | None:
    """The endpoint advertised in ``directory``, or None when there is none, it cannot be read,
    or its process is gone (a stale file)."""
    try:
        doc = json.loads((directory / ENDPOINT_NAME).read_text("utf-8"))
        endpoint = ReadEndpoint(
            host=str(doc["host"]),
            port=int(doc["port"]),
            pid=int(doc["pid"]),
            token_required=bool(doc["token_required"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 < endpoint.port <= 65535 or not pid_alive(endpoint.pid):
        return None
    return endpoint


def remove_endpoint(directory: Path, pid: int | None = None) -> None:
    """Withdraw the advert of ``directory`` (only when it names ``pid``, if given)."""
    target = directory / ENDPOINT_NAME
    if pid is not None:
        current = read_endpoint(directory)
        if current is not None and current.pid != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
