"""A real Apache Kafka 4.x broker: one KRaft node in combined broker+controller mode.

The jars come from Maven Central through ``kafka/pom.xml`` (Kafka plus a log4j2 backend, which
Kafka 4 module jars do not carry), copied into a cache directory once; the broker runs under the
machine's Java 17+ with a bounded heap.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from chio_receipts.stack._errors import StackError
from chio_receipts.stack._process import ManagedProcess, free_port, log_tail, require_port_free

__all__ = ["KAFKA_VERSION", "KafkaBroker", "KafkaConfig", "ensure_kafka_jars", "java_binary"]

KAFKA_VERSION = "4.1.1"


def java_binary() -> str:
    """The java executable (JAVA_HOME first), checked to be version 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise StackError(
            "kafka",
            "java not found",
            "install a JDK 17+ (Debian: `apt-get install openjdk-17-jdk-headless`) "
            "or set JAVA_HOME",
        )
    out = subprocess.run(
        [java, "-version"], capture_output=True, text=True, timeout=30, check=False
    ).stderr
    match = re.search(r'version "(\d+)', out)
    if match is None or int(match.group(1)) < 17:
        raise StackError(
            "kafka",
            f"java at {java} is not 17 or newer ({out.strip().splitlines()[0] if out else '?'})",
            "install a JDK 17+ or point JAVA_HOME at one",
        )
    return java


def ensure_kafka_jars(cache_dir: Path) -> Path:
    """Resolve the broker's jars with Maven into ``cache_dir`` once; return the jar directory."""
    libs = cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "kafka",
            "mvn not found, and the Kafka jars are not cached yet",
            "install Maven (Debian: `apt-get install maven`); it fetches the jars from Maven "
            "Central once",
        )
    libs.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("chio_receipts.stack").joinpath("kafka")) as kdir:
        proc = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(kdir / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={libs}",
                "-DincludeScope=runtime",
                f"-Dkafka.version={KAFKA_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    if proc.returncode != 0 or not any(libs.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        raise StackError(
            "kafka",
            f"Maven could not resolve org.apache.kafka:kafka_2.13:{KAFKA_VERSION}",
            "check that Maven Central is reachable (proxy settings in ~/.m2/settings.xml)",
            "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]),
        )
    marker.write_text(KAFKA_VERSION)
    return libs


def _cluster_id() -> str:
    """A random KRaft cluster id (URL-safe base64 of a UUID). One starting with '-' would be
    read as an option by the storage tool, so such ids are drawn again (Kafka does the same)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaConfig:
    """Where and how the broker runs. Port 0 picks a free port."""

    data_dir: Path
    cache_dir: Path
    port: int = 0
    heap: str = "512m"
    ready_timeout: float = 90.0
    sasl_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """Users (name, password) of a second listener, SASL_PLAINTEXT with the PLAIN mechanism;
    none = no such listener. The PLAINTEXT listener stays for the stack's own readiness check."""
    tls: tuple[Path, str] | None = field(default=None, repr=False)
    """(PKCS12 keystore, its password) of a TLS listener (protocol SSL); None = no such listener."""


