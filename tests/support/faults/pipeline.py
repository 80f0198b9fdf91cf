"""The whole pipeline on the local stack, as killable parts: worker and consumer processes, the
completion watcher (in the test process), topics, quiescence detection and the snapshot.

One :class:`Pipeline` per test: unique topics (a prefix), task queue, consumer group, keys and
ClickHouse database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from chio_receipts.consumers import (
    fetch_public_keys,
    open_client,
    parse_dead_letter_headers,
    verify_run,
)
from chio_receipts.schemas import KafkaConnection, KeyPair, RunCompletion
from chio_receipts.streamer import (
    CompletionWatcher,
    ReceiptStreamer,
    StreamerConfig,
    TopicsConfig,
    WatcherConfig,
    ensure_topics,
)
from tests.support.faults.invariants import (
    DeadLetterRecord,
    EnvelopeRow,
    Liveness,
    Snapshot,
    StepRow,
)
from tests.support.faults.oracle import Oracle, read_oracle
from tests.support.faults.procs import Child, rss_bytes
from tests.support.faults.workload import SCOPE, FaultInput, FaultWorkflow

__all__ = ["Pipeline", "PipelineOptions", "cache_dir", "clickhouse_dsn_for"]

log = logging.getLogger(__name__)


def clickhouse_dsn_for(directory: Path) -> str:
    """A fresh chDB database under ``directory``, or the server in CHIO_TEST_CLICKHOUSE_DSN."""
    server = os.environ.get("CHIO_TEST_CLICKHOUSE_DSN")
    return server if server else f"chdb://{directory / 'clickhouse'}"


def cache_dir() -> Path:
    """Where the local stack keeps downloaded jars (shared with the session fixtures)."""
    repo = Path(__file__).resolve().parents[3]
    return Path(os.environ.get("CHIO_CACHE_DIR", repo / ".cache"))


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineOptions:
    """Knobs of one pipeline."""

    partitions: int = 3
    grace_seconds: float = 20.0
    worker: Mapping[str, Any] = field(default_factory=dict)
    consumer: Mapping[str, Any] = field(default_factory=dict)
    watcher_poll_s: float = 0.5
    rss_limit: float = 2.0


class _CountingSink:
    """Wraps the watcher's streamer; remembers which runs got a completion event."""

    def __init__(self, inner: ReceiptStreamer) -> None:
        self.inner = inner
        self.runs: set[tuple[str, str]] = set()

    async def publish_step(self, receipt: Any, body: bytes) -> None:
        await self.inner.publish_step(receipt, body)

    async def publish_completion(self, event: RunCompletion) -> None:
        await self.inner.publish_completion(event)
        self.runs.add((event.workflow_id, event.run_id))

    async def publish_envelope(self, envelope: Mapping[str, Any]) -> None:
        await self.inner.publish_envelope(envelope)


