"""The Kafka path over TLS against a real broker, with a certificate made at test time."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from chio_receipts.schemas import KafkaConnection, KeyPair, decode, verify_body
from chio_receipts.stack import KafkaBroker, KafkaConfig
from chio_receipts.streamer import ReceiptStreamer, StreamerConfig, TopicsConfig, ensure_topics
from tests.support.faults.receipts import signed_receipts

REPO = Path(__file__).resolve().parents[2]


def _keytool() -> str:
    home = os.environ.get("JAVA_HOME")
    tool = str(Path(home) / "bin" / "keytool") if home else shutil.which("keytool")
    if not tool:
        pytest.fail("keytool not found: the TLS test makes its certificate with the JDK's keytool")
    return tool


def _make_certificate(directory: Path) -> tuple[Path, str, Path]:
    """A self-signed server certificate for 127.0.0.1: (PKCS12 keystore, password, PEM cert)."""
    password = uuid.uuid4().hex
    keystore, cert = directory / "broker.p12", directory / "broker.pem"
    subprocess.run(
        [
            _keytool(), "-genkeypair", "-alias", "broker", "-keyalg", "EC", "-groupname",
            "secp256r1", "-dname", "CN=127.0.0.1", "-ext", "SAN=IP:127.0.0.1", "-validity", "2",
            "-storetype", "PKCS12", "-keystore", str(keystore), "-storepass", password,
            "-keypass", password,
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    subprocess.run(
        [
            _keytool(), "-exportcert", "-rfc", "-alias", "broker", "-keystore", str(keystore),
            "-storepass", password, "-file", str(cert),
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return keystore, password, cert


@pytest.fixture(scope="module")
async def tls_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[KafkaBroker, Path]]:
    certs = tmp_path_factory.mktemp("tls-certs")
    keystore, password, cert = _make_certificate(certs)
    kafka = KafkaBroker(
        KafkaConfig(
            data_dir=tmp_path_factory.mktemp("tls"),
            cache_dir=Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache")),
            tls=(keystore, password),
        )
    )
    await kafka.start()
    try:
        yield kafka, cert
    finally:
        kafka.stop()


@pytest.mark.integration
async def test_receipts_travel_over_tls_and_arrive_signed(
    tls_broker: tuple[KafkaBroker, Path], tmp_path: Path, unique: Callable[[str], str]
) -> None:
    broker, cert = tls_broker
    context = ssl.create_default_context(cafile=str(cert))
    tls = KafkaConnection(
        bootstrap_servers=broker.tls_bootstrap, security_protocol="SSL", ssl_cafile=str(cert)
    )
    topics = TopicsConfig(prefix=unique("tls") + ".", partitions=1)
    await ensure_topics(tls, topics)  # administration over TLS as well
    key = KeyPair.generate("tls-sidecar")
    receipts = signed_receipts(key, unique("wf"), str(uuid.uuid4()), 4)
    async with ReceiptStreamer(
        StreamerConfig(
            kafka=tls,
            spool_dir=str(tmp_path / "spool"),
            topics=topics,
            durability="queued",
        )
    ) as sink:
        for signed, body in receipts:
            await sink.publish_step(signed, body)
        assert await sink.flush(20)
        assert sink.connected
    consumer = AIOKafkaConsumer(
        topics.steps,
        bootstrap_servers=broker.tls_bootstrap,
        security_protocol="SSL",
        ssl_context=context,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        got = await consumer.getmany(timeout_ms=10_000, max_records=10)
    finally:
        await consumer.stop()
    values = [m.value for batch in got.values() for m in batch if m.value]
    bodies = [decode(v).body for v in values]
    assert bodies == [body for _signed, body in receipts]
    assert all(verify_body(b, key.public_key) for b in bodies)


@pytest.mark.integration
async def test_a_client_that_does_not_trust_the_certificate_is_refused(
    tls_broker: tuple[KafkaBroker, Path],
) -> None:
    broker, _cert = tls_broker
    untrusting = ssl.create_default_context()  # system CAs only: the test certificate is unknown
    consumer = AIOKafkaConsumer(
        bootstrap_servers=broker.tls_bootstrap,
        security_protocol="SSL",
        ssl_context=untrusting,
        request_timeout_ms=5000,
    )
    with pytest.raises((KafkaError, ssl.SSLError, OSError)):
        await consumer.start()
    await consumer.stop()
