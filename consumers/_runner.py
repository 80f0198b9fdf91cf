"""One consumer loop for every consumer of the package: poll, decode, deliver, dead-letter, commit.

A :class:`BatchRunner` is one member of a consumer group. Each poll it decodes the messages (the
whole poll in one native call, ``consumers._wire.decode_plain_batch``; bad
bytes, oversized values and unexpected schemas are data errors: dead-lettered, or skipped when
the consumer is not the one that owns them), hands the :class:`Batch` to its deliver step (a
:class:`BatchHandler`: the receipt builder, the SIEM exporter), publishes the batch's dead
letters, then commits the offsets the handler names. What it guarantees:

* nothing is committed before the deliver step returned and the dead letters were acknowledged;
* one batch in flight: the next poll waits for this batch's commit (back-pressure; the fetch
  buffer is bounded by ``max_batch`` and the fetch sizes, a slow sink slows the poll down);
* a rebalance waits for the batch in flight (the listener takes the same lock), then the
  handler forgets the revoked partitions;
* a stop event ends every retry wait; an operational (retriable) error raised while stopping
  leaves the batch uncommitted, so the next owner of its partitions reads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from chio_receipts.consumers._dlq import (
    DEAD_LETTER_SOURCE,
    TRUNCATED_HEADER,
    DeadLetter,
    Reason,
)
from chio_receipts.consumers._errors import ConsumerError, KafkaUnavailable
from chio_receipts.consumers._metrics import ConsumerMetrics
from chio_receipts.consumers._wire import Plain, decode_plain_batch
from chio_receipts.schemas import (
    ChioReceiptsError,
    Codec,
    DecodeError,
    KafkaConnection,
    RegistryError,
    RetryPolicy,
    SchemaRegistryClient,
    UnknownFormat,
    UnknownSchema,
    confluent_schema_id,
    is_retriable,
    retry_async,
)

__all__ = [
    "Batch",
    "BatchHandler",
    "BatchRunner",
    "Message",
    "PartitionBatch",
    "RunnerConfig",
    "partition_counts",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerConfig:
    """One consumer group member: where to read, what to accept, how to wait."""

    kafka: KafkaConnection
    group_id: str
    topics: tuple[str, ...]
    dlq_topic: str
    schemas: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Writer schema names accepted per topic; any other is a ``wrong_schema`` data error.
    A topic not named here accepts every schema."""
    dead_letter_data_errors: bool = True
    """False for a consumer that does not own its input's data errors (another consumer
    dead-letters them): such messages are logged and skipped."""
    max_batch: int = 5_000
    poll_timeout_ms: int = 200
    max_message_bytes: int = 1_048_576
    max_poll_interval_ms: int = 900_000
    registry_url: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Backoff of the runner's own waits (schema registry); ``retry_on`` is set per use."""
    source: str = DEAD_LETTER_SOURCE
    """CloudEvents source of the dead letters this consumer publishes."""


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: where it came from, the consumed record, the decoded event."""

    tp: TopicPartition
    record: Any
    plain: Plain


@dataclass(slots=True)
class PartitionBatch:
    """What one poll brought from one partition (``first``..``last`` offsets)."""

    tp: TopicPartition
    first: int
    last: int
    messages: list[Message] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)

    def dead_letter(self, record: Any, error: BaseException | str, reason: str) -> None:
        """Refuse the consumed ``record`` of this partition: it goes to the dead-letter topic."""
        self.dead.append(
            DeadLetter.of(
                topic=self.tp.topic,
                partition=self.tp.partition,
                offset=record.offset,
                key=record.key,
                value=record.value,
                headers=record.headers,
                error=error,
                reason=reason,
            )
        )


@dataclass(slots=True)
class Batch:
    """One poll's worth of decoded messages, by partition, and the run's stop event."""

    parts: dict[TopicPartition, PartitionBatch]
    stop: asyncio.Event
    size: int = 0
    """Messages polled (decoded or not)."""
    dead: list[DeadLetter] = field(default_factory=list)
    """Dead letters of things the handler made (not consumed messages): refused envelope rows."""

    def messages(self, topic: str | None = None) -> Iterator[Message]:
        """The decoded messages (of ``topic``), partition by partition, in offset order."""
        for tp, part in self.parts.items():
            if topic is None or tp.topic == topic:
                yield from part.messages

    def dead_letter(self, message: Message, error: BaseException | str, reason: str) -> None:
        """Refuse ``message``: it goes to the dead-letter topic before the batch commits."""
        self.parts[message.tp].dead_letter(message.record, error, reason)

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter of the batch."""
        return [d for part in self.parts.values() for d in part.dead] + self.dead

    def next_offsets(self) -> dict[TopicPartition, int]:
        """The offsets that commit the whole batch."""
        return {tp: part.last + 1 for tp, part in self.parts.items()}


