"""The receipt builder service: a consumer group over the steps and runs topics.

Per poll batch: decode and verify every message (bad ones are dead-lettered), re-hydrate runs
this process does not hold from ClickHouse (their stored steps and last envelope revision, which
is what makes replays and duplicates harmless), insert one block of new step rows for the whole
batch with a deduplication token made of the topic and each partition's first..last offset, write
the envelopes that became due, publish them to the envelopes topic, then commit. Step offsets are
committed once their rows are in ClickHouse; a runs-topic offset is held back at the oldest
completion whose envelope is not written yet, so a crash re-reads exactly those completions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from chio_receipts.consumers._builder import ReceiptBuilder, RunState, StepEntry
from chio_receipts.consumers._clickhouse import ClickHouseConfig, ClickHouseSink
from chio_receipts.consumers._dlq import DeadLetter, Reason
from chio_receipts.consumers._envelope import Envelope
from chio_receipts.consumers._errors import (
    ConfigError,
    ConsumerError,
    KafkaUnavailable,
    SinkDataError,
    SinkUnavailable,
)
from chio_receipts.consumers._failpoints import failpoint
from chio_receipts.consumers._keys import KeyRing
from chio_receipts.consumers._metrics import ConsumerMetrics
from chio_receipts.consumers._rows import (
    StepRow,
    completion_from_row,
    envelope_row,
    plain_from_row,
    step_row,
)
from chio_receipts.consumers._wire import (
    RUN_SCHEMA,
    STEP_SCHEMA,
    Plain,
    decode_plain,
    encode_plain,
    envelope_step_body,
)
from chio_receipts.schemas import (
    Codec,
    DecodeError,
    KeyPair,
    RegistryError,
    RunCompletion,
    SchemaRegistryClient,
    UnknownFormat,
    UnknownSchema,
    confluent_schema_id,
    frame,
    receipt_hash,
    verify_body,
)

__all__ = ["BuilderConfig", "ReceiptBuilderService", "Topics", "check_copartitioned"]

_log = logging.getLogger(__name__)
_RunId = tuple[str, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Topics:
    """Topic names (configurable; tests use unique ones)."""

    steps: str = "chio.receipts.steps.v1"
    runs: str = "chio.receipts.runs.v1"
    envelopes: str = "chio.receipts.envelopes.v1"
    dlq: str = "chio.receipts.dlq.v1"


@dataclass(frozen=True, slots=True, kw_only=True)
class BuilderConfig:
    """Configuration of ``chio-receipts consume``."""

    bootstrap_servers: str
    clickhouse: ClickHouseConfig
    builder_key: KeyPair = field(repr=False)
    public_keys: Mapping[str, bytes] = field(default_factory=dict)
    key_url: str | None = None
    topics: Topics = field(default_factory=Topics)
    group_id: str = "chio-receipt-builder"
    grace_seconds: float = 60.0
    evict_after_seconds: float = 300.0
    max_open_runs: int = 200_000
    max_batch: int = 5_000
    poll_timeout_ms: int = 200
    max_message_bytes: int = 1_048_576
    publish_envelopes: bool = True
    retry_initial_seconds: float = 0.2
    retry_max_seconds: float = 10.0
    request_timeout_ms: int = 30_000
    max_poll_interval_ms: int = 900_000
    client_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Extra aiokafka client arguments for every client (``security_protocol``, ``sasl_*``,
    ``ssl_context``); kept out of ``repr``: they may hold secrets."""
    registry_url: str | None = None
    verify_threads: int = 2


