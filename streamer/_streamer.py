"""``ReceiptStreamer``: the Kafka implementation of ``schemas.ReceiptSink``.

It also takes outcome records (``publish_outcome``: steps topic, run key), as the
interceptor's outcome recorder expects of a sink.

Nothing on the activity path waits on Kafka. ``publish_*`` builds the Kafka record (pure, see
``_cloudevents``) and either appends it to the spool (``durability="before_execute"``, fsync'd,
group commit) or puts it in a bounded in-memory queue (``"queued"``); one tracked background task,
the sender, drains the queue first and then the spool, in order, through an idempotent
``acks="all"`` aiokafka producer with the partition computed once per run key (murmur2, as Java).

Failure handling, all inside the sender:

- a batch that is not acknowledged within ``delivery_timeout_s`` (broker down, slow, cut off) or
  fails with any Kafka error is written to the spool (queue records) or left there (spool
  records), and the producer is recreated: aiokafka's idempotent producer retries forever and
  keeps its buffer, so after a timeout it is dropped rather than trusted;
- a non-retriable producer state (out-of-order sequence, fenced, illegal state) recreates it too;
- while the spool holds records, new queued-mode records go to the spool as well, so the order
  per run key holds across an outage (the one exception: a queue batch in flight when the broker
  failed is spooled behind records spooled meanwhile; consumers order steps by receipt id);
- a record Kafka rejects for its size is moved to the ``rejected/`` spool inside the spool
  directory, logged and counted as failed, so it cannot block the spool forever;
- every failure (send, connect, spool) is retried through ``schemas.retry_async``: exponential
  backoff from ``retry_backoff_s`` to ``max_retry_backoff_s`` with full jitter (workers that
  lost the same broker do not come back in step), cut short by ``stop()``; the first
  acknowledgement after a failure resets the backoff.

Replays send the same bytes (same receipt id, same signature): downstream deduplicates by receipt
id. ``stop()`` is bounded by ``stop_timeout_s``: it drains for part of it, then persists whatever
is still in memory to the spool, then stops the producer (abandoning it if that hangs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

import chio_receipts.schemas as schemas
from chio_receipts.streamer._cloudevents import (
    Framer,
    completion_record,
    envelope_record,
    outcome_record,
    single_object,
    step_record,
)
from chio_receipts.streamer._config import StreamerConfig
from chio_receipts.streamer._errors import SpoolError, StreamerClosed, StreamerError
from chio_receipts.streamer._metrics import StreamerMetrics
from chio_receipts.streamer._partition import PartitionCache
from chio_receipts.streamer._spool import AsyncSpool, Spool, SpoolPosition, SpoolRecord

__all__ = ["ReceiptStreamer"]

log = logging.getLogger(__name__)


class ReceiptStreamer(schemas.AsyncService):
    """Produces step receipts, run completions and envelopes to Kafka; never loses one.

    An idempotent async context manager. Implements :class:`schemas.ReceiptSink`.
    """

    def __init__(
        self,
        config: StreamerConfig,
        *,
        metrics: StreamerMetrics | None = None,
        codec: schemas.Codec | None = None,
    ) -> None:
        self.config = config
        self._own_registry: schemas.SchemaRegistryClient | None = None
        if codec is None and config.wire_format == "confluent" and config.registry_url:
            self._own_registry = schemas.SchemaRegistryClient(
                config.registry_url, strategy=config.subject_strategy
            )
            codec = schemas.Codec(self._own_registry, wire_format="confluent")
        self.codec = codec
        self._framer: Framer = codec.frame_known if codec is not None else single_object
        self.metrics = metrics if metrics is not None else StreamerMetrics()
        self._spool = AsyncSpool(
            Spool(
                config.spool_dir,
                max_bytes=config.spool_max_bytes,
                segment_bytes=config.spool_segment_bytes,
            )
        )
        self._queue: collections.deque[SpoolRecord] = collections.deque()
        self._window: collections.deque[_Batch] = collections.deque()
        self._spool_cursor: SpoolPosition | None = None
        self._spilling: list[SpoolRecord] = []  # being written to the spool by the sender
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._partition_cache = PartitionCache()
        self._sender: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self._stopping = False
        self._kafka_ok = False
        self._spool_dirty = False
        self._stop_event = asyncio.Event()  # ends the sender's retry waits at once
        self._outage = False  # a failure is being retried; the next acknowledgement ends it
        self._drain_deadline = 0.0
        self._rejected = Spool(Path(config.spool_dir) / "rejected", max_bytes=1 << 62)
        # Read when scraped, not written per receipt (a gauge set takes a lock: 8 % of the
        # queued path's CPU when it was updated on every accept).
        self.metrics.spool_depth.set_function(lambda: self._spool.depth)
        self.metrics.queue_depth.set_function(lambda: len(self._queue))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (replaying what a previous process left) and start the sender.

        Does not wait for Kafka: with the broker down, receipts go to the spool until it is back.
        """
        if self._started:
            return
        if self.codec is not None and self.codec.wire_format == "confluent":
            try:
                await self._register_schemas(self.codec)
            except BaseException:
                await self._close_registry()
                raise
        self._started = True
        await self._spool.start()
        self._sender = asyncio.create_task(self._run(), name="chio-streamer-sender")

    async def _register_schemas(self, codec: schemas.Codec) -> None:
        """Register every schema for its topic once, so publishing never waits on the registry."""
        t = self.config.topics
        pairs = (
            (schemas.STEP_SCHEMA, t.steps),
            (schemas.STEP_OUTCOME_SCHEMA, t.steps),
            (schemas.RUN_COMPLETION_SCHEMA, t.runs),
            (schemas.ENVELOPE_SCHEMA, t.envelopes_topic),
        )
        try:
            for name, topic in pairs:
                await codec.schema_id(name, topic)
        except schemas.SchemaError as exc:
            raise StreamerError(f"cannot register schemas: {exc}") from exc

    async def _close_registry(self) -> None:
        registry, self._own_registry = self._own_registry, None
        if registry is not None:
            await registry.aclose()

    async def stop(self) -> None:
        """Drain for up to half of ``stop_timeout_s``, persist the rest, stop the producer."""
        if not self._started or self._stopping:
            return
        budget = self.config.stop_timeout_s
        deadline = time.monotonic() + budget
        self._drain_deadline = deadline - budget / 2 - 0.5
        self._closed = True
        self._stopping = True
        self._stop_event.set()
        self._wake.set()
        if self._sender is not None:
            done, _ = await asyncio.wait({self._sender}, timeout=budget / 2)
            if not done:
                self._sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({self._sender}, timeout=1.0)
            elif not self._sender.cancelled() and self._sender.exception() is not None:
                log.error("streamer sender failed", exc_info=self._sender.exception())
        # Records the cancelled sender was spilling may or may not be on disk: write them again
        # (a duplicate is dropped downstream by receipt id; a loss would not be).
        leftover = [*self._spilling, *self._inflight_queued(), *self._queue]
        self._spilling = []
        self._window.clear()
        self._queue.clear()
        if leftover:
            try:
                await self._spool.append_many(leftover, fsync=True)
                self.metrics.spooled.labels("shutdown").inc(len(leftover))
                log.info(
                    "streamer stop: %d undelivered records persisted to the spool", len(leftover)
                )
            except SpoolError:
                log.exception("streamer stop: %d records could not be spooled", len(leftover))
        await self._close_producer(max(0.5, deadline - time.monotonic()))
        await self._spool.stop()
        self._rejected.close()
        await self._close_registry()

    # -- ReceiptSink -----------------------------------------------------------------------------

    async def publish_step(self, receipt: schemas.StepReceipt, body: bytes) -> None:
        """Accept a signed step receipt (``body`` is its signed Avro body, sent as is)."""
        await self._accept(
            step_record(
                receipt,
                body,
                topic=self.config.topics.steps,
                source=self.config.source,
                framer=self._framer,
            )
        )

    async def publish_outcome(self, outcome: schemas.StepOutcome) -> None:
        """Accept an outcome record (steps topic, keyed by run key, under the same durability
        policy as the step receipts; ``ReceiptSinkError`` when the spool refuses)."""
        await self._accept(
            outcome_record(
                outcome,
                topic=self.config.topics.steps,
                source=self.config.source,
                framer=self._framer,
            )
        )

    async def publish_completion(self, event: schemas.RunCompletion) -> None:
        """Accept a run-completion event (runs topic, keyed by run key)."""
        await self._accept(
            completion_record(
                event,
                topic=self.config.topics.runs,
                source=self.config.source,
                framer=self._framer,
            )
        )

    async def publish_envelope(self, envelope: Mapping[str, Any]) -> None:
        """Accept a finalized ``chio-temporal/v1`` envelope (envelopes topic)."""
        await self._accept(
            envelope_record(
                envelope,
                topic=self.config.topics.envelopes_topic,
                source=self.config.source,
                framer=self._framer,
            )
        )

    async def _accept(self, record: SpoolRecord) -> None:
        if self._closed or not self._started:
            self.metrics.rejected.inc()
            raise StreamerClosed("the receipt streamer is not running")
        try:
            if self.config.durability == "before_execute":
                await self._spool.append(record, fsync=True)
                self.metrics.spooled.labels("write_ahead").inc()
            elif (
                not self._kafka_ok
                or self._spool.depth
                or len(self._queue) >= self.config.queue_size
            ):
                await self._spool.append(record, fsync=False)
                self._spool_dirty = True
                self.metrics.spooled.labels("spill").inc()
            else:
                self._queue.append(record)
        except SpoolError:
            self.metrics.rejected.inc()
            raise
        self._idle.clear()
        self._wake.set()

    # -- observation -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the last interaction with Kafka succeeded."""
        return self._kafka_ok

    @property
    def pending(self) -> int:
        """Records accepted and not yet acknowledged by Kafka (queue + in flight + spool)."""
        return (
            len(self._queue)
            + len(self._inflight_queued())
            + len(self._spilling)
            + self._spool.depth
        )

    def _inflight_queued(self) -> list[SpoolRecord]:
        """In-flight records that came from the queue (spool records are on disk anyway)."""
        return [r for b in self._window if b.spool_end is None for r in b.records]

    async def flush(self, wait_s: float) -> bool:
        """Wait until everything accepted so far is acknowledged; False on timeout."""
        deadline = time.monotonic() + wait_s
        while self.pending:
            self._wake.set()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), min(remaining, 0.1))
        return True

    # -- the sender ------------------------------------------------------------------------------

    async def _run(self) -> None:
        """The sender: delivers until ``stop()``; it never dies on a Kafka or spool failure.

        Each failure has put its records back in order (spool, or the front of the queue)
        before it reaches the retry, which waits with full jitter and ends at once on ``stop()``
        (which then persists what is left). An acknowledgement after a failure ends the outage:
        the retry sequence, and with it the backoff, starts afresh.
        """
        cfg = self.config
        policy = schemas.RetryPolicy(
            initial_seconds=cfg.retry_backoff_s,
            maximum_seconds=cfg.max_retry_backoff_s,
            describe="receipt sender",
        )
        while True:
            try:
                stopped = await schemas.retry_async(
                    self._deliver, policy=policy, stop=self._stop_event
                )
            except StreamerError:
                if self._stopping:
                    return
                raise
            if stopped:
                return

    async def _deliver(self) -> bool:
        """One attempt of the sender: True once stopped, False when an outage has ended."""
        try:
            return await self._sender_loop()
        except SpoolError:
            log.exception("streamer: spool error in the sender; records kept, retrying")
            # In-flight queue records go back to the front of the queue (a resend is a
            # duplicate at worst); spool records are still in the spool.
            self._queue.extendleft(reversed(self._inflight_queued()))
            self._window.clear()
            self._spool_cursor = None
            self._outage = True
            raise
        except _Undelivered:
            self._outage = True
            raise

    async def _sender_loop(self) -> bool:
        """Keep up to ``max_in_flight`` batches outstanding; settle them in order.

        Returns True when stopped (drained, or out of drain time), False at the first
        acknowledgement after a failure; raises on a failure (records already put back).
        """
        while True:
            if self._stopping and (not self.pending or time.monotonic() >= self._drain_deadline):
                return True
            if self._spool_dirty:
                self._spool_dirty = False
                await self._spool.sync()
            if self._window and await self._settle_head() and self._outage:
                self._outage = False
                return False
            producer = await self._ensure_producer()
            if len(self._window) < self.config.max_in_flight and await self._send_next(producer):
                continue
            if self._window:
                head = self._window[0]
                remaining = head.deadline - time.monotonic()
                if remaining > 0:
                    await asyncio.wait(head.futures, timeout=remaining)
                continue
            self._idle.set()
            await self._pause(1.0)

    async def _send_next(self, producer: AIOKafkaProducer) -> bool:
        """Hand the next batch (queue first, then spool) to the producer; False if none."""
        n = self.config.send_batch
        if self._queue:
            records = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
            batch = _Batch(records=records, spool_end=None)
        elif not self._spool.depth:
            return False  # nothing unacknowledged on disk: no need to ask the spool thread
        else:
            spooled = await self._spool.read(n, start=self._spool_cursor)
            if spooled is None:
                return False
            batch = _Batch(records=list(spooled.records), spool_end=spooled.end)
            self._spool_cursor = spooled.end
        self._window.append(batch)
        try:
            async with asyncio.timeout(self.config.send_timeout_s):
                await self._send_batches(producer, batch)
        except (TimeoutError, KafkaError) as exc:
            batch.error = exc
        batch.deadline = time.monotonic() + self.config.delivery_timeout_s
        return True

    async def _send_batches(self, producer: AIOKafkaProducer, batch: _Batch) -> None:
        """Hand ``batch``'s records to the producer, in order (one future per record).

        ``send()`` appends to aiokafka's open batch of the partition, so records handed over
        while a request is in flight join the next request (measured: the batch API, which
        waits for the previous batch of a partition to drain, spilled the queue under load).
        """
        counts = self._partitions
        cache = self._partition_cache
        for r in batch.records:
            n = counts.get(r.topic) or await self._partition_count(producer, r.topic)
            try:
                fut = await producer.send(
                    r.topic,
                    r.value,
                    key=r.key,
                    partition=cache.get(r.key, n),
                    headers=list(r.headers),
                )
            except (MessageSizeTooLargeError, RecordTooLargeError) as exc:
                await self._reject(r, exc)
                continue
            batch.futures.append(fut)

    async def _settle_head(self) -> bool:
        """Settle the oldest in-flight batch if it is done; True when it was acknowledged.

        A failed head raises :class:`_Undelivered` once its records (and everything after it)
        are back in the spool or the queue.
        """
        head = self._window[0]
        error = head.error
        if error is None:
            pending = [f for f in head.futures if not f.done()]
            if pending and time.monotonic() < head.deadline:
                return False
            if pending:
                error = TimeoutError(f"{len(pending)} records not acknowledged in time")
            else:
                error = next(
                    (f.exception() for f in head.futures if f.exception() is not None), None
                )
        if error is None:
            self._window.popleft()
            self.metrics.send_latency.observe(time.monotonic() - head.started)
            for topic, count in collections.Counter(r.topic for r in head.records).items():
                self.metrics.produced.labels(topic).inc(count)
            if head.spool_end is not None:
                await self._spool.ack(head.spool_end)
                self.metrics.replayed.inc(len(head.records))
            self._kafka_ok = True
            return True
        # The head failed: nothing after it can be trusted either. Queue records go to the
        # spool; spool records stay there (the cursor rewinds to the acknowledged head).
        self._on_failure(error)
        failed, self._window = list(self._window), collections.deque()
        self._spool_cursor = None
        for batch in failed:
            for f in batch.futures:
                # Retrieve late outcomes so the loop never logs "exception never retrieved".
                f.add_done_callback(_consume_outcome)
        queued = [r for b in failed if b.spool_end is None for r in b.records]
        if queued:
            await self._spool_records(queued, "send_failed")
        await self._spill_queue("send_failed")
        raise _Undelivered(f"send failed ({type(error).__name__}: {error})") from error

    async def _pause(self, seconds: float) -> None:
        """Idle until a record is accepted, ``stop()`` is called, or ``seconds`` pass."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _spool_records(self, records: Sequence[SpoolRecord], reason: str) -> None:
        self._spilling = list(records)
        try:
            await self._spool.append_many(records, fsync=True)
        except SpoolError:
            self._spilling = []
            # Cannot persist: keep them in memory at the front of the queue; the sender retries.
            self._queue.extendleft(reversed(records))
            raise
        self._spilling = []
        self.metrics.spooled.labels(reason).inc(len(records))

    async def _spill_queue(self, reason: str) -> None:
        if self._queue:
            records = list(self._queue)
            self._queue.clear()
            await self._spool_records(records, reason)

    def _on_failure(self, exc: BaseException) -> None:
        self._kafka_ok = False
        self.metrics.failed.labels(type(exc).__name__).inc()
        retriable = schemas.is_retriable(exc)
        log.warning(
            "streamer: send failed (%s: %s); records kept for retry, producer recreated%s",
            type(exc).__name__,
            exc,
            "" if retriable else " (fatal producer state)",
        )
        # Timeouts and non-retriable states both mean the producer cannot be trusted: aiokafka's
        # idempotent producer retries its buffer forever, so a fresh one replays from the spool.
        self._drop_producer()

    async def _reject(self, record: SpoolRecord, exc: Exception) -> None:
        self.metrics.failed.labels(type(exc).__name__).inc()
        log.error(
            "streamer: Kafka refuses a %d-byte record for %s (%s); kept in %s",
            len(record.value),
            record.topic,
            exc,
            self._rejected.directory,
        )

        def keep() -> None:
            self._rejected.open()
            self._rejected.append([record], fsync=True)

        await asyncio.to_thread(keep)

    async def _partition_count(self, producer: AIOKafkaProducer, topic: str) -> int:
        """The partition count of ``topic`` (looked up once per producer)."""
        parts = await asyncio.wait_for(producer.partitions_for(topic), self.config.send_timeout_s)
        if not parts:
            raise KafkaError(f"topic {topic} has no partitions")
        n = self._partitions[topic] = len(parts)
        return n

    # -- producer lifecycle ----------------------------------------------------------------------

    async def _ensure_producer(self) -> AIOKafkaProducer:
        """The producer, started if needed; raises :class:`_Undelivered` (queue spooled) if not."""
        if self._producer is not None:
            return self._producer
        cfg = self.config
        # The connection (bootstrap, TLS, SASL, client_options) first; the producer settings
        # after it, since delivery guarantees depend on them (acks, idempotence).
        settings: dict[str, Any] = cfg.kafka.client_kwargs()
        settings.update(
            client_id=cfg.client_id,
            acks="all",
            enable_idempotence=True,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_size,
            max_request_size=cfg.max_request_size,
            request_timeout_ms=cfg.request_timeout_ms,
        )
        producer = AIOKafkaProducer(**settings)
        try:
            await asyncio.wait_for(producer.start(), cfg.start_timeout_s)
        except (TimeoutError, KafkaError, OSError) as exc:
            self._kafka_ok = False
            self.metrics.failed.labels(type(exc).__name__).inc()
            log.warning("streamer: Kafka unavailable (%s: %s); spooling", type(exc).__name__, exc)
            await _stop_producer(producer, 1.0)
            await self._spill_queue("kafka_unavailable")
            raise _Undelivered(f"Kafka unavailable ({type(exc).__name__}: {exc})") from exc
        self._producer = producer
        self._partitions.clear()
        self._kafka_ok = True
        return producer

    def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            self.metrics.producer_restarts.inc()
            task = asyncio.create_task(_stop_producer(producer, self.config.stop_timeout_s / 2))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_producer(self, wait_s: float) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_producer(producer, wait_s)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=wait_s)


class _Undelivered(StreamerError):
    """A send failed or Kafka is unreachable; the records are back in the spool or the queue."""

    retriable = True


def _consume_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass(slots=True, kw_only=True)
class _Batch:
    """Records handed to the producer together, settled together, in order."""

    records: list[SpoolRecord]
    spool_end: SpoolPosition | None
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)
    deadline: float = 0.0


async def _stop_producer(producer: AIOKafkaProducer, wait_s: float) -> None:
    """Stop a producer within ``wait_s``; abandon it (cancel its sender) if that hangs."""
    try:
        await asyncio.wait_for(producer.stop(), wait_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        log.warning("streamer: producer stop did not finish (%s); abandoning it", exc)
        sender = getattr(getattr(producer, "_sender", None), "sender_task", None)
        if sender is not None:
            sender.cancel()
        with contextlib.suppress(TimeoutError, KafkaError, OSError):
            await asyncio.wait_for(producer.client.close(), 1.0)