_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dir}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
"""


class KafkaBroker:
    """One KRaft node; ``kill()`` and ``restart()`` keep ports and data (fault tests)."""

    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        if config.port:
            require_port_free("kafka", config.port, "--kafka-port")
        self.port = config.port or free_port()
        self.controller_port = free_port()
        self.sasl_port = free_port() if config.sasl_users else 0
        self.tls_port = free_port() if config.tls is not None else 0
        self.dir = config.data_dir / "kafka"
        self.log_path = self.dir / "kafka.log"
        self.process: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        """bootstrap.servers for clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """bootstrap.servers of the SASL_PLAINTEXT listener (``sasl_users`` must be set)."""
        if not self.sasl_port:
            raise StackError("kafka", "this broker has no SASL listener (no sasl_users)")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def tls_bootstrap(self) -> str:
        """bootstrap.servers of the TLS listener (``tls`` must be set)."""
        if not self.tls_port:
            raise StackError("kafka", "this broker has no TLS listener (no tls keystore)")
        return f"127.0.0.1:{self.tls_port}"

    def _properties(self, log_dir: Path) -> str:
        text = _PROPERTIES.format(
            port=self.port, controller_port=self.controller_port, log_dir=log_dir
        )
        # (protocol, port, settings) of each extra listener; its name is its protocol.
        extra: list[tuple[str, int, list[str]]] = []
        if self.config.sasl_users:
            users = " ".join(f'user_{u}="{p}"' for u, p in self.config.sasl_users)
            extra.append(
                (
                    "SASL_PLAINTEXT",
                    self.sasl_port,
                    [
                        "sasl.enabled.mechanisms=PLAIN",
                        "listener.name.sasl_plaintext.plain.sasl.jaas.config="
                        "org.apache.kafka.common.security.plain.PlainLoginModule required "
                        f"{users};",
                    ],
                )
            )
        if self.config.tls is not None:
            keystore, password = self.config.tls
            extra.append(
                (
                    "SSL",
                    self.tls_port,
                    [
                        f"listener.name.ssl.ssl.keystore.location={keystore}",
                        "listener.name.ssl.ssl.keystore.type=PKCS12",
                        f"listener.name.ssl.ssl.keystore.password={password}",
                        f"listener.name.ssl.ssl.key.password={password}",
                    ],
                )
            )
        if not extra:
            return text
        listeners = "".join(f",{proto}://127.0.0.1:{port}" for proto, port, _ in extra)
        protocols = "".join(f",{proto}:{proto}" for proto, _, _ in extra)
        lines = {
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
            f"CONTROLLER://127.0.0.1:{self.controller_port}{listeners}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}{listeners}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
            + protocols,
        }
        out = [
            f"{key}={lines[key]}" if (key := line.partition("=")[0]) in lines else line
            for line in text.splitlines()
        ]
        for _proto, _port, settings in extra:
            out += settings
        return "\n".join(out) + "\n"

    def _prepare(self) -> tuple[str, Path]:
        java = java_binary()
        libs = ensure_kafka_jars(self.config.cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        log_dir = self.dir / "log"
        props = self.dir / "server.properties"
        props.write_text(self._properties(log_dir))
        props.chmod(0o600)  # it may hold SASL or keystore passwords
        if not (log_dir / "meta.properties").exists():
            cluster_id = _cluster_id()
            fmt = subprocess.run(
                [
                    java,
                    "-Xmx256m",
                    "-cp",
                    f"{libs}/*",
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    cluster_id,
                    "-c",
                    str(props),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if fmt.returncode != 0:
                raise StackError(
                    "kafka",
                    "formatting the KRaft storage failed",
                    f"remove {log_dir} and try again",
                    "\n".join((fmt.stdout + fmt.stderr).splitlines()[-15:]),
                )
        return java, libs

    async def start(self) -> None:
        """Format storage on first start, start the broker, wait until an admin client sees it."""
        java, libs = await asyncio.to_thread(self._prepare)
        with resources.as_file(
            resources.files("chio_receipts.stack").joinpath("kafka", "log4j2.yaml")
        ) as log_cfg:
            argv = [
                java,
                f"-Xmx{self.config.heap}",
                "-Xms128m",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={log_cfg}",
                f"-Dkafka.logs.dir={self.dir}",
                "-cp",
                f"{libs}/*",
                "kafka.Kafka",
                str(self.dir / "server.properties"),
            ]
        self.process = ManagedProcess("kafka", argv, self.log_path, dict(os.environ))
        self.process.start()
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Poll with an admin client until the broker answers, dies, or the timeout passes."""
        # Refused connections are expected while the JVM starts: keep aiokafka quiet meanwhile.
        quiet = logging.getLogger("aiokafka")
        previous = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            await self._poll_ready()
        finally:
            quiet.setLevel(previous)

    async def _poll_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process is not None and (code := self.process.exited()) is not None:
                raise StackError(
                    "kafka",
                    f"the broker exited with code {code} while starting",
                    f"read {self.log_path}",
                    log_tail(self.log_path),
                )
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
            try:
                await asyncio.wait_for(admin.start(), timeout=6)
                await asyncio.wait_for(admin.list_topics(), timeout=6)
            except (KafkaError, OSError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(0.5)
                continue
            finally:
                await admin.close()
            return
        raise StackError(
            "kafka",
            f"the broker at {self.bootstrap} did not answer within "
            f"{self.config.ready_timeout:.0f}s ({last})",
            f"read {self.log_path}",
            log_tail(self.log_path),
        )

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal to the broker (SIGSTOP / SIGCONT in fault tests)."""
        if self.process is not None:
            self.process.signal(sig)

    def kill(self) -> None:
        """kill -9 the broker; its data survives for :meth:`restart`."""
        if self.process is not None:
            self.process.signal(signal.SIGKILL)
            self.process.stop(timeout=1)
            self.process = None

    async def restart(self) -> None:
        """Start again on the same ports and log directory."""
        self.stop()
        await self.start()

    def stop(self, timeout: float = 20.0) -> None:
        """Clean stop: SIGTERM, wait, then SIGKILL; idempotent."""
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None