async def check_copartitioned(
    bootstrap_servers: str,
    steps: str,
    runs: str,
    *,
    request_timeout_ms: int = 30_000,
    client_options: Mapping[str, Any] | None = None,
) -> int:
    """The shared partition count of ``steps`` and ``runs``; ConfigError when they differ."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        request_timeout_ms=request_timeout_ms,
        **(client_options or {}),
    )
    counts: dict[str, int] = {}
    await admin.start()
    try:
        # A topic created a moment ago may not be in the metadata yet: ask a few times.
        for attempt in range(10):
            for item in await admin.describe_topics([steps, runs]):
                if item.get("partitions"):
                    counts[item["topic"]] = len(item["partitions"])
            if steps in counts and runs in counts:
                break
            await asyncio.sleep(0.2 * (attempt + 1))
    finally:
        await admin.close()
    for topic in (steps, runs):
        if topic not in counts:
            raise ConfigError(f"topic {topic} does not exist")
    if counts[steps] != counts[runs]:
        raise ConfigError(
            f"steps topic {steps} has {counts[steps]} partitions but runs topic {runs} has "
            f"{counts[runs]}: they must be co-partitioned (same count); refusing to start"
        )
    return counts[steps]


@dataclass(slots=True)
class _Partial:
    """What one partition of one poll batch produced."""

    rows: list[StepRow] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    first: int = -1
    last: int = -1


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: ReceiptBuilderService) -> None:
        self._service = service

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._service.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self._service.partitions_assigned(assigned)


def _now_us() -> int:
    return time.time_ns() // 1000


class ReceiptBuilderService:
    """Consumes steps and completions, writes step rows and envelopes exactly once."""

    def __init__(self, config: BuilderConfig, *, metrics: ConsumerMetrics | None = None) -> None:
        self._config = config
        self.metrics = metrics or ConsumerMetrics()
        self._builder = ReceiptBuilder(
            grace_us=int(config.grace_seconds * 1e6),
            evict_after_us=int(config.evict_after_seconds * 1e6),
        )
        self._keys = KeyRing(config.public_keys, url=config.key_url)
        self.sink = ClickHouseSink(config.clickhouse)
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._runs_next: dict[int, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._last_evict = 0.0
        self._started = False
        self._registry: SchemaRegistryClient | None = None
        self._codec: Codec | None = None
        self._schema_ids: set[int] = set()
        # PyNaCl releases the GIL while verifying: big batches are checked on several threads.
        self._verify_pool = (
            ThreadPoolExecutor(config.verify_threads, thread_name_prefix="verify")
            if config.verify_threads > 1
            else None
        )

    @property
    def builder(self) -> ReceiptBuilder:
        """The pure state machine (for inspection)."""
        return self._builder

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member holds now."""
        consumer = self._consumer
        return frozenset(consumer.assignment()) if consumer is not None else frozenset()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect everything, check co-partitioning, subscribe. Idempotent."""
        if self._started:
            return
        self._started = True
        cfg = self._config
        try:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=cfg.bootstrap_servers,
                group_id=cfg.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                partition_assignment_strategy=(RangePartitionAssignor,),
                max_partition_fetch_bytes=max(cfg.max_message_bytes * 2, 1_048_576),
                fetch_max_bytes=max(cfg.max_message_bytes * 4, 52_428_800),
                request_timeout_ms=cfg.request_timeout_ms,
                max_poll_interval_ms=cfg.max_poll_interval_ms,
                isolation_level="read_committed",
                **cfg.client_options,
            )
            self._consumer = consumer
            await check_copartitioned(
                cfg.bootstrap_servers,
                cfg.topics.steps,
                cfg.topics.runs,
                request_timeout_ms=cfg.request_timeout_ms,
                client_options=cfg.client_options,
            )
            await consumer.start()
            await self._keys.refresh(force=False)
            if cfg.registry_url:
                self._registry = SchemaRegistryClient(cfg.registry_url)
                self._codec = Codec(self._registry)
            await self.sink.start()
            request_size = max(cfg.max_message_bytes * 2, 1_048_576)
            self._producer = AIOKafkaProducer(
                bootstrap_servers=cfg.bootstrap_servers,
                acks="all",
                enable_idempotence=True,
                # Envelopes are a few KB each and a poll batch publishes hundreds: with
                # aiokafka's 16 KiB default batch every few sends waited for a round trip
                # (measured: 205 µs per envelope send; see docs/BENCHMARKS.md).
                max_batch_size=request_size // 2,
                linger_ms=5,
                compression_type="lz4",
                max_request_size=request_size,
                request_timeout_ms=cfg.request_timeout_ms,
                **cfg.client_options,
            )
            await self._producer.start()
            consumer.subscribe([cfg.topics.steps, cfg.topics.runs], listener=_Listener(self))
        except KafkaError as exc:
            await self.stop()
            raise KafkaUnavailable(f"cannot start the receipt builder: {exc}") from exc
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop consuming and close every client (nothing uncommitted is lost: it is re-read).

        Idempotent."""
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            with contextlib.suppress(KafkaError):
                await asyncio.wait_for(consumer.stop(), 30)
        if producer is not None:
            with contextlib.suppress(KafkaError):
                await asyncio.wait_for(producer.stop(), 30)
        await self.sink.close()
        if self._verify_pool is not None:
            self._verify_pool.shutdown(wait=True)
            self._verify_pool = None
        registry, self._registry = self._registry, None
        if registry is not None:
            await registry.aclose()
        self._codec = None
        self._started = False

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Process batches until ``stop`` is set (or forever)."""
        while stop is None or not stop.is_set():
            await self.run_once()

    async def run_once(self) -> int:
        """Poll once and process what came; returns the number of messages."""
        consumer = self._consumer
        if consumer is None:
            raise ConsumerError("the receipt builder is not started")
        data = await consumer.getmany(
            timeout_ms=self._config.poll_timeout_ms, max_records=self._config.max_batch
        )
        async with self._lock:
            count = await self._process(data)
            self._housekeeping()
        return count

    # -- rebalance ------------------------------------------------------------------------

    async def partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        """Finish the batch in flight (it commits), then forget the revoked partitions' runs."""
        async with self._lock:
            steps_topic = self._config.topics.steps
            runs_topic = self._config.topics.runs
            gone = {tp.partition for tp in revoked if tp.topic in (steps_topic, runs_topic)}
            self._builder.drop_partitions(gone)
            for tp in revoked:
                self._committed.pop(tp, None)
                if tp.topic == runs_topic:
                    self._runs_next.pop(tp.partition, None)
            _log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        """Nothing to load eagerly: uncommitted completions are re-read from the committed
        offsets, and runs are re-hydrated from ClickHouse when their next event arrives."""
        _log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))

    # -- one batch ------------------------------------------------------------------------

    async def _process(self, data: Mapping[TopicPartition, Sequence[Any]]) -> int:
        topics = self._config.topics
        now = _now_us()
        step_parts: dict[TopicPartition, _Partial] = {}
        run_parts: dict[TopicPartition, _Partial] = {}
        steps: list[tuple[TopicPartition, Any, Plain]] = []
        completions: list[tuple[TopicPartition, Any, RunCompletion]] = []
        total = 0
        await self._fetch_writer_schemas(data)
        for tp, records in data.items():
            if not records:
                continue
            total += len(records)
            self.metrics.consumed.labels(tp.topic).inc(len(records))
            is_steps = tp.topic == topics.steps
            part = _Partial(first=records[0].offset, last=records[-1].offset)
            (step_parts if is_steps else run_parts)[tp] = part
            for msg in records:
                plain = self._decode(tp, msg, part, STEP_SCHEMA if is_steps else RUN_SCHEMA)
                if plain is None:
                    continue
                if is_steps:
                    steps.append((tp, msg, plain))
                else:
                    event = self._completion(tp, msg, plain, part)
                    if event is not None:
                        completions.append((tp, msg, event))
        steps = await self._verified(steps, step_parts)
        touched: dict[_RunId, int] = {
            (p.record["namespace"], p.record["workflow_id"], p.record["run_id"]): tp.partition
            for tp, _, p in steps
        }
        touched.update(
            {(e.namespace, e.workflow_id, e.run_id): tp.partition for tp, _, e in completions}
        )
        await self._hydrate(touched)
        for tp, msg, plain in steps:
            self._add_step(tp, msg, plain, step_parts[tp], now)
        for tp, msg, event in completions:
            run = self._builder.open_run(
                event.run_key, event.namespace, event.workflow_id, event.run_id, tp.partition
            )
            self._builder.add_completion(run, event, msg.offset, now)
        await self._insert_steps(step_parts)
        wrote_envelopes = await self._write_due(now)
        await self._send_dead_letters([*step_parts.values(), *run_parts.values()])
        for tp, part in run_parts.items():
            self._runs_next[tp.partition] = part.last + 1
        if any(part.rows for part in step_parts.values()) or wrote_envelopes:
            failpoint("consumer.after_insert_before_commit")
        await self._commit({tp: part.last + 1 for tp, part in step_parts.items()})
        return total

    async def _fetch_writer_schemas(self, data: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Fetch (once) the registry schemas of Confluent-framed messages in the batch."""
        codec = self._codec
        if codec is None:
            return
        for records in data.values():
            for msg in records:
                value = msg.value
                if not value or value[:1] != b"\x00" or len(value) < 5:
                    continue
                schema_id = confluent_schema_id(value)
                if schema_id in self._schema_ids:
                    continue
                delay = self._config.retry_initial_seconds
                while True:
                    try:
                        await codec.decode_async(value)
                    except DecodeError:
                        pass  # dead-lettered by _decode
                    except RegistryError as exc:
                        if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                            break  # the registry refuses this id: its messages are dead-lettered
                        _log.warning("schema registry unavailable (%s); retrying", exc)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self._config.retry_max_seconds)
                        continue
                    break
                self._schema_ids.add(schema_id)

    def _dead(self, part: _Partial, tp: TopicPartition, msg: Any, error: Any, reason: str) -> None:
        part.dead.append(
            DeadLetter.of(
                topic=tp.topic,
                partition=tp.partition,
                offset=msg.offset,
                key=msg.key,
                value=msg.value,
                headers=msg.headers,
                error=error,
                reason=reason,
            )
        )

    def _decode(self, tp: TopicPartition, msg: Any, part: _Partial, expected: str) -> Plain | None:
        value = msg.value
        if value is None:
            self._dead(part, tp, msg, "EmptyMessage", Reason.MALFORMED)
            return None
        if len(value) > self._config.max_message_bytes:
            self._dead(part, tp, msg, "OversizedMessage", Reason.OVERSIZED)
            return None
        try:
            plain = decode_plain(value, self._codec)
        except UnknownFormat as exc:
            self._dead(part, tp, msg, exc, Reason.UNKNOWN_FORMAT)
            return None
        except UnknownSchema as exc:
            self._dead(part, tp, msg, exc, Reason.UNKNOWN_SCHEMA)
            return None
        except DecodeError as exc:
            self._dead(part, tp, msg, exc, Reason.MALFORMED)
            return None
        if plain.schema_name != expected:
            self._dead(part, tp, msg, f"WrongSchema: {plain.schema_name}", Reason.WRONG_SCHEMA)
            return None
        return plain

    def _completion(
        self, tp: TopicPartition, msg: Any, plain: Plain, part: _Partial
    ) -> RunCompletion | None:
        try:
            return RunCompletion.from_avro(plain.record)
        except (KeyError, TypeError, ValueError) as exc:
            self._dead(part, tp, msg, exc, Reason.INVALID_RECORD)
            return None

    async def _verified(
        self, steps: list[tuple[TopicPartition, Any, Plain]], parts: dict[TopicPartition, _Partial]
    ) -> list[tuple[TopicPartition, Any, Plain]]:
        if any(self._keys.get(p.record["key_id"]) is None for _, _, p in steps):
            await self._keys.refresh()
        checks: list[tuple[bytes, bytes]] = []
        known: list[tuple[TopicPartition, Any, Plain]] = []
        for tp, msg, plain in steps:
            key_id = plain.record["key_id"]
            public_key = self._keys.get(key_id)
            if public_key is None:
                self._dead(parts[tp], tp, msg, f"UnknownKey: {key_id!r}", Reason.UNKNOWN_KEY)
            else:
                checks.append((plain.body, public_key))
                known.append((tp, msg, plain))
        pool = self._verify_pool
        if pool is not None and len(checks) >= 256:
            n = self._config.verify_threads
            loop = asyncio.get_running_loop()
            parts_ok = await asyncio.gather(
                *(loop.run_in_executor(pool, _verify_all, checks[i::n]) for i in range(n))
            )
            results = [False] * len(checks)
            for i, chunk in enumerate(parts_ok):
                results[i::n] = chunk
        else:
            results = _verify_all(checks)
        good: list[tuple[TopicPartition, Any, Plain]] = []
        for (tp, msg, plain), ok in zip(known, results, strict=True):
            if ok:
                good.append((tp, msg, plain))
            else:
                self._dead(parts[tp], tp, msg, "BadSignature", Reason.BAD_SIGNATURE)
        return good

    def _add_step(
        self, tp: TopicPartition, msg: Any, plain: Plain, part: _Partial, now: int
    ) -> None:
        rec = plain.record
        key = f"{rec['namespace']}/{rec['workflow_id']}/{rec['run_id']}"
        run = self._builder.open_run(
            key, rec["namespace"], rec["workflow_id"], rec["run_id"], tp.partition
        )
        if not run.workflow_type:
            run.workflow_type = rec["workflow_type"]
        try:
            body = envelope_step_body(plain)
        except (ValueError, TypeError) as exc:
            self._dead(part, tp, msg, exc, Reason.INVALID_RECORD)
            return
        entry = StepEntry(
            str(rec["receipt_id"]), str(rec["verdict"]), body, receipt_hash(plain.body)
        )
        if not self._builder.add_step(run, entry, now):
            self.metrics.duplicates.inc()
            return
        wire = msg.value
        if wire[:1] == b"\x00" and encode_plain(STEP_SCHEMA, rec) == plain.body:
            # Confluent frame of a current-schema body: store it self-describing (no registry
            # needed to verify it later).
            wire = frame(STEP_SCHEMA, plain.body)
        part.rows.append(step_row(rec, wire, tp.partition, msg.offset))

    async def _hydrate(self, keys: Mapping[_RunId, int]) -> None:
        missing = sorted(k for k in keys if self._builder.get("/".join(k)) is None)
        if not missing:
            return
        stored_steps, stored_envelopes = await self._retry(lambda: self.sink.load_runs(missing))
        for ns, wf, rid in missing:
            run = self._builder.open_run(f"{ns}/{wf}/{rid}", ns, wf, rid, keys[(ns, wf, rid)])
            entries = []
            for row in stored_steps.get((ns, wf, rid), ()):
                entries.append(_stored_entry(row))
            env = stored_envelopes.get((ns, wf, rid))
            if env is None:
                self._builder.hydrate(run, entries)
            else:
                self._builder.hydrate(
                    run,
                    entries,
                    revision=env.revision,
                    written_root=env.chain_root,
                    written_complete=env.complete,
                    completion=completion_from_row(env),
                )

    async def _insert_steps(self, parts: Mapping[TopicPartition, _Partial]) -> None:
        """One insert for the whole poll batch (chDB and ClickHouse pay a fixed cost per insert).

        The deduplication token names every partition's offset range, so a retry of this very
        insert is recognized; replays with other batch boundaries are handled by hydration."""
        with_rows = sorted(
            ((tp, part) for tp, part in parts.items() if part.rows), key=lambda i: i[0].partition
        )
        if not with_rows:
            return
        topic = with_rows[0][0].topic
        ranges = ",".join(f"p{tp.partition}:{part.first}-{part.last}" for tp, part in with_rows)
        rows = [(tp, part, row) for tp, part in with_rows for row in part.rows]
        await self._insert_rows(rows, f"steps:{topic}:{ranges}")

    async def _insert_rows(
        self, rows: list[tuple[TopicPartition, _Partial, StepRow]], token: str
    ) -> None:
        try:
            await self._retry(lambda: self.sink.insert_steps([r for _, _, r in rows], token))
            self.metrics.written.labels("step_receipts").inc(len(rows))
        except SinkDataError as exc:
            if len(rows) == 1:
                tp, part, row = rows[0]
                self._dead_row(tp, part, row, exc)
                return
            # Bisect to isolate the bad rows; halves get derived, deterministic tokens.
            mid = len(rows) // 2
            await self._insert_rows(rows[:mid], f"{token}/a")
            await self._insert_rows(rows[mid:], f"{token}/b")

    def _dead_row(self, tp: TopicPartition, part: _Partial, row: StepRow, exc: Exception) -> None:
        record = plain_from_row(row)
        value = frame(STEP_SCHEMA, encode_plain(STEP_SCHEMA, record))
        wire = row.wire
        part.dead.append(
            DeadLetter.of(
                topic=tp.topic,
                partition=tp.partition,
                offset=row.kafka_offset,
                key=f"{record['namespace']}/{record['workflow_id']}/{record['run_id']}".encode(),
                value=wire or value,
                headers=(),
                error=exc,
                reason=Reason.CLICKHOUSE_DATA,
            )
        )

    async def _write_due(self, now: int) -> bool:
        due: list[tuple[RunState, Envelope]] = [
            (run, envelope.signed_by(self._config.builder_key))
            for run, envelope in self._builder.due(now)
        ]
        if not due:
            return False
        # Publish first, then insert: a crash in between re-publishes on replay (at least once
        # on the topic, subscribers key by run and revision); the other order could lose it.
        if self._config.publish_envelopes and self._producer is not None:
            futures = [
                await self._producer.send(
                    self._config.topics.envelopes, envelope.framed(), key=run.key.encode()
                )
                for run, envelope in due
            ]
            await self._kafka(asyncio.gather(*futures))
        rows = [envelope_row(envelope) for _, envelope in due]
        ident = "\n".join(f"{r.key}@{e.revision}:{e.chain_root.hex()}" for r, e in due)
        token = "envelopes:" + hashlib.sha256(ident.encode()).hexdigest()
        try:
            await self._retry(lambda: self.sink.insert_envelopes(rows, token))
        except SinkDataError:
            _log.exception("envelope rows refused by ClickHouse; inserting one by one")
            for (run, envelope), row in zip(due, rows, strict=True):
                try:
                    await self._retry(
                        lambda row=row, e=envelope: self.sink.insert_envelopes(
                            [row], f"{token}:{e.workflow_id}/{e.run_id}@{e.revision}"
                        )
                    )
                except SinkDataError:
                    _log.exception("envelope %s revision %s refused", run.key, envelope.revision)
                    self.metrics.dead_letters.labels(Reason.CLICKHOUSE_DATA).inc()
        self.metrics.written.labels("workflow_receipts").inc(len(rows))
        failpoint("consumer.after_envelope_insert")
        for run, envelope in due:
            self._builder.mark_written(run, envelope, now)
        return True

    async def _send_dead_letters(self, parts: Sequence[_Partial]) -> None:
        producer = self._producer
        dead = [d for part in parts for d in part.dead]
        if not dead or producer is None:
            return
        futures = []
        for d in dead:
            self.metrics.dead_letters.labels(d.reason).inc()
            _log.warning(
                "dead letter %s[%d]@%d: %s (%s)", d.topic, d.partition, d.offset, d.reason, d.detail
            )
            try:
                fut = await producer.send(
                    self._config.topics.dlq, d.value, key=d.key, headers=d.kafka_headers()
                )
            except MessageSizeTooLargeError:
                value = (d.value or b"")[: self._config.max_message_bytes // 2]
                headers = [*d.kafka_headers(), ("chio.dlq.truncated", b"true")]
                fut = await producer.send(
                    self._config.topics.dlq, value, key=d.key, headers=headers
                )
            futures.append(fut)
        await self._kafka(asyncio.gather(*futures))

    async def _commit(self, step_offsets: Mapping[TopicPartition, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        offsets = dict(step_offsets)
        runs_topic = self._config.topics.runs
        for partition, next_offset in self._runs_next.items():
            pending = self._builder.pending_offset(partition)
            offsets[TopicPartition(runs_topic, partition)] = (
                next_offset if pending is None else min(pending, next_offset)
            )
        offsets = {tp: o for tp, o in offsets.items() if self._committed.get(tp) != o}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took the partitions: the new owner re-reads from the last commit and
            # the rows already written are recognized (hydration, deduplication tokens).
            _log.warning("offset commit failed (%s); the batch will be replayed", exc)
            return
        self._committed.update(offsets)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_evict >= 1.0:
            self._last_evict = now
            self._builder.evict(_now_us(), max_runs=self._config.max_open_runs)
            consumer = self._consumer
            if consumer is not None:
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    committed = self._committed.get(tp)
                    if high is not None and committed is not None:
                        self.metrics.lag.labels(tp.topic, str(tp.partition)).set(
                            max(0, high - committed)
                        )
        self.metrics.open_runs.set(len(self._builder))

    async def lag(self) -> int:
        """Total of (end offset - committed offset) over the assigned partitions."""
        consumer = self._consumer
        if consumer is None:
            return 0
        assigned = list(consumer.assignment())
        if not assigned:
            return 0
        ends = await consumer.end_offsets(assigned)
        total = 0
        for tp in assigned:
            committed = await consumer.committed(tp)
            total += max(0, ends[tp] - (committed or 0))
        return total

    async def _kafka(self, awaitable: Any) -> Any:
        try:
            return await asyncio.wait_for(awaitable, self._config.request_timeout_ms / 1000 * 2)
        except (KafkaError, TimeoutError) as exc:
            raise ConsumerError(f"kafka produce failed: {exc}") from exc

    async def _retry(self, fn: Any) -> Any:
        delay = self._config.retry_initial_seconds
        while True:
            try:
                return await fn()
            except SinkUnavailable as exc:
                _log.warning("ClickHouse unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.retry_max_seconds)


def _verify_all(checks: Sequence[tuple[bytes, bytes]]) -> list[bool]:
    return [verify_body(body, key) for body, key in checks]


def _stored_entry(row: StepRow) -> StepEntry:
    """The builder's entry for a stored step row."""
    plain: Plain | None = None
    if row.wire:
        with contextlib.suppress(DecodeError):
            plain = decode_plain(row.wire)
    if plain is not None:
        return StepEntry(
            row.receipt_id, row.verdict, envelope_step_body(plain), receipt_hash(plain.body)
        )
    body = encode_plain(STEP_SCHEMA, plain_from_row(row))
    return StepEntry(row.receipt_id, row.verdict, body, receipt_hash(body))
