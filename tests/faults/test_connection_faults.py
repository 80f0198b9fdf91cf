"""F4: the connection between every Kafka client and the broker is blackholed, reset and cut
mid-batch by a TCP proxy. The broker advertises the proxy's port, so metadata keeps every
client behind it. Slow matrix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from chio_receipts.stack import KafkaBroker, KafkaConfig, free_port
from tests.support.faults.pipeline import Pipeline, PipelineOptions, cache_dir, clickhouse_dsn_for
from tests.support.faults.proxy import TcpProxy
from tests.support.faults.scenario import finish
from tests.support.faults.workload import FaultInput
from tests.support.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class _ProxiedBroker(KafkaBroker):
    """The stack's broker, advertising the proxy's port instead of its own."""

    def __init__(self, config: KafkaConfig, advertised_port: int) -> None:
        super().__init__(config)
        self.advertised_port = advertised_port

    def _prepare(self) -> tuple[str, Path]:
        java, libs = super()._prepare()
        props = self.dir / "server.properties"
        props.write_text(
            props.read_text().replace(
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.advertised_port}",
            )
        )
        return java, libs


@pytest.fixture(scope="module")
async def proxied_kafka(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[TcpProxy, KafkaBroker]]:
    port = free_port()
    broker = _ProxiedBroker(
        KafkaConfig(data_dir=tmp_path_factory.mktemp("proxied-kafka"), cache_dir=cache_dir()),
        advertised_port=port,
    )
    proxy = TcpProxy("127.0.0.1", broker.port, port=port)
    await proxy.start()
    try:
        await broker.start()
        yield proxy, broker
    finally:
        await proxy.stop()
        broker.stop()


@pytest.mark.timeout(900)
async def test_f4_connections_blackholed_reset_and_cut(
    proxied_kafka: tuple[TcpProxy, KafkaBroker],
    stack: object,
    temporal_client: object,
    tmp_path: Path,
) -> None:
    proxy, _ = proxied_kafka
    p = Pipeline(
        tmp_path / "pipeline",
        name=f"conn-{int(time.time() * 1000) % 10**8}",
        bootstrap=proxy.address,
        temporal_address=stack.temporal_address,  # type: ignore[attr-defined]
        client=temporal_client,  # type: ignore[arg-type]
        dsn=clickhouse_dsn_for(tmp_path),
        options=PipelineOptions(),
    )
    try:
        await p.start()
        work = FaultInput(steps=4, step_sleep_s=1.0)
        accepted: Callable[[], int] = lambda: len(p.oracle().accepted)  # noqa: E731
        await p.start_runs(8, work, deny_every=4)
        await eventually(lambda: accepted() >= 5, 120)
        proxy.set_mode("blackhole")
        await asyncio.sleep(20)  # silence longer than the delivery timeout
        proxy.set_mode("pass")
        proxy.reset_all()
        mark = accepted()
        await p.start_runs(8, work)
        await eventually(lambda: accepted() >= mark + 5, 120)
        proxy.reset_all()
        proxy.set_mode("cut_after", cut_after=2000)  # every connection dies mid-batch
        await p.start_runs(8, work)
        await asyncio.sleep(10)
        proxy.set_mode("pass")
        proxy.reset_all()
        t0 = time.monotonic()
        await finish(
            p,
            "F4",
            "TCP blackhole 20 s, RST, cuts mid-batch",
            recovery_from=t0,
            quiesce_timeout=180,
            note=f"{proxy.connections} proxied connections",
        )
    finally:
        await p.close()