class Pipeline:
    """Worker process(es) -> Kafka -> consumer process -> ClickHouse, plus the watcher."""

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        bootstrap: str,
        temporal_address: str,
        client: Client,
        dsn: str,
        options: PipelineOptions | None = None,
    ) -> None:
        self.root = root
        self.name = name
        self.bootstrap = bootstrap
        self.temporal_address = temporal_address
        self.client = client
        self.dsn = dsn
        self.options = options or PipelineOptions()
        self.prefix = f"{name}."
        self.task_queue = f"tq-{name}"
        self.group = f"builder-{name}"
        self.worker_key = KeyPair.from_seed(f"worker-{name}", os.urandom(32))
        self._builder_seed = os.urandom(32)
        self.builder_key = KeyPair.from_seed(f"builder-{name}", self._builder_seed)
        self._argument_key = os.urandom(32).hex()
        self.topics = TopicsConfig(prefix=self.prefix, partitions=self.options.partitions)
        self.workers: list[Child] = []
        self.consumer: Child | None = None
        self.sidecar: Child | None = None
        self.sidecar_url: str | None = None
        self.capability_id: str | None = None
        self.sidecar_keys: dict[str, bytes] = {}
        self.handles: list[WorkflowHandle[Any, Any]] = []
        self._watcher_streamer: ReceiptStreamer | None = None
        self._watcher_sink: _CountingSink | None = None
        self._watcher_task: asyncio.Task[None] | None = None
        self._watcher_stop = asyncio.Event()
        self._lag_consumer: AIOKafkaConsumer | None = None
        self.expected_exits: set[str] = set()
        self.rss_first: dict[str, int] = {}
        root.mkdir(parents=True, exist_ok=True)

    # -- keys -------------------------------------------------------------------------------

    @property
    def public_keys(self) -> dict[str, bytes]:
        """Worker, served sidecar (as last fetched) and builder public keys by key id."""
        return {
            self.worker_key.key_id: self.worker_key.public_key,
            **self.sidecar_keys,
            self.builder_key.key_id: self.builder_key.public_key,
        }

    # -- the served sidecar -----------------------------------------------------------------

    @property
    def sidecar_dir(self) -> Path:
        """The served sidecar's data directory."""
        return self.root / "sidecar"

    async def start_sidecar(self, timeout: float = 30.0) -> Child:
        """Serve the policy sidecar as a child process on its data directory (same port on a
        restart); the first start mints the workers' capability over HTTP. Workers and the
        consumer made after this use it: decisions and signing move from the workers'
        in-process sidecar to this one, and the builder fetches its keys from ``/v1/keys``."""
        if self.sidecar is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            self.sidecar_url = f"http://127.0.0.1:{port}"
            self.sidecar = Child(
                "sidecar",
                "chio_receipts",
                [
                    "sidecar",
                    "serve",
                    "--data-dir",
                    str(self.sidecar_dir),
                    "--port",
                    str(port),
                    "--log-level",
                    "info",
                ],
                self.root / "sidecar.log",
            )
        self.sidecar.start()
        assert self.sidecar_url is not None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.sidecar_url, timeout=2) as http:
            while True:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if not self.sidecar.alive() or time.monotonic() > deadline:
                    raise AssertionError(f"the sidecar did not start:\n{self.sidecar.log_tail()}")
                await asyncio.sleep(0.1)
            if self.capability_id is None:
                created = await http.post(
                    "/v1/capabilities",
                    json={
                        "subject": "agent:fault-suite",
                        "scope": list(SCOPE),
                        "ttl_seconds": 86400,
                    },
                )
                assert created.status_code == 201, created.text
                self.capability_id = str(created.json()["id"])
        await self.refresh_sidecar_keys()
        return self.sidecar

    async def refresh_sidecar_keys(self) -> dict[str, bytes]:
        """The served sidecar's public keys (current and retired), remembered for ``verify``."""
        assert self.sidecar_url is not None
        self.sidecar_keys = await fetch_public_keys(self.sidecar_url)
        return self.sidecar_keys

    def _sidecar_config(self) -> dict[str, Any]:
        if self.sidecar_url is None:
            return {}
        return {"sidecar_url": self.sidecar_url, "capability_id": self.capability_id}

    # -- lifecycle --------------------------------------------------------------------------

    async def setup(self) -> None:
        """Create the topics (unique prefix) and start the watcher."""
        await ensure_topics(KafkaConnection(bootstrap_servers=self.bootstrap), self.topics)
        await self.start_watcher()

    def add_worker(self, **extra: Any) -> Child:
        """A worker process (not started); ``extra`` overrides its configuration."""
        index = len(self.workers)
        work = self.root / f"worker-{index}"
        work.mkdir(parents=True, exist_ok=True)
        seed = self.worker_key._signing_key.encode()
        config = {
            "dir": str(work),
            "temporal": self.temporal_address,
            "bootstrap": self.bootstrap,
            "prefix": self.prefix,
            "partitions": self.options.partitions,
            "task_queue": self.task_queue,
            "key_id": self.worker_key.key_id,
            "key_seed": bytes(seed).hex(),
            "argument_key": self._argument_key,
            **self._sidecar_config(),
            **self.options.worker,
            **extra,
        }
        path = work / "config.json"
        path.write_text(json.dumps(config))
        child = Child(
            f"worker-{index}",
            "tests.support.faults.worker_proc",
            ["--config", str(path)],
            work / "worker.log",
        )
        self.workers.append(child)
        return child

    def worker_dir(self, child: Child) -> Path:
        """The working directory (spool, oracle, status) of a worker."""
        return self.root / child.name

    def make_consumer(self, **extra: Any) -> Child:
        """The consumer process (not started)."""
        work = self.root / "consumer"
        work.mkdir(parents=True, exist_ok=True)
        config = {
            "bootstrap": self.bootstrap,
            "prefix": self.prefix,
            "dsn": self.dsn,
            "group": self.group,
            "keys": {self.worker_key.key_id: self.worker_key.public_key.hex()},
            "builder_key_id": self.builder_key.key_id,
            "builder_seed": self._builder_seed.hex(),
            "grace_seconds": self.options.grace_seconds,
            **({"key_url": self.sidecar_url} if self.sidecar_url else {}),
            **self.options.consumer,
            **extra,
        }
        path = work / "config.json"
        path.write_text(json.dumps(config))
        self.consumer = Child(
            "consumer",
            "tests.support.faults.consumer_proc",
            ["--config", str(path)],
            work / "consumer.log",
        )
        return self.consumer

    def extra_consumer(self) -> Child:
        """A second consumer process in the same group, same configuration (not started)."""
        assert self.consumer is not None
        work = self.root / "consumer"
        child = Child(
            "consumer-2",
            "tests.support.faults.consumer_proc",
            ["--config", str(work / "config.json")],
            work / "consumer-2.log",
        )
        self.expected_exits.add(child.name)
        return child

    async def start(self, workers: int = 1) -> None:
        """Topics, watcher, ``workers`` worker processes and the consumer process."""
        await self.setup()
        for _ in range(workers):
            self.add_worker().start()
        self.make_consumer().start()
        await self.consumer_ready()
        await self.workers_ready()
        self.sample_rss()

    async def workers_ready(self, timeout: float = 90.0) -> None:
        """Wait until every running worker reports its status (streamer started)."""
        deadline = time.monotonic() + timeout
        for child in self.workers:
            path = self.worker_dir(child) / "status.json"
            while child.alive():
                try:
                    if json.loads(path.read_text()).get("pid") == child.pid:
                        break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{child.name} did not start:\n{child.log_tail()}")
                await asyncio.sleep(0.2)

    async def consumer_ready(self, timeout: float = 90.0) -> None:
        """Wait until the consumer process has joined its group (partitions assigned)."""
        consumer = self.consumer
        assert consumer is not None
        deadline = time.monotonic() + timeout
        while "partitions assigned" not in consumer.log_tail(400):
            if not consumer.alive():
                raise AssertionError(f"the consumer exited while starting:\n{consumer.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the consumer did not join its group:\n{consumer.log_tail()}")
            await asyncio.sleep(0.2)

    async def start_watcher(self) -> None:
        """The completion watcher in this process, producing through its own streamer."""
        self._watcher_stop.clear()
        streamer = ReceiptStreamer(
            StreamerConfig(
                kafka=KafkaConnection(bootstrap_servers=self.bootstrap),
                spool_dir=str(self.root / "watcher-spool"),
                topics=self.topics,
                client_id=f"watcher-{self.name}",
            )
        )
        await streamer.start()
        self._watcher_streamer = streamer
        sink = self._watcher_sink or _CountingSink(streamer)
        sink.inner = streamer
        self._watcher_sink = sink
        watcher = CompletionWatcher(
            self.client,
            sink,
            WatcherConfig(
                checkpoint_path=str(self.root / "watcher.json"),
                poll_interval_s=self.options.watcher_poll_s,
                lag_window_s=10.0,
                query_filter=f'TaskQueue = "{self.task_queue}"',
            ),
        )
        self._watcher_task = asyncio.create_task(watcher.run(self._watcher_stop))

    async def stop_watcher(self) -> None:
        """Stop the watcher and its streamer."""
        self._watcher_stop.set()
        if self._watcher_task is not None:
            await asyncio.wait_for(self._watcher_task, 30)
            self._watcher_task = None
        if self._watcher_streamer is not None:
            await self._watcher_streamer.stop()
            self._watcher_streamer = None

    async def close(self) -> None:
        """Stop everything this pipeline started (idempotent)."""
        for child in [*self.workers, *([self.consumer] if self.consumer else [])]:
            if child.alive():
                await child.terminate(20)
        if self.sidecar is not None and self.sidecar.alive():
            await self.sidecar.terminate(20)
        await self.stop_watcher()
        if self._lag_consumer is not None:
            try:
                await asyncio.wait_for(self._lag_consumer.stop(), 10)
            except (KafkaError, TimeoutError):
                log.warning("lag consumer did not stop cleanly")
            self._lag_consumer = None

    # -- workload ---------------------------------------------------------------------------

    async def start_runs(
        self, n: int, params: FaultInput | None = None, *, deny_every: int = 0
    ) -> list[WorkflowHandle[Any, Any]]:
        """Start ``n`` runs of :class:`FaultWorkflow` on this pipeline's task queue."""
        base = params or FaultInput()
        started = []
        for i in range(n):
            p = replace(base, deny_at=1 if deny_every and i % deny_every == 0 else base.deny_at)
            handle = await self.client.start_workflow(
                FaultWorkflow.run,
                p,
                id=f"{self.name}-{i}-{uuid.uuid4().hex[:6]}",
                task_queue=self.task_queue,
            )
            started.append(handle)
        self.handles += started
        return started

    async def wait_runs(self, timeout: float) -> list[Any]:
        """Wait for every started run's result (raises if one failed)."""
        return list(
            await asyncio.wait_for(asyncio.gather(*(h.result() for h in self.handles)), timeout)
        )

    async def closed_runs(self) -> tuple[set[tuple[str, str]], int]:
        """(closed (workflow_id, run_id) of this task queue, number still running)."""
        closed: set[tuple[str, str]] = set()
        running = 0
        async for ex in self.client.list_workflows(f'TaskQueue = "{self.task_queue}"'):
            if ex.status == WorkflowExecutionStatus.RUNNING:
                running += 1
            else:
                closed.add((ex.id, ex.run_id))
        return closed, running

    # -- quiescence -------------------------------------------------------------------------

    def worker_pending(self) -> int | None:
        """Records not yet acknowledged by Kafka in live workers (None: a status is stale)."""
        total = 0
        for child in self.workers:
            status_path = self.worker_dir(child) / "status.json"
            try:
                status = json.loads(status_path.read_text())
            except (OSError, ValueError):
                return None
            if child.alive() and (
                status.get("pid") != child.pid or time.time() - status["time"] > 3
            ):
                return None
            total += int(status["pending"])
        return total

    async def _lag_client(self) -> AIOKafkaConsumer:
        if self._lag_consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group,
                enable_auto_commit=False,
                request_timeout_ms=10_000,
            )
            await asyncio.wait_for(consumer.start(), 15)
            self._lag_consumer = consumer
        return self._lag_consumer

    async def lag(self) -> int:
        """Messages in the steps and runs topics the consumer group has not committed."""
        consumer = await self._lag_client()
        tps = [
            TopicPartition(topic, p)
            for topic in (self.topics.steps, self.topics.runs)
            for p in range(self.options.partitions)
        ]
        ends = await asyncio.wait_for(consumer.end_offsets(tps), 15)
        total = 0
        for tp in tps:
            committed = await asyncio.wait_for(consumer.committed(tp), 15)
            total += max(0, ends[tp] - (committed or 0))
        return total

    async def quiesce(self, timeout: float) -> Liveness:
        """Wait until every run closed and got its completion, every spool drained and the
        consumer's lag is 0; returns the I6 facts (drained or not within ``timeout``)."""
        t0 = time.monotonic()
        live = Liveness(bound_seconds=timeout, rss_limit=self.options.rss_limit)
        last = "nothing checked yet"
        while True:
            try:
                last = await self._quiet()
            except (KafkaError, TimeoutError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if last == "":
                break
            if time.monotonic() - t0 > timeout:
                live.drained = False
                log.warning("not quiescent after %.0fs: %s", timeout, last)
                break
            await asyncio.sleep(0.25)
        live.drain_seconds = time.monotonic() - t0
        _, live.running_workflows = await self.closed_runs()
        for child in [*self.workers, *([self.consumer] if self.consumer else [])]:
            if child.starts and not child.alive() and child.name not in self.expected_exits:
                live.unexpected_exits.append(
                    f"{child.name} exited with {child.returncode()}:\n{child.log_tail(15)}"
                )
            if child.alive():
                rss = rss_bytes(child.pid)
                first = self.rss_first.setdefault(child.name, rss)
                if first:
                    live.rss_growth[child.name] = rss / first
        self.last_unquiet = last
        return live

    def sample_rss(self) -> None:
        """Remember the children's current RSS as the baseline of the memory check."""
        for child in [*self.workers, *([self.consumer] if self.consumer else [])]:
            if child.alive():
                self.rss_first[child.name] = rss_bytes(child.pid)

    async def _quiet(self) -> str:
        """'' when quiescent, else what is still moving."""
        closed, running = await self.closed_runs()
        if running:
            return f"{running} runs still running"
        sink = self._watcher_sink
        if sink is None:
            return "no watcher"
        missing = closed - sink.runs
        if missing:
            return f"{len(missing)} closed runs without a completion event yet"
        if self._watcher_streamer is not None and self._watcher_streamer.pending:
            return f"watcher streamer has {self._watcher_streamer.pending} records pending"
        pending = self.worker_pending()
        if pending is None:
            return "a worker status is stale"
        if pending:
            return f"workers have {pending} receipts not acknowledged by Kafka"
        lag = await self.lag()
        if lag:
            return f"consumer lag {lag}"
        return ""

    # -- read-back --------------------------------------------------------------------------

    def oracle(self) -> Oracle:
        """The merged oracle logs of every worker."""
        return read_oracle([self.worker_dir(w) / "oracle.log" for w in self.workers])

    async def snapshot(self, *, stop_consumer: bool = True) -> Snapshot:
        """Stop the consumer (it owns an embedded database) and read ClickHouse and the DLQ."""
        if stop_consumer and self.consumer is not None and self.consumer.alive():
            self.expected_exits.add(self.consumer.name)
            code = await self.consumer.terminate(60)
            if code != 0:
                raise AssertionError(
                    f"the consumer exited with {code} on SIGTERM:\n{self.consumer.log_tail()}"
                )
        snap = await asyncio.to_thread(self._read_clickhouse)
        snap.dead_letters = await self.read_dlq()
        return snap

    def _read_clickhouse(self) -> Snapshot:
        client = open_client(self.dsn)
        try:
            snap = Snapshot()
            for row in client.query(
                "SELECT toString(receipt_id), workflow_id, run_id, activity_id, attempt, "
                "toString(verdict) FROM step_receipts WHERE workflow_id LIKE {p:String}",
                parameters={"p": f"{self.name}-%"},
            ).result_rows:
                snap.steps.append(StepRow(row[0], row[1], row[2], row[3], int(row[4]), row[5]))
            for mode in ("", "FINAL"):
                count, uniq = client.query(
                    f"SELECT count(), uniqExact(receipt_id) FROM step_receipts {mode} "
                    "WHERE workflow_id LIKE {p:String}",
                    parameters={"p": f"{self.name}-%"},
                ).result_rows[0]
                snap.counts[mode or "without FINAL"] = (int(count), int(uniq))
            for row in client.query(
                "SELECT workflow_id, run_id, revision, complete, missing_steps, expected_steps, "
                "receipt_ids, outcome, arrayMap(a -> (a.activity_id, a.attempt, a.account, "
                "a.reason), attempts) FROM workflow_receipts FINAL "
                "WHERE workflow_id LIKE {p:String}",
                parameters={"p": f"{self.name}-%"},
            ).result_rows:
                snap.envelopes.append(
                    EnvelopeRow(
                        workflow_id=row[0],
                        run_id=row[1],
                        revision=int(row[2]),
                        complete=bool(row[3]),
                        missing_steps=int(row[4]),
                        expected_steps=None if row[5] is None else int(row[5]),
                        receipt_ids=tuple(str(r) for r in row[6]),
                        outcome=str(row[7]),
                        accounts=tuple(
                            (str(a), int(n), str(account), str(reason))
                            for a, n, account, reason in row[8]
                        ),
                    )
                )
            for row in client.query(
                "SELECT workflow_id, run_id, revision, count() AS n FROM workflow_receipts "
                "WHERE workflow_id LIKE {p:String} GROUP BY workflow_id, run_id, revision "
                "HAVING n > 1",
                parameters={"p": f"{self.name}-%"},
            ).result_rows:
                snap.envelope_revision_dupes.append((row[0], row[1], int(row[2]), int(row[3])))
            for wf in sorted(
                {r.workflow_id for r in snap.steps} | {e.workflow_id for e in snap.envelopes}
            ):
                report = verify_run(client, wf, keys=self.public_keys)
                if report.problems:
                    snap.verify_problems[wf] = list(report.problems)
            return snap
        finally:
            client.close()

    def clickhouse(self) -> Any:
        """A clickhouse-connect client of this pipeline's database (consumer must be stopped)."""
        return open_client(self.dsn)

    async def read_dlq(self) -> list[DeadLetterRecord]:
        """Every record of the dead-letter topic, with its origin headers."""
        return [
            DeadLetterRecord(
                origin=(
                    h.get("topic", ""),
                    int(h.get("partition", "-1")),
                    int(h.get("offset", "-1")),
                ),
                error_class=h.get("error_class", ""),
                reason=h.get("reason", ""),
                value=value,
            )
            for value, h in await self.read_topic(self.topics.dlq_topic)
        ]

    async def read_topic(self, topic: str) -> list[tuple[bytes | None, dict[str, str]]]:
        """All records of ``topic``: (value, chio.dlq.* headers)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None
        )
        await asyncio.wait_for(consumer.start(), 15)
        out: list[tuple[bytes | None, dict[str, str]]] = []
        try:
            # The topic's partition count comes from the configuration (``topics()`` does not
            # update the consumer's own metadata cache).
            count = self.topics.settings()[topic].partitions
            tps = [TopicPartition(topic, p) for p in range(count)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            deadline = time.monotonic() + 30
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"could not read {topic} to its end")
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for msg in records:
                        out.append((msg.value, parse_dead_letter_headers(msg.headers or ())))
        finally:
            await asyncio.wait_for(consumer.stop(), 15)
        return out

    async def produce_raw(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes | None]]
    ) -> list[tuple[str, int, int]]:
        """Produce raw (key, value) records; returns their (topic, partition, offset)."""
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", max_request_size=8 << 20
        )
        await asyncio.wait_for(producer.start(), 15)
        try:
            out = []
            for key, value in records:
                md = await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 30)
                out.append((md.topic, md.partition, md.offset))
            return out
        finally:
            await producer.stop()
