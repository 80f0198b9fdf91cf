"""A real Confluent-compatible schema registry: Apicurio Registry, in-memory store.

Its ready-to-run package (``io.apicurio:apicurio-registry-app``, classifier ``all``, a tar.gz of
a Quarkus runner jar and its ``lib/``) is downloaded once from Maven Central into the cache
directory, checked against Maven Central's SHA-1, and unpacked; it runs under the machine's
Java 17+ with a bounded heap. The Confluent-compatible API is served at ``/apis/ccompat/v7``:
that URL (:attr:`ApicurioRegistry.url`) is what clients, and ClickHouse's
``format_avro_schema_registry_url``, are given.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import httpx

from chio_receipts.stack._errors import StackError
from chio_receipts.stack._kafka import java_binary
from chio_receipts.stack._process import ManagedProcess, free_port, log_tail, require_port_free

__all__ = [
    "APICURIO_VERSION",
    "CCOMPAT_PATH",
    "ApicurioRegistry",
    "RegistryConfig",
    "ensure_registry_package",
]

APICURIO_VERSION = "3.0.9"
CCOMPAT_PATH = "/apis/ccompat/v7"
_ARTIFACT = f"apicurio-registry-app-{APICURIO_VERSION}"
_MAVEN_URL = (
    "https://repo1.maven.org/maven2/io/apicurio/apicurio-registry-app/"
    f"{APICURIO_VERSION}/{_ARTIFACT}-all.tar.gz"
)


def _download(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as resp, dest.open("wb") as out:  # noqa: S310
        shutil.copyfileobj(resp, out, 1 << 20)


def ensure_registry_package(cache_dir: Path) -> Path:
    """Download and unpack the Apicurio package into ``cache_dir`` once; its directory."""
    home = cache_dir / f"apicurio-registry-{APICURIO_VERSION}"
    marker = home / ".complete"
    if marker.exists():
        return home
    home.mkdir(parents=True, exist_ok=True)
    archive = home / f"{_ARTIFACT}-all.tar.gz"
    try:
        _download(_MAVEN_URL, archive)
        _download(_MAVEN_URL + ".sha1", home / "archive.sha1")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise StackError(
            "registry",
            f"cannot download {_MAVEN_URL}: {exc}",
            "check that Maven Central (repo1.maven.org) is reachable over HTTPS",
        ) from exc
    expected = (home / "archive.sha1").read_text().split()[0].strip().lower()
    digest = hashlib.sha1(usedforsecurity=False)
    with archive.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        archive.unlink(missing_ok=True)
        raise StackError(
            "registry",
            f"the downloaded {archive.name} does not match Maven Central's SHA-1",
            "try again (the download was probably cut short)",
        )
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(home, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise StackError("registry", f"cannot unpack {archive}: {exc}", f"remove {home}") from exc
    if not (home / f"{_ARTIFACT}-runner.jar").exists():
        raise StackError("registry", f"{archive.name} has no {_ARTIFACT}-runner.jar")
    archive.unlink()
    marker.write_text(APICURIO_VERSION)
    return home


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    """Where and how the registry runs. Port 0 picks a free port."""

    data_dir: Path
    cache_dir: Path
    port: int = 0
    heap: str = "512m"
    ready_timeout: float = 120.0


class ApicurioRegistry:
    """One Apicurio Registry process (in-memory: its schemas last as long as the process)."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        if config.port:
            require_port_free("registry", config.port, "--registry-port")
        self.port = config.port or free_port()
        self.dir = config.data_dir / "registry"
        self.log_path = self.dir / "registry.log"
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """Base URL of the Confluent-compatible API (what registry clients are given)."""
        return f"http://127.0.0.1:{self.port}{CCOMPAT_PATH}"

    def _argv(self) -> list[str]:
        java = java_binary()
        home = ensure_registry_package(self.config.cache_dir)
        return [
            java,
            f"-Xmx{self.config.heap}",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self.port}",
            "-jar",
            str(home / f"{_ARTIFACT}-runner.jar"),
        ]

    async def start(self) -> None:
        """Fetch the package on first use, start the registry, wait until its API answers."""
        argv = await asyncio.to_thread(self._argv)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess("registry", argv, self.log_path, dict(os.environ))
        self.process.start()
        try:
            await self._wait_ready()
        except BaseException:
            self.stop()
            raise

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        last = ""
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process is not None and (code := self.process.exited()) is not None:
                    raise StackError(
                        "registry",
                        f"Apicurio Registry exited with code {code} while starting",
                        f"read {self.log_path}",
                        log_tail(self.log_path),
                    )
                try:
                    resp = await client.get(f"{self.url}/subjects")
                    if resp.status_code == 200:
                        return
                    last = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    last = type(exc).__name__
                await asyncio.sleep(0.5)
        raise StackError(
            "registry",
            f"Apicurio Registry at {self.url} did not answer within "
            f"{self.config.ready_timeout:.0f}s ({last})",
            f"read {self.log_path}",
            log_tail(self.log_path),
        )

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL; idempotent."""
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None