class BatchHandler(Protocol):
    """The deliver step of a :class:`BatchRunner`."""

    async def deliver(self, batch: Batch) -> None:
        """Write the batch to the sink (called for empty polls too). Dead-letter data errors
        with ``batch.dead_letter``; raise operational errors (nothing is committed)."""
        ...

    def offsets(self, batch: Batch) -> Mapping[TopicPartition, int]:
        """The offsets to commit now (after the batch's dead letters were published)."""
        ...

    async def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """Forget the state of ``partitions`` (no batch is in flight)."""
        ...

    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        """``partitions`` are this member's now."""
        ...


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runner: BatchRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        await self._runner.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self._runner.partitions_assigned(assigned)


def _registry_retriable(exc: BaseException) -> bool:
    """A registry failure worth waiting for: not a refusal of the id (4xx other than 429)."""
    if not isinstance(exc, RegistryError):
        return False
    return not (exc.status is not None and 400 <= exc.status < 500 and exc.status != 429)


class _MetadataLag(ConsumerError):
    """A topic is not in the broker's metadata yet."""

    retriable = True


async def partition_counts(kafka: KafkaConnection, topics: Sequence[str]) -> dict[str, int]:
    """The partition count of each of ``topics`` that exists (a missing one is left out).

    A topic created a moment ago may not be in the metadata yet: asked a few times."""
    admin = AIOKafkaAdminClient(**kafka.client_kwargs())
    counts: dict[str, int] = {}

    async def describe() -> None:
        for item in await admin.describe_topics(list(topics)):
            if item.get("partitions"):
                counts[item["topic"]] = len(item["partitions"])
        if not all(t in counts for t in topics):
            raise _MetadataLag("topic metadata incomplete")

    try:
        await admin.start()
        try:
            await retry_async(
                describe,
                policy=RetryPolicy(
                    initial_seconds=0.2, maximum_seconds=2.0, attempts=10, describe="topic metadata"
                ),
            )
        except _MetadataLag:
            pass  # the caller reports the missing topics
        finally:
            await admin.close()
    except KafkaError as exc:
        raise KafkaUnavailable(f"cannot read topic metadata: {exc}") from exc
    return counts


