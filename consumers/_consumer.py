"""The receipt builder service: a consumer group over the steps and runs topics.

Per poll batch: decode and verify every message (bad ones are dead-lettered), re-hydrate runs
this process does not hold from ClickHouse (their stored steps and last envelope revision, which
is what makes replays and duplicates harmless), insert one block of new step rows for the whole
batch with a deduplication token made of the topic and each partition's first..last offset, write
the envelopes that became due, publish them to the envelopes topic, then commit. Step offsets are
committed once their rows are in ClickHouse; a runs-topic offset is held back at the oldest
completion whose envelope is not written yet, so a crash re-reads exactly those completions.

Outcome records (``StepOutcome``) travel on the steps topic under their run's key: each is checked
(its Kafka key, and its Chio receipt under the same trusted keys as steps; a record without a
receipt is kept, flagged unsigned), de-duplicated by outcome id against the run's stored records,
inserted into ``step_outcomes`` with the batch, and folded into the run's envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import TopicPartition

from chio_receipts.consumers._builder import (
    DECLARED_OUTCOME,
    OUTCOME_SOURCE,
    OutcomeEntry,
    ReceiptBuilder,
    RunState,
    StepEntry,
)
from chio_receipts.consumers._chio import (
    KERNEL_SIGNED,
    SIDECAR_SIGNED,
    UNSIGNED,
    UNSIGNED_DETAIL,
    ChioRefusal,
    StepVerdict,
    chio_refusal,
    outcome_refusal,
    outcome_refusals,
    signed_by,
    step_verdicts,
)
from chio_receipts.consumers._clickhouse import ClickHouseConfig, ClickHouseSink
from chio_receipts.consumers._dlq import DeadLetter, Reason
from chio_receipts.consumers._envelope import Envelope
from chio_receipts.consumers._errors import ConfigError, SinkDataError, SinkUnavailable
from chio_receipts.consumers._failpoints import failpoint
from chio_receipts.consumers._keys import KeyRing
from chio_receipts.consumers._metrics import ConsumerMetrics
from chio_receipts.consumers._rows import (
    OutcomeRow,
    StepRow,
    chio_columns_batch,
    completion_from_row,
    envelope_row,
    outcome_body,
    outcome_plain_from_row,
    outcome_row,
    plain_from_row,
    step_row,
)
from chio_receipts.consumers._runner import (
    Batch,
    BatchRunner,
    Message,
    RunnerConfig,
    partition_counts,
)
from chio_receipts.consumers._wire import (
    ENVELOPE_SCHEMA,
    RUN_SCHEMA,
    STEP_OUTCOME_SCHEMA,
    STEP_SCHEMA,
    Plain,
    decode_plain,
    encode_plain,
    envelope_step_body,
)
from chio_receipts.schemas import (
    ENVELOPE_EVENT_TYPE,
    AsyncService,
    Codec,
    ContractError,
    DecodeError,
    KafkaConnection,
    KeyPair,
    RetryPolicy,
    RunCompletion,
    SchemaError,
    SchemaRegistryClient,
    StepStatus,
    SubjectStrategy,
    TopicNames,
    WireFormat,
    check_copartitioned,
    cloudevent_headers,
    envelope_event_id,
    frame,
    receipt_hash,
    retry_async,
    signed_body,
)

__all__ = ["BuilderConfig", "ReceiptBuilderService"]

_log = logging.getLogger(__name__)
_RunId = tuple[str, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class BuilderConfig:
    """Configuration of ``chio-receipts consume``."""

    kafka: KafkaConnection
    clickhouse: ClickHouseConfig
    builder_key: KeyPair = field(repr=False)
    public_keys: Mapping[str, bytes] = field(default_factory=dict)
    key_url: str | None = None
    trusted_kernel_keys: frozenset[str] = frozenset()
    """Lowercase hex Ed25519 keys of Chio kernels whose receipts are trusted, besides every key
    of the key ring (``public_keys`` and the sidecar's ``/v1/keys``)."""
    topics: TopicNames = field(default_factory=TopicNames)
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
    max_poll_interval_ms: int = 900_000
    registry_url: str | None = None
    """Confluent-compatible registry: reads Confluent-framed input, and is where envelopes are
    registered when ``envelope_wire_format`` is ``confluent``."""
    envelope_wire_format: WireFormat = "single_object"
    """Framing of the published envelopes: single-object, or Confluent (needs ``registry_url``;
    the schema is registered on start under ``subject_strategy``'s subject)."""
    subject_strategy: SubjectStrategy = SubjectStrategy.TOPIC
    verify_threads: int = 2
    source: str = "urn:chio-receipts:receipt-builder"
    """CloudEvents source of the envelopes and dead letters this builder publishes."""


@dataclass(slots=True)
class _Rows:
    """The step and outcome rows one partition of one poll batch produced, and its offset
    range."""

    first: int
    last: int
    rows: list[StepRow] = field(default_factory=list)
    outcomes: list[OutcomeRow] = field(default_factory=list)


def _now_us() -> int:
    return time.time_ns() // 1000


class ReceiptBuilderService(AsyncService):
    """Consumes steps and completions, writes step rows and envelopes exactly once.

    The deliver step of a :class:`BatchRunner` (which polls, decodes, dead-letters and commits).
    """

    def __init__(self, config: BuilderConfig, *, metrics: ConsumerMetrics | None = None) -> None:
        self._config = config
        self.metrics = metrics or ConsumerMetrics()
        self._builder = ReceiptBuilder(
            grace_us=int(config.grace_seconds * 1e6),
            evict_after_us=int(config.evict_after_seconds * 1e6),
        )
        self._keys = KeyRing(
            config.public_keys,
            url=config.key_url,
            trusted_kernel_keys=config.trusted_kernel_keys,
        )
        self.sink = ClickHouseSink(config.clickhouse)
        topics = config.topics
        self._runner = BatchRunner(
            RunnerConfig(
                kafka=config.kafka,
                group_id=config.group_id,
                topics=(topics.steps, topics.runs),
                dlq_topic=topics.dlq,
                schemas={
                    topics.steps: frozenset({STEP_SCHEMA, STEP_OUTCOME_SCHEMA}),
                    topics.runs: frozenset({RUN_SCHEMA}),
                },
                max_batch=config.max_batch,
                poll_timeout_ms=config.poll_timeout_ms,
                max_message_bytes=config.max_message_bytes,
                max_poll_interval_ms=config.max_poll_interval_ms,
                registry_url=config.registry_url,
                retry=self._retry_policy("schema registry"),
                source=config.source,
            ),
            self,
            metrics=self.metrics,
        )
        self._runs_next: dict[int, int] = {}
        self._last_evict = 0.0
        self._wrote = False
        self._stop = asyncio.Event()
        self._started = False
        self._verify_pool: ThreadPoolExecutor | None = None
        self._envelope_registry: SchemaRegistryClient | None = None
        self._envelope_codec: Codec | None = None
        if config.envelope_wire_format == "confluent":
            if not config.registry_url:
                raise ConfigError("Confluent-framed envelopes need a schema registry URL")
            self._envelope_registry = SchemaRegistryClient(
                config.registry_url, strategy=config.subject_strategy
            )
            self._envelope_codec = Codec(self._envelope_registry, wire_format="confluent")

    @property
    def builder(self) -> ReceiptBuilder:
        """The pure state machine (for inspection)."""
        return self._builder

    def assignment(self) -> frozenset[TopicPartition]:
        """The partitions this member holds now."""
        return self._runner.assignment()

    async def start(self) -> None:
        """Check co-partitioning, connect everything, subscribe. Idempotent."""
        if self._started:
            return
        self._started = True
        cfg = self._config
        try:
            counts = await partition_counts(cfg.kafka, [cfg.topics.steps, cfg.topics.runs])
            try:
                check_copartitioned(counts, cfg.topics.steps, cfg.topics.runs)
            except ContractError as exc:
                raise ConfigError(str(exc)) from exc
            # PyNaCl releases the GIL while verifying: big batches are checked on several threads.
            if cfg.verify_threads > 1:
                self._verify_pool = ThreadPoolExecutor(
                    cfg.verify_threads, thread_name_prefix="verify"
                )
            await self._keys.refresh(force=False)
            if self._envelope_codec is not None:
                await self._register_envelope_schema(self._envelope_codec)
            await self.sink.start()
            await self._runner.start()
        except BaseException:
            await self.stop()
            raise

    async def _register_envelope_schema(self, codec: Codec) -> None:
        """Register the envelope schema once, so publishing never waits on the registry."""
        try:
            await codec.schema_id(ENVELOPE_SCHEMA, self._config.topics.envelopes)
        except SchemaError as exc:
            raise ConfigError(f"cannot register the envelope schema: {exc}") from exc

    def _envelope_value(self, envelope: Envelope) -> bytes:
        """The published bytes of an envelope, in the configured framing."""
        if self._envelope_codec is None:
            return envelope.framed()
        return self._envelope_codec.frame_known(
            ENVELOPE_SCHEMA, envelope.avro_body(), self._config.topics.envelopes
        )

    async def stop(self) -> None:
        """Stop consuming and close every client (nothing uncommitted is lost: it is re-read).

        Idempotent."""
        await self._runner.stop()
        if self._envelope_registry is not None:
            await self._envelope_registry.aclose()
        await self.sink.close()
        if self._verify_pool is not None:
            self._verify_pool.shutdown(wait=True)
            self._verify_pool = None
        self._started = False

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Process batches until ``stop`` is set (or forever)."""
        self._stop = stop or asyncio.Event()
        await self._runner.run(self._stop)

    async def run_once(self) -> int:
        """Poll once and process what came; returns the number of messages."""
        return await self._runner.run_once()

    async def lag(self) -> int:
        """Total of (end offset - committed offset) over the assigned partitions."""
        return await self._runner.lag()

    # -- rebalance (called by the runner, no batch in flight) ----------------------------

    async def revoked(self, partitions: Sequence[TopicPartition]) -> None:
        """Forget the revoked partitions' runs (the new owner rebuilds them)."""
        topics = self._config.topics
        gone = {tp.partition for tp in partitions if tp.topic in (topics.steps, topics.runs)}
        self._builder.drop_partitions(gone)
        for tp in partitions:
            if tp.topic == topics.runs:
                self._runs_next.pop(tp.partition, None)

    def assigned(self, partitions: Sequence[TopicPartition]) -> None:
        """Nothing to load eagerly: uncommitted completions are re-read from the committed
        offsets, and runs are re-hydrated from ClickHouse when their next event arrives."""

    # -- one batch ------------------------------------------------------------------------

    async def deliver(self, batch: Batch) -> None:
        """Verify, re-hydrate, insert the step rows, write the envelopes that became due."""
        self._housekeeping()
        topics = self._config.topics
        now = _now_us()
        step_rows = {
            tp: _Rows(part.first, part.last)
            for tp, part in batch.parts.items()
            if tp.topic == topics.steps
        }
        completions: list[tuple[Message, RunCompletion]] = []
        for message in batch.messages(topics.runs):
            event = self._completion(batch, message)
            if event is not None and _keyed_by_run(batch, message, event.run_key):
                completions.append((message, event))
        on_steps = list(batch.messages(topics.steps))
        # A step or outcome record is checked for its signatures first (a more specific
        # reason), then its key.
        steps = [
            m
            for m in await self._verified(
                batch, [m for m in on_steps if m.plain.schema_name == STEP_SCHEMA]
            )
            if _keyed_by_run(batch, m, "/".join(_run_id(m.plain)))
        ]
        outcomes = [
            m
            for m in await self._verified_outcomes(
                batch, [m for m in on_steps if m.plain.schema_name == STEP_OUTCOME_SCHEMA]
            )
            if _keyed_by_run(batch, m, "/".join(_run_id(m.plain)))
        ]
        touched: dict[_RunId, int] = {_run_id(m.plain): m.tp.partition for m in steps}
        touched.update({_run_id(m.plain): m.tp.partition for m in outcomes})
        touched.update(
            {(e.namespace, e.workflow_id, e.run_id): m.tp.partition for m, e in completions}
        )
        await self._hydrate(touched)
        # The receipts' analytics columns, read natively for the whole batch (GIL released).
        chio = chio_columns_batch([m.plain.record for m in steps])
        for message, columns in zip(steps, chio, strict=True):
            self._add_step(batch, message, step_rows[message.tp], now, columns)
        for message in outcomes:
            self._add_outcome(message, step_rows[message.tp], now)
        for message, event in completions:
            run = self._builder.open_run(
                event.run_key,
                event.namespace,
                event.workflow_id,
                event.run_id,
                message.tp.partition,
            )
            self._builder.add_completion(run, event, message.record.offset, now)
        await self._insert_steps(batch, step_rows)
        await self._insert_outcomes(batch, step_rows)
        wrote_envelopes = await self._write_due(batch, now)
        for tp, part in batch.parts.items():
            if tp.topic == topics.runs:
                self._runs_next[tp.partition] = part.last + 1
        self._wrote = any(r.rows or r.outcomes for r in step_rows.values()) or wrote_envelopes

    def offsets(self, batch: Batch) -> dict[TopicPartition, int]:
        """Step offsets once their rows are in ClickHouse; a runs-topic offset held back at the
        oldest completion whose envelope is not written yet."""
        if self._wrote:
            self._wrote = False
            failpoint("consumer.after_insert_before_commit")
        offsets = {tp: o for tp, o in batch.next_offsets().items() if tp.topic != self._runs_topic}
        for partition, next_offset in self._runs_next.items():
            pending = self._builder.pending_offset(partition)
            offsets[TopicPartition(self._runs_topic, partition)] = (
                next_offset if pending is None else min(pending, next_offset)
            )
        return offsets

    @property
    def _runs_topic(self) -> str:
        return self._config.topics.runs

    def _completion(self, batch: Batch, message: Message) -> RunCompletion | None:
        try:
            return RunCompletion.from_avro(message.plain.record)
        except (KeyError, TypeError, ValueError) as exc:
            batch.dead_letter(message, exc, Reason.INVALID_RECORD)
            return None

    async def _verified(self, batch: Batch, steps: list[Message]) -> list[Message]:
        """The steps whose signatures hold; the others are dead-lettered.

        A sidecar-signed step needs its Avro signature by a known key; a kernel-signed step
        (no ``key_id``, no signature) needs its Chio receipt; a step with neither is refused as
        unsigned; a step with a Chio receipt needs
        it to check under the trusted keys (the ring's, plus the configured kernel keys),
        refreshing the ring once for an unknown ``kernel_key``."""
        keys = self._keys
        await keys.refresh_for(
            {m.plain.record["key_id"] for m in steps if signed_by(m.plain.record) is SIDECAR_SIGNED}
        )
        checks: list[tuple[Plain, bytes | None]] = []
        known: list[Message] = []
        for message in steps:
            record = message.plain.record
            how = signed_by(record)
            public_key = None if how is KERNEL_SIGNED else keys.get(record["key_id"])
            if how is UNSIGNED:
                batch.dead_letter(message, UNSIGNED_DETAIL, Reason.UNSIGNED_STEP)
            elif how is not KERNEL_SIGNED and public_key is None:
                batch.dead_letter(message, f"UnknownKey: {record['key_id']!r}", Reason.UNKNOWN_KEY)
            else:
                checks.append((message.plain, public_key))
                known.append(message)
        trusted = keys.trusted_hex
        pool = self._verify_pool
        if pool is not None and len(checks) >= 256:
            n = self._config.verify_threads
            loop = asyncio.get_running_loop()
            parts_ok = await asyncio.gather(
                *(loop.run_in_executor(pool, _verify_all, checks[i::n], trusted) for i in range(n))
            )
            results: list[_Verdict] = [None] * len(checks)
            for i, chunk in enumerate(parts_ok):
                results[i::n] = chunk
        else:
            results = _verify_all(checks, trusted)
        untrusted = {
            r.untrusted_key for r in results if isinstance(r, ChioRefusal) and r.untrusted_key
        }
        if untrusted:
            # A kernel key the ring does not know yet (a rotated sidecar key): ask once.
            await keys.refresh_for(kernel_keys=untrusted)
            trusted = keys.trusted_hex
            results = [
                chio_refusal(m.plain.record, trusted)
                if isinstance(r, ChioRefusal) and r.untrusted_key
                else r
                for m, r in zip(known, results, strict=True)
            ]
        good: list[Message] = []
        for message, result in zip(known, results, strict=True):
            if result is None:
                good.append(message)
            elif isinstance(result, ChioRefusal):
                batch.dead_letter(message, result.error(), result.reason)
            else:
                batch.dead_letter(message, "BadSignature", Reason.BAD_SIGNATURE)
        return good

    async def _verified_outcomes(self, batch: Batch, records: list[Message]) -> list[Message]:
        """The outcome records whose Chio receipt checks under the trusted keys (the ring's,
        plus the configured kernel keys; an unknown signer refreshes the ring once), and the
        unsigned ones (kept, flagged); the others are dead-lettered."""
        if not records:
            return []
        keys = self._keys
        trusted = keys.trusted_hex
        pool = self._verify_pool
        if pool is not None and len(records) >= 256:
            # As for steps: the Ed25519 checks release the GIL.
            n = self._config.verify_threads
            loop = asyncio.get_running_loop()
            parts = await asyncio.gather(
                *(
                    loop.run_in_executor(pool, _outcome_refusals, records[i::n], trusted)
                    for i in range(n)
                )
            )
            results: list[ChioRefusal | None] = [None] * len(records)
            for i, chunk in enumerate(parts):
                results[i::n] = chunk
        else:
            results = _outcome_refusals(records, trusted)
        untrusted = {r.untrusted_key for r in results if r is not None and r.untrusted_key}
        if untrusted:
            await keys.refresh_for(kernel_keys=untrusted)
            trusted = keys.trusted_hex
            results = [
                outcome_refusal(m.plain.record, trusted) if r is not None and r.untrusted_key else r
                for m, r in zip(records, results, strict=True)
            ]
        good: list[Message] = []
        for message, refusal in zip(records, results, strict=True):
            if refusal is None:
                good.append(message)
            else:
                batch.dead_letter(message, refusal.error(), refusal.reason)
        return good

    def _add_outcome(self, message: Message, part: _Rows, now: int) -> None:
        tp, msg, plain = message.tp, message.record, message.plain
        rec = plain.record
        key = f"{rec['namespace']}/{rec['workflow_id']}/{rec['run_id']}"
        run = self._builder.open_run(
            key, rec["namespace"], rec["workflow_id"], rec["run_id"], tp.partition
        )
        if not run.workflow_type:
            run.workflow_type = rec["workflow_type"]
        body = outcome_body(plain)
        if not self._builder.add_outcome(run, _outcome_entry(rec, body), now):
            self.metrics.duplicates.inc()
            return
        wire = msg.value
        if wire[:1] == b"\x00" and plain.current is False and body == plain.body:
            wire = frame(STEP_OUTCOME_SCHEMA, body)
        part.outcomes.append(outcome_row(rec, wire, tp.partition, msg.offset))

    def _add_step(
        self, batch: Batch, message: Message, part: _Rows, now: int, chio: Sequence[str] | None
    ) -> None:
        tp, msg, plain = message.tp, message.record, message.plain
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
            batch.dead_letter(message, exc, Reason.INVALID_RECORD)
            return
        entry = StepEntry(
            str(rec["receipt_id"]),
            str(rec["verdict"]),
            body,
            receipt_hash(plain.body),
            rec["activity_id"],
            rec["attempt"],
        )
        if not self._builder.add_step(run, entry, now):
            self.metrics.duplicates.inc()
            return
        wire = msg.value
        if wire[:1] == b"\x00" and encode_plain(STEP_SCHEMA, rec) == plain.body:
            # Confluent frame of a current-schema body: store it self-describing (no registry
            # needed to verify it later).
            wire = frame(STEP_SCHEMA, plain.body)
        part.rows.append(step_row(rec, wire, tp.partition, msg.offset, chio))

    async def _hydrate(self, keys: Mapping[_RunId, int]) -> None:
        missing = sorted(k for k in keys if self._builder.get("/".join(k)) is None)
        if not missing:
            return
        stored = await self._retry(lambda: self.sink.load_runs(missing))
        codec = self._runner.codec
        if codec is not None:
            # Writer schemas of stored Confluent-framed steps, so they re-enter as written.
            for rows in stored.steps.values():
                for row in rows:
                    if row.wire[:1] == b"\x00":
                        with contextlib.suppress(SchemaError):
                            await codec.decode_async(row.wire)
        for ns, wf, rid in missing:
            run = self._builder.open_run(f"{ns}/{wf}/{rid}", ns, wf, rid, keys[(ns, wf, rid)])
            entries = [_stored_entry(row, codec) for row in stored.steps.get((ns, wf, rid), ())]
            records = [_stored_outcome(row) for row in stored.outcomes.get((ns, wf, rid), ())]
            env = stored.envelopes.get((ns, wf, rid))
            if env is None:
                self._builder.hydrate(run, entries, outcomes=records)
            else:
                extra = dict(env.extra)
                self._builder.hydrate(
                    run,
                    entries,
                    revision=env.revision,
                    written_root=env.chain_root,
                    written_complete=env.complete,
                    completion=completion_from_row(env),
                    declared=extra.get(DECLARED_OUTCOME, ""),
                    # Rows older than ``outcome_source`` are compared by steps only.
                    written_meta=(env.outcome, tuple(sorted(env.extra)))
                    if OUTCOME_SOURCE in extra
                    else None,
                    outcomes=records,
                    written_outcomes=env.outcome_ids,
                    written_attempts=env.attempts,
                )

    async def _insert_steps(self, batch: Batch, parts: Mapping[TopicPartition, _Rows]) -> None:
        """One insert for the whole poll batch (chDB and ClickHouse pay a fixed cost per insert).

        The deduplication token names every partition's offset range, so a retry of this very
        insert is recognized; replays with other batch boundaries are handled by hydration."""
        token, rows = _batch_rows(parts, "steps", lambda part: part.rows)
        if not rows:
            return
        refused: list[tuple[TopicPartition, StepRow, SinkDataError]] = []
        await self._insert_rows(rows, token, self.sink.insert_steps, "step_receipts", refused)
        for tp, row, exc in refused:
            batch.parts[tp].dead.append(_dead_row(tp, row, exc))
            self._forget(row, self._builder.drop_step, row.receipt_id)

    async def _insert_outcomes(self, batch: Batch, parts: Mapping[TopicPartition, _Rows]) -> None:
        """The outcome rows of the batch, as :meth:`_insert_steps` (their own token)."""
        token, rows = _batch_rows(parts, "outcomes", lambda part: part.outcomes)
        if not rows:
            return
        refused: list[tuple[TopicPartition, OutcomeRow, SinkDataError]] = []
        await self._insert_rows(rows, token, self.sink.insert_outcomes, "step_outcomes", refused)
        for tp, row, exc in refused:
            batch.parts[tp].dead.append(_dead_outcome_row(tp, row, exc))
            self._forget(row, self._builder.drop_outcome, row.outcome_id)

    def _forget(
        self, row: StepRow | OutcomeRow, drop: Callable[[RunState, str], None], ident: str
    ) -> None:
        """A refused row is never counted: it leaves its run's state (no envelope lists it)."""
        run = self._builder.get(f"{row.namespace}/{row.workflow_id}/{row.run_id}")
        if run is not None:
            drop(run, ident)

    async def _insert_rows(
        self,
        rows: list[tuple[TopicPartition, Any]],
        token: str,
        insert: Callable[[list[Any], str], Any],
        table: str,
        refused: list[tuple[TopicPartition, Any, SinkDataError]],
    ) -> None:
        """Insert ``rows`` with ``insert``; the rows ClickHouse refuses are isolated by
        bisection (halves get derived, deterministic tokens) and recorded in ``refused``."""
        try:
            await self._retry(lambda: insert([r for _, r in rows], token))
            self.metrics.written.labels(table).inc(len(rows))
        except SinkDataError as exc:
            if len(rows) == 1:
                tp, row = rows[0]
                refused.append((tp, row, exc))
                return
            mid = len(rows) // 2
            await self._insert_rows(rows[:mid], f"{token}/a", insert, table, refused)
            await self._insert_rows(rows[mid:], f"{token}/b", insert, table, refused)

    def _envelope_headers(self, run: RunState, envelope: Envelope) -> tuple[tuple[str, bytes], ...]:
        """CloudEvents headers of a published envelope revision (the streamer's, for the same
        envelope: id ``workflow_id/run_id/revision``, subject the run key)."""
        return cloudevent_headers(
            event_id=envelope_event_id(envelope.workflow_id, envelope.run_id, envelope.revision),
            event_type=ENVELOPE_EVENT_TYPE,
            source=self._config.source,
            subject=run.key,
        )

    async def _write_due(self, batch: Batch, now: int) -> bool:
        due: list[tuple[RunState, Envelope]] = [
            (run, envelope.signed_by(self._config.builder_key))
            for run, envelope in self._builder.due(now)
        ]
        if not due:
            return False
        # Publish first, then insert: a crash in between re-publishes on replay (at least once
        # on the topic, subscribers key by run and revision); the other order could lose it.
        producer = self._runner.producer
        if self._config.publish_envelopes and producer is not None:
            futures = [
                await producer.send(
                    self._config.topics.envelopes,
                    self._envelope_value(envelope),
                    key=run.key.encode(),
                    headers=list(self._envelope_headers(run, envelope)),
                )
                for run, envelope in due
            ]
            await self._runner.produced(asyncio.gather(*futures))
        # The signature covers everything the envelope says (steps, records, accounts, metadata)
        # and Ed25519 is deterministic: the same envelope gives the same token.
        ident = "\n".join(f"{r.key}@{e.revision}:{e.signature.hex()}" for r, e in due)
        token = "envelopes:" + hashlib.sha256(ident.encode()).hexdigest()
        refused: dict[int, SinkDataError] = {}
        await self._insert_envelopes(due, list(range(len(due))), token, refused)
        self.metrics.written.labels("workflow_receipts").inc(len(due) - len(refused))
        failpoint("consumer.after_envelope_insert")
        for i, (run, envelope) in enumerate(due):
            exc = refused.get(i)
            if exc is None:
                self._builder.mark_written(run, envelope, now)
            else:
                # Never marked written: dead-lettered with the reason instead.
                batch.dead.append(self._dead_envelope(run, envelope, exc))
                self._builder.refused(run, now)
        return True

    async def _insert_envelopes(
        self,
        due: Sequence[tuple[RunState, Envelope]],
        indices: list[int],
        token: str,
        refused: dict[int, SinkDataError],
    ) -> None:
        """Insert the envelope rows of ``due[i]`` for ``i`` in ``indices``; the rows ClickHouse
        refuses are isolated by bisection (halves get derived, deterministic tokens) and
        recorded in ``refused``."""
        rows = [envelope_row(due[i][1]) for i in indices]
        try:
            await self._retry(lambda: self.sink.insert_envelopes(rows, token))
        except SinkDataError as exc:
            if len(indices) == 1:
                run, envelope = due[indices[0]]
                _log.error("envelope %s revision %s refused: %s", run.key, envelope.revision, exc)
                refused[indices[0]] = exc
                return
            mid = len(indices) // 2
            await self._insert_envelopes(due, indices[:mid], f"{token}/a", refused)
            await self._insert_envelopes(due, indices[mid:], f"{token}/b", refused)

    def _dead_envelope(self, run: RunState, envelope: Envelope, exc: SinkDataError) -> DeadLetter:
        """The dead letter of an envelope revision ClickHouse refused: the framed envelope, its
        CloudEvents headers kept as the original's, an id naming the run and revision."""
        event_id = envelope_event_id(envelope.workflow_id, envelope.run_id, envelope.revision)
        return DeadLetter.of(
            topic=self._config.topics.envelopes,
            partition=run.partition,
            offset=-1,
            key=run.key.encode(),
            value=envelope.framed(),
            headers=self._envelope_headers(run, envelope),
            error=exc,
            reason=Reason.CLICKHOUSE_DATA,
            id=f"workflow_receipts/{event_id}",
        )

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_evict >= 1.0:
            self._last_evict = now
            self._builder.evict(_now_us(), max_runs=self._config.max_open_runs)
        self.metrics.open_runs.set(len(self._builder))

    def _retry_policy(self, describe: str) -> RetryPolicy:
        return RetryPolicy(
            initial_seconds=self._config.retry_initial_seconds,
            maximum_seconds=self._config.retry_max_seconds,
            retry_on=lambda exc: isinstance(exc, SinkUnavailable),
            describe=describe,
        )

    async def _retry(self, fn: Any) -> Any:
        """``fn()`` until ClickHouse takes it; a set stop event ends the waiting (re-raised)."""
        return await retry_async(fn, policy=self._retry_policy("ClickHouse"), stop=self._stop)


def _batch_rows(
    parts: Mapping[TopicPartition, _Rows], kind: str, pick: Callable[[_Rows], Sequence[Any]]
) -> tuple[str, list[tuple[TopicPartition, Any]]]:
    """The deduplication token (``kind:<topic>:p<n>:<first>-<last>,…``) and the rows ``pick``
    takes from each partition of the batch, in partition order; no rows, no token."""
    with_rows = sorted(
        ((tp, part) for tp, part in parts.items() if pick(part)), key=lambda i: i[0].partition
    )
    if not with_rows:
        return "", []
    ranges = ",".join(f"p{tp.partition}:{part.first}-{part.last}" for tp, part in with_rows)
    token = f"{kind}:{with_rows[0][0].topic}:{ranges}"
    return token, [(tp, row) for tp, part in with_rows for row in pick(part)]


def _dead_row(tp: TopicPartition, row: StepRow, exc: Exception) -> DeadLetter:
    """The dead letter of a step row ClickHouse refused: its wire bytes (or a re-encoding)."""
    record = plain_from_row(row)
    value = frame(STEP_SCHEMA, encode_plain(STEP_SCHEMA, record))
    wire = row.wire
    return DeadLetter.of(
        topic=tp.topic,
        partition=tp.partition,
        offset=row.kafka_offset,
        key=f"{record['namespace']}/{record['workflow_id']}/{record['run_id']}".encode(),
        value=wire or value,
        headers=(),
        error=exc,
        reason=Reason.CLICKHOUSE_DATA,
    )


def _dead_outcome_row(tp: TopicPartition, row: OutcomeRow, exc: Exception) -> DeadLetter:
    """The dead letter of an outcome row ClickHouse refused: its wire bytes (or a re-encoding);
    its id is the consumed message's position, so a replay refused again gives the same id."""
    record = outcome_plain_from_row(row)
    value = row.wire or frame(STEP_OUTCOME_SCHEMA, encode_plain(STEP_OUTCOME_SCHEMA, record))
    return DeadLetter.of(
        topic=tp.topic,
        partition=tp.partition,
        offset=row.kafka_offset,
        key=f"{row.namespace}/{row.workflow_id}/{row.run_id}".encode(),
        value=value,
        headers=(),
        error=exc,
        reason=Reason.CLICKHOUSE_DATA,
    )


def _keyed_by_run(batch: Batch, message: Message, key: str) -> bool:
    """True when ``message``'s Kafka key is its run key; otherwise it is dead-lettered as a key
    mismatch (it may sit on another partition than the rest of its run)."""
    got = message.record.key
    if got is not None and bytes(got) == key.encode():
        return True
    shown = "none" if got is None else repr(bytes(got).decode("utf-8", "replace")[:200])
    batch.dead_letter(message, f"KeyMismatch: key {shown}, run key {key!r}", Reason.KEY_MISMATCH)
    return False


def _run_id(plain: Plain) -> _RunId:
    rec = plain.record
    return (rec["namespace"], rec["workflow_id"], rec["run_id"])


# A step's verification result: None (it holds), False (bad Avro signature) or a refusal of
# its Chio receipt.
_Verdict = StepVerdict


def _verify_all(
    checks: Sequence[tuple[Plain, bytes | None]], trusted: frozenset[str]
) -> list[_Verdict]:
    """Each step's Avro signature (when it has a key), then its Chio receipt (when it has one).

    One native call (``step_verdicts``): the Chio check of every step, and every Ed25519
    signature of the steps (the Avro one and the Chio receipt's) in one batch equation. Runs on
    the verify threads: the native check releases the GIL."""
    items: list[tuple[Mapping[str, Any], tuple[bytes, bytes, bytes] | Literal[False] | None]] = []
    for plain, key in checks:
        if key is None:
            items.append((plain.record, None))
            continue
        parts = signed_body(plain.body)
        items.append((plain.record, False if parts is None else (key, *parts)))
    return step_verdicts(items, trusted)


def _stored_entry(row: StepRow, codec: Codec | None = None) -> StepEntry:
    """The builder's entry for a stored step row (``codec``: Confluent-framed ones whose writer
    schema it holds)."""
    plain: Plain | None = None
    if row.wire:
        with contextlib.suppress(DecodeError):
            plain = decode_plain(row.wire, codec)
    if plain is not None:
        return StepEntry(
            row.receipt_id,
            row.verdict,
            envelope_step_body(plain),
            receipt_hash(plain.body),
            row.activity_id,
            row.attempt,
        )
    body = encode_plain(STEP_SCHEMA, plain_from_row(row))
    return StepEntry(
        row.receipt_id, row.verdict, body, receipt_hash(body), row.activity_id, row.attempt
    )


def _outcome_entry(record: Mapping[str, Any], body: bytes) -> OutcomeEntry:
    """The builder's entry for a plain outcome record and its current-schema body."""
    status = record["status"]
    return OutcomeEntry(
        str(record["outcome_id"]),
        str(record["activity_id"]),
        int(record["attempt"]),
        StepStatus(status) if status in StepStatus.__members__ else StepStatus.UNKNOWN,
        str(record["error_type"]),
        bool(record["chio_receipt"]),
        body,
    )


def _stored_outcome(row: OutcomeRow) -> OutcomeEntry:
    """The builder's entry for a stored outcome row: the stored message's current-schema body
    (as for steps), or the columns re-encoded when it has none."""
    if row.wire:
        with contextlib.suppress(DecodeError):
            plain = decode_plain(row.wire)
            if plain.schema_name == STEP_OUTCOME_SCHEMA:
                return _outcome_entry(plain.record, outcome_body(plain))
    record = outcome_plain_from_row(row)
    return _outcome_entry(record, encode_plain(STEP_OUTCOME_SCHEMA, record))


def _outcome_refusals(
    records: Sequence[Message], trusted: frozenset[str]
) -> list[ChioRefusal | None]:
    """Each outcome record's Chio check (None for a good or an unsigned record), their
    signatures verified with one batch equation as for steps (:func:`_verify_all`); runs on
    the verify threads for big batches."""
    return outcome_refusals([message.plain.record for message in records], trusted)
