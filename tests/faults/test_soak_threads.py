"""F22b: the builder's threads and descriptors under a steady load (real Kafka, chDB).

The receipt builder runs in this process, its read endpoint serving, while runs arrive at a
steady rate (``CHIO_SOAK_RUNS`` runs of 4 signed steps per round, default 250) and the read
endpoint answers three clients each round. The process's OS threads (``/proc/self/task``: chDB's
engine threads included), Python threads (``threading.enumerate()``) and open descriptors
(``/proc/self/fd``) are sampled every round and reported at the start, after the warm-up and at
the end, with the OS thread names (``comm``) and the engine's own thread-pool figures.

After the warm-up they must stay flat: the end may exceed the warm-up figure by
``THREAD_SLACK`` threads and ``FD_SLACK`` descriptors. The slack covers what comes and goes
within a round (a merge holds its parts' files open for a moment; a query thread exists while it
runs) and what a thread brings with it: chDB keeps three procfs descriptors (stat, schedstat,
io) per engine thread. A pool that grows after the warm-up exceeds it within minutes.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from chio_receipts.consumers import BuilderConfig, ClickHouseConfig, ReadEndpointConfig
from chio_receipts.schemas import KafkaConnection, KeyPair
from tests.support.builder_service import Running
from tests.support.consumer_factory import completion, completion_value, signed_run
from tests.support.faults.report import record_row
from tests.support.helpers import eventually
from tests.support.kafka_topics import make_topics, produce

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKER = KeyPair.generate("worker-soak")
BUILDER = KeyPair.generate("builder-soak")
THREAD_SLACK = 4
FD_SLACK = 12
WARM_UP_SECONDS = 30.0


def figures() -> dict[str, int]:
    """This process's OS threads, Python threads and open descriptors now."""
    return {
        "os_threads": len(os.listdir("/proc/self/task")),
        "py_threads": len(threading.enumerate()),
        "fds": len(os.listdir("/proc/self/fd")),
    }


def thread_names() -> dict[str, int]:
    """OS thread names (``comm``) and how many threads carry each; chDB names its engine
    threads (``ThreadPool``: an idle thread of its global pool), Python threads keep the
    process's name."""
    names: collections.Counter[str] = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            names[Path(f"/proc/self/task/{tid}/comm").read_text().strip()] += 1
        except OSError:
            continue
    return dict(sorted(names.items()))


def python_threads() -> dict[str, int]:
    """Python threads by name, the pool's index dropped (``verify_0`` -> ``verify``)."""
    names = collections.Counter(t.name.rsplit("_", 1)[0] for t in threading.enumerate())
    return dict(sorted(names.items()))


def _say(line: str) -> None:
    """A line of the row's report (shown with ``-s``, and under a failure's captured output)."""
    sys.stdout.write(line + "\n")


def _round(prefix: str, runs: int) -> tuple[list[Any], list[Any]]:
    steps: list[Any] = []
    completions: list[Any] = []
    for r in range(runs):
        wf, rid = f"{prefix}-{r}", "run"
        key = f"default/{wf}/{rid}".encode()
        steps.extend((key, wire, None) for _, wire in signed_run(WORKER, wf, rid, 4))
        completions.append((key, completion_value(completion(wf, rid, expected=4)), None))
    return steps, completions


@pytest.mark.timeout(1500)
async def test_f22b_builder_threads_and_descriptors_flat(
    kafka_bootstrap: str, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    minutes = float(os.environ.get("CHIO_SOAK_MINUTES", "3"))
    runs = int(os.environ.get("CHIO_SOAK_RUNS", "250"))
    topics = await make_topics(kafka_bootstrap, unique)
    config = BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        clickhouse=ClickHouseConfig(
            dsn=f"chdb://{tmp_path / 'clickhouse'}", read_endpoint=ReadEndpointConfig()
        ),
        builder_key=BUILDER,
        public_keys={WORKER.key_id: WORKER.public_key},
        topics=topics,
        group_id=f"g-{topics.steps}",
        poll_timeout_ms=100,
        grace_seconds=1.0,
    )
    at: dict[str, dict[str, int]] = {"start": figures()}
    names: dict[str, dict[str, int]] = {"start": thread_names()}
    series: list[tuple[float, dict[str, int]]] = []
    engine: dict[str, int] = {}
    async with Running(config) as running:
        reader = running.service.sink.reader
        assert reader is not None
        assert reader.endpoint is not None
        endpoint = reader.endpoint

        def read() -> int:
            client = clickhouse_connect.get_client(
                host=endpoint.connect_host, port=endpoint.port, autogenerate_session_id=False
            )
            try:
                return int(str(client.command("SELECT count() FROM step_receipts")))
            finally:
                client.close()

        t0 = time.monotonic()
        deadline = t0 + minutes * 60
        rounds = 0
        while time.monotonic() < deadline:
            steps, completions = _round(f"r{rounds}", runs)
            await produce(kafka_bootstrap, topics.steps, steps)
            await produce(kafka_bootstrap, topics.runs, completions)
            want = runs * (rounds + 1)

            async def written(want: int = want) -> bool:
                return bool(await running.scalar("SELECT count() FROM workflow_receipts") >= want)

            await eventually(written, timeout=120)
            counts = await asyncio.gather(*(asyncio.to_thread(read) for _ in range(3)))
            assert min(counts) >= want * 4
            rounds += 1
            now = figures()
            series.append((time.monotonic() - t0, now))
            if "warm" not in at and time.monotonic() - t0 >= WARM_UP_SECONDS:
                at["warm"], names["warm"] = now, thread_names()
            await asyncio.sleep(2)
        at["end"], names["end"] = figures(), thread_names()
        _, rows = await running.service.sink.query(
            "SELECT metric, value FROM system.metrics WHERE metric LIKE 'GlobalThread%'"
        )
        engine = {str(k): int(v) for k, v in rows}
        py_end = python_threads()
    assert "warm" in at, f"the soak ended within its {WARM_UP_SECONDS:.0f} s warm-up"
    _say(f"\nF22b: {rounds} rounds of {runs} runs x 4 steps in {minutes:g} min")
    for when, s in series:
        _say(f"  {when:6.1f} s  {s}")
    for label in ("start", "warm", "end"):
        _say(f"  {label:5}  {at[label]}  {names[label]}")
    _say(f"  Python threads at the end: {py_end}")
    _say(f"  chDB global thread pool at the end: {engine}")
    grew = {k: at["end"][k] - at["warm"][k] for k in ("os_threads", "py_threads", "fds")}
    flat = (
        grew["os_threads"] <= THREAD_SLACK
        and grew["py_threads"] <= THREAD_SLACK
        and grew["fds"] <= FD_SLACK
    )
    record_row(
        "F22b",
        f"builder soak {minutes:g} min, {runs} runs/round",
        result="held" if flat else "VIOLATED threads/fds",
        note=(
            f"threads start/warm/end {at['start']['os_threads']}/{at['warm']['os_threads']}/"
            f"{at['end']['os_threads']}, fds {at['start']['fds']}/{at['warm']['fds']}/"
            f"{at['end']['fds']}; chDB {engine}"
        ),
    )
    assert grew["os_threads"] <= THREAD_SLACK, f"threads grew after the warm-up: {at}, {names}"
    assert grew["py_threads"] <= THREAD_SLACK, f"Python threads grew after the warm-up: {at}"
    assert grew["fds"] <= FD_SLACK, f"descriptors grew after the warm-up: {at}"