class BatchRunner:
    """Polls ``config.topics`` as one group member and drives ``handler`` batch by batch."""

    def __init__(
        self, config: RunnerConfig, handler: BatchHandler, *, metrics: ConsumerMetrics
    ) -> None:
        self._config = config
        self._handler = handler
        self._metrics = metrics
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._registry: SchemaRegistryClient | None = None
        self._codec: Codec | None = None
        self._schema_ids: set[int] = set()
        self._lock = asyncio.Lock()
        self._committed: dict[TopicPartition, int] = {}
        self._stop = asyncio.Event()
        self._last_lag = 0.0

    @property
    def producer(self) -> AIOKafkaProducer | None:
        """The producer of the dead letters (idempotent, ``acks=all``), for the handler's own
        output topics too; None until started."""
        return self._producer

    @property
    def codec(self) -> Codec | None:
        """The codec reading Confluent-framed input (a registry is configured), while started."""
        return self._codec

    @property
    def committed(self) -> Mapping[TopicPartition, int]:
        """The offsets this member committed, by partition it holds."""
        return self._committed

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member holds now."""
        consumer = self._consumer
        return frozenset(consumer.assignment()) if consumer is not None else frozenset()

    async def start(self) -> None:
        """Connect the consumer and the producer, then subscribe. Idempotent."""
        if self._consumer is not None:
            return
        cfg = self._config
        fetch = max(cfg.max_message_bytes * 2, 1_048_576)
        try:
            if cfg.registry_url:
                self._registry = SchemaRegistryClient(cfg.registry_url)
                self._codec = Codec(self._registry)
            consumer = AIOKafkaConsumer(
                **{
                    "group_id": cfg.group_id,
                    "enable_auto_commit": False,
                    "auto_offset_reset": "earliest",
                    # Steps and runs are co-partitioned: one member must hold the same partition
                    # number of both.
                    "partition_assignment_strategy": (RangePartitionAssignor,),
                    "max_partition_fetch_bytes": fetch,
                    "fetch_max_bytes": max(cfg.max_message_bytes * 4, 52_428_800),
                    "max_poll_interval_ms": cfg.max_poll_interval_ms,
                    "isolation_level": "read_committed",
                    **cfg.kafka.client_kwargs(),
                }
            )
            self._consumer = consumer
            await consumer.start()
            self._producer = AIOKafkaProducer(
                **{
                    "acks": "all",
                    "enable_idempotence": True,
                    # A poll batch can publish hundreds of envelopes of a few KB: with aiokafka's
                    # 16 KiB default batch every few sends waited for a round trip
                    # (see docs/BENCHMARKS.md).
                    "max_batch_size": fetch // 2,
                    "linger_ms": 5,
                    "compression_type": "lz4",
                    "max_request_size": fetch,
                    **cfg.kafka.client_kwargs(),
                }
            )
            await self._producer.start()
            consumer.subscribe(list(cfg.topics), listener=_Listener(self))
        except KafkaError as exc:
            await self.stop()
            raise KafkaUnavailable(f"cannot connect to Kafka: {exc}") from exc
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Leave the group and close the clients; what is not committed is re-read. Idempotent."""
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            with contextlib.suppress(KafkaError):
                await asyncio.wait_for(consumer.stop(), 30)
        if producer is not None:
            with contextlib.suppress(KafkaError):
                await asyncio.wait_for(producer.stop(), 30)
        registry, self._registry = self._registry, None
        if registry is not None:
            await registry.aclose()
        self._codec = None
        self._committed.clear()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Process batches until ``stop`` is set (or forever)."""
        self._stop = stop or asyncio.Event()
        while not self._stop.is_set():
            await self.run_once()

    async def run_once(self) -> int:
        """Poll once and process what came (an empty poll too); the number of messages."""
        consumer = self._consumer
        if consumer is None:
            raise ConsumerError("the consumer is not started")
        data = await consumer.getmany(
            timeout_ms=self._config.poll_timeout_ms, max_records=self._config.max_batch
        )
        async with self._lock:
            try:
                return await self._process(data)
            except ChioReceiptsError as exc:
                if not (self._stop.is_set() and is_retriable(exc)):
                    raise
                _log.info(
                    "stopping during a batch (%s): it stays uncommitted and is read again",
                    type(exc).__name__,
                )
                return 0

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

    # -- rebalance ------------------------------------------------------------------------

    async def partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        """Wait for the batch in flight (it commits), then forget the revoked partitions."""
        async with self._lock:
            for tp in revoked:
                self._committed.pop(tp, None)
            await self._handler.revoked(revoked)
            _log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        """Nothing to load eagerly: reading resumes at the committed offsets."""
        self._handler.assigned(assigned)
        _log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))

    # -- one batch ------------------------------------------------------------------------

    async def _process(self, data: Mapping[TopicPartition, Sequence[Any]]) -> int:
        batch = Batch(parts={}, stop=self._stop)
        await self._fetch_writer_schemas(data)
        # The whole poll is decoded in one native call; the results are taken in record order.
        decoded = iter(
            decode_plain_batch(
                [r.value for records in data.values() for r in records if self._decodable(r)],
                self._codec,
            )
        )
        for tp, records in data.items():
            if not records:
                continue
            batch.size += len(records)
            self._metrics.consumed.labels(tp.topic).inc(len(records))
            part = PartitionBatch(tp=tp, first=records[0].offset, last=records[-1].offset)
            batch.parts[tp] = part
            accepted = self._config.schemas.get(tp.topic)
            for record in records:
                plain = self._decode(part, record, accepted, decoded)
                if plain is not None:
                    part.messages.append(Message(tp, record, plain))
        await self._handler.deliver(batch)
        await self._publish_dead_letters(batch.dead_letters())
        await self._commit(self._handler.offsets(batch))
        self._update_lag()
        return batch.size

    def _refuse(
        self, part: PartitionBatch, record: Any, error: Exception | str, reason: str
    ) -> None:
        if self._config.dead_letter_data_errors:
            part.dead_letter(record, error, reason)
        else:
            _log.warning(
                "skipping %s message %s[%d]@%d",
                reason,
                part.tp.topic,
                part.tp.partition,
                record.offset,
            )

    def _decodable(self, record: Any) -> bool:
        """Whether ``record``'s value is decoded at all (not empty, not oversized)."""
        value = record.value
        return value is not None and len(value) <= self._config.max_message_bytes

    def _decode(
        self,
        part: PartitionBatch,
        record: Any,
        accepted: frozenset[str] | None,
        decoded: Iterator[Plain | DecodeError],
    ) -> Plain | None:
        """The decoded event of ``record`` (the next of ``decoded`` when it is decodable), or
        None when it is refused."""
        value = record.value
        if value is None:
            self._refuse(part, record, "EmptyMessage", Reason.MALFORMED)
            return None
        if len(value) > self._config.max_message_bytes:
            self._refuse(part, record, "OversizedMessage", Reason.OVERSIZED)
            return None
        plain = next(decoded)
        if isinstance(plain, UnknownFormat):
            self._refuse(part, record, plain, Reason.UNKNOWN_FORMAT)
            return None
        if isinstance(plain, UnknownSchema):
            self._refuse(part, record, plain, Reason.UNKNOWN_SCHEMA)
            return None
        if isinstance(plain, DecodeError):
            self._refuse(part, record, plain, Reason.MALFORMED)
            return None
        if accepted is not None and plain.schema_name not in accepted:
            self._refuse(part, record, f"WrongSchema: {plain.schema_name}", Reason.WRONG_SCHEMA)
            return None
        return plain

    async def _fetch_writer_schemas(self, data: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Fetch (once) the registry schemas of the batch's Confluent-framed messages."""
        codec = self._codec
        if codec is None:
            return
        policy = dataclasses.replace(
            self._config.retry, retry_on=_registry_retriable, describe="schema registry"
        )
        for records in data.values():
            for record in records:
                value = record.value
                if not value or value[:1] != b"\x00" or len(value) < 5:
                    continue
                schema_id = confluent_schema_id(value)
                if schema_id in self._schema_ids:
                    continue
                try:
                    await retry_async(
                        functools.partial(codec.decode_async, value), policy=policy, stop=self._stop
                    )
                except DecodeError:
                    pass  # refused when the message is decoded
                except RegistryError as exc:
                    if _registry_retriable(exc):
                        raise  # stopping: the batch stays uncommitted
                    # The registry refuses this id: its messages are refused when decoded.
                self._schema_ids.add(schema_id)

    async def _publish_dead_letters(self, dead: Sequence[DeadLetter]) -> None:
        producer = self._producer
        if not dead or producer is None:
            return
        futures = []
        for d in dead:
            self._metrics.dead_letters.labels(d.reason).inc()
            _log.warning(
                "dead letter %s[%d]@%d: %s (%s)", d.topic, d.partition, d.offset, d.reason, d.detail
            )
            headers = d.kafka_headers(source=self._config.source)
            try:
                fut = await producer.send(
                    self._config.dlq_topic, d.value, key=d.key, headers=headers
                )
            except MessageSizeTooLargeError:
                value = (d.value or b"")[: self._config.max_message_bytes // 2]
                headers = [*headers, (TRUNCATED_HEADER, b"true")]
                fut = await producer.send(self._config.dlq_topic, value, key=d.key, headers=headers)
            futures.append(fut)
        await self.produced(asyncio.gather(*futures))

    async def produced(self, awaitable: Any) -> Any:
        """Await produce acknowledgements within twice the request timeout."""
        try:
            return await asyncio.wait_for(
                awaitable, self._config.kafka.request_timeout_ms / 1000 * 2
            )
        except (KafkaError, TimeoutError) as exc:
            raise ConsumerError(f"kafka produce failed: {exc}") from exc

    async def _commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        changed = {tp: o for tp, o in offsets.items() if self._committed.get(tp) != o}
        if not changed:
            return
        try:
            await consumer.commit(changed)
        except KafkaError as exc:
            # A rebalance took the partitions: the new owner re-reads from the last commit and
            # the sinks recognize what was already written.
            _log.warning("offset commit failed (%s); the batch will be read again", exc)
            return
        self._committed.update(changed)

    def _update_lag(self) -> None:
        now = time.monotonic()
        consumer = self._consumer
        if consumer is None or now - self._last_lag < 1.0:
            return
        self._last_lag = now
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            committed = self._committed.get(tp)
            if high is not None and committed is not None:
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(max(0, high - committed))
