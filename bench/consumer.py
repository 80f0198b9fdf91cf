"""Consumer benchmark: steps/s from Kafka through the receipt builder into ClickHouse (chDB).

Ours: ``consumers.ReceiptBuilderService`` (decode, Ed25519 verification of every step,
aggregation into envelopes, step and envelope inserts with deduplication tokens, envelope
publication, offset commits) over a topic pair filled beforehand with signed steps (5 per run)
and one completion per run; the clock runs from the first poll until every message is processed.

Floor (issue 19's baseline, same run): a raw ``AIOKafkaConsumer`` reads the same messages, and
for every poll batch clickhouse-connect inserts as many rows as the batch holds steps into
``step_receipts`` of a freshly migrated database in the same chDB engine (same table, views and
settings the builder writes; one deduplication token per insert), with no decoding or
verification in between. The rows are the builder's own rows of the same messages, read back
beforehand and handed over in columns; each insert runs on the sink's thread while the next
batch is polled (at most one in flight). Raw consume (no insert) is kept as a reference. The
three are interleaved in each repetition, the order rotating.

The per-message CPU of each stage (decode, verify, aggregate, row building, insert) is measured
in the same run, so the table shows what bounds the total.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench._common import Size, cpu_seconds, signed_batch
from bench._env import Env
from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ClickHouseSink,
    ReceiptBuilderService,
)
from chio_receipts.consumers._builder import ReceiptBuilder, StepEntry
from chio_receipts.consumers._clickhouse import STEP_SELECT
from chio_receipts.consumers._consumer import _verify_all
from chio_receipts.consumers._rows import STEP_COLUMNS, chio_columns_batch, step_row
from chio_receipts.consumers._wire import (
    decode_plain,
    decode_plain_batch,
    envelope_step_body,
)
from chio_receipts.schemas import (
    STEP_SCHEMA,
    CompletionSource,
    KafkaConnection,
    KeyPair,
    Outcome,
    RunCompletion,
    TopicNames,
    encode,
    frame,
    receipt_hash,
)
from chio_receipts.streamer import TopicsConfig, ensure_topics

__all__ = ["run"]

_log = logging.getLogger(__name__)

STEPS_PER_RUN = 5
TARGET_STEPS_PER_S = 20_000
TARGET_RATIO_VS_FLOOR = 0.3
_FLOOR_DB = "floor"
# Who is timed first in repetition r (r % 3): the floor needs the builder's rows, so the first
# repetition times the builder before it; later ones reuse them.
_ORDERS = (("raw", "builder", "floor"), ("floor", "builder", "raw"), ("builder", "floor", "raw"))


_Batch = list[tuple[Any, bytes]]


async def _fill(
    env: Env, topics: TopicsConfig, batch: _Batch, *, start: int = 0
) -> tuple[int, list[bytes]]:
    """Produce the signed steps of ``batch`` and one completion per run; returns (messages,
    step values). The batch is signed beforehand: signing thousands of receipts here would hold
    the event loop while the consumers under test wait in their groups (their heartbeats
    expire and they rebalance inside the timed window)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=env.kafka_bootstrap, acks="all", linger_ms=5, compression_type="lz4"
    )
    await producer.start()
    values: list[bytes] = []
    try:
        futures = []
        runs: dict[str, tuple[Any, int]] = {}
        for receipt, body in batch:
            value = frame(STEP_SCHEMA, body)
            values.append(value)
            futures.append(await producer.send(topics.steps, value, key=receipt.run_key.encode()))
            first, count = runs.get(receipt.run_key, (receipt, 0))
            runs[receipt.run_key] = (first, count + 1)
        for i, (run_key, (first, count)) in enumerate(runs.items()):
            event = RunCompletion(
                event_id=f"0192f0a1-0000-7000-8000-{start + i:012d}",
                namespace=first.namespace,
                workflow_id=first.workflow_id,
                run_id=first.run_id,
                workflow_type=first.workflow_type,
                task_queue=first.task_queue,
                outcome=Outcome.SUCCESS,
                started_at=first.scheduled_at,
                closed_at=first.evaluated_at + 10_000,
                expected_steps=count,
                source=CompletionSource.WATCHER,
                emitted_at=first.evaluated_at + 10_000,
            )
            futures.append(
                await producer.send(
                    topics.runs,
                    encode("dev.chio.receipts.v1.RunCompletion", event.to_avro()),
                    key=run_key.encode(),
                )
            )
        await asyncio.gather(*futures)
        return len(futures), values
    finally:
        await producer.stop()


def _kafka_consumer(env: Env, topics: TopicsConfig, config: BuilderConfig) -> AIOKafkaConsumer:
    """A plain consumer of both topics with the builder's fetch settings (see its runner)."""
    return AIOKafkaConsumer(
        topics.steps,
        topics.runs,
        bootstrap_servers=env.kafka_bootstrap,
        group_id=env.unique("bench-raw"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=max(config.max_message_bytes * 2, 1_048_576),
        fetch_max_bytes=max(config.max_message_bytes * 4, 52_428_800),
        isolation_level="read_committed",
    )


async def _drain_raw(
    consumer: AIOKafkaConsumer, total: int, max_records: int
) -> tuple[float, float]:
    """Read ``total`` messages; (seconds, CPU seconds) from the first poll."""
    seen = 0
    payload = 0
    c0, t0 = cpu_seconds(), time.perf_counter()
    deadline = time.monotonic() + 300
    while seen < total and time.monotonic() < deadline:
        data = await consumer.getmany(timeout_ms=200, max_records=max_records)
        for records in data.values():
            for msg in records:
                seen += 1
                payload += len(msg.value)  # touch every value, decode nothing
    assert seen >= total, f"raw consumer saw {seen} of {total}"
    assert payload > 0
    return time.perf_counter() - t0, cpu_seconds() - c0


class _Floor:
    """Kafka and ClickHouse alone: poll, then insert ready-made rows, one insert per batch."""

    def __init__(self, consumer: AIOKafkaConsumer, sink: ClickHouseSink, steps_topic: str) -> None:
        self.consumer = consumer
        self.sink = sink
        self.steps_topic = steps_topic
        self.types: Any = None
        self.inserts = 0

    async def prepare(self) -> None:
        """The insert context's column types, looked up once (as the builder's sink does)."""
        self.types = await self.sink.call(
            lambda c: c.create_insert_context("step_receipts", STEP_COLUMNS).column_types
        )

    def _insert(self, client: Any, columns: list[list[Any]]) -> None:
        self.inserts += 1
        client.insert(
            "step_receipts",
            columns,
            column_names=STEP_COLUMNS,
            column_types=self.types,
            column_oriented=True,
            settings={
                "insert_deduplication_token": f"floor-{time.time_ns()}-{self.inserts}",
                "deduplicate_blocks_in_dependent_materialized_views": 1,
            },
        )

    async def drain(
        self, columns: list[list[Any]], total: int, max_records: int
    ) -> tuple[float, float, int]:
        """Read ``total`` messages, inserting one row per step message from ``columns``
        (cycled); (seconds, CPU seconds, rows inserted) from the first poll."""
        seen = rows = 0
        n_rows = len(columns[0])
        pending: Awaitable[None] | None = None
        c0, t0 = cpu_seconds(), time.perf_counter()
        deadline = time.monotonic() + 300
        while seen < total and time.monotonic() < deadline:
            data = await self.consumer.getmany(timeout_ms=200, max_records=max_records)
            steps = 0
            for tp, records in data.items():
                seen += len(records)
                if tp.topic == self.steps_topic:
                    steps += len(records)
            if not steps:
                continue
            start = rows % n_rows
            if start + steps <= n_rows:
                block = [col[start : start + steps] for col in columns]
            else:
                idx = [(rows + i) % n_rows for i in range(steps)]
                block = [[col[i] for i in idx] for col in columns]
            rows += steps
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(
                self.sink.call(lambda c, b=block: self._insert(c, b))  # type: ignore[misc]
            )
        if pending is not None:
            await pending
        assert seen >= total, f"floor consumer saw {seen} of {total}"
        return time.perf_counter() - t0, cpu_seconds() - c0, rows


async def _drain_builder(service: ReceiptBuilderService, total: int) -> tuple[float, float]:
    """Process ``total`` messages; (seconds, CPU seconds) from the first poll."""
    seen = 0
    c0, t0 = cpu_seconds(), time.perf_counter()
    deadline = time.monotonic() + 600
    while seen < total and time.monotonic() < deadline:
        seen += await service.run_once()
    assert seen >= total, f"builder processed {seen} of {total}"
    return time.perf_counter() - t0, cpu_seconds() - c0


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)]


async def _builder_rows(service: ReceiptBuilderService, where: str, warm: str) -> list[Any]:
    _, rows = await service.sink.query(
        f"SELECT {STEP_SELECT} FROM step_receipts WHERE {where} "  # noqa: S608 - bound params
        "ORDER BY kafka_partition, kafka_offset",
        {"warm": warm},
    )
    return list(rows)


async def _rep(
    env: Env,
    key: KeyPair,
    batches: tuple[_Batch, _Batch],
    path: str,
    *,
    order: tuple[str, ...],
    floor_rows: list[list[Any]] | None,
) -> dict[str, Any]:
    """One repetition on fresh topics: the three consumers join and drain a warm-up run first,
    then the main batch is produced and each is timed over it in ``order`` (prefetch
    included, as in production)."""
    topics = TopicsConfig(prefix=env.unique("bench-cons") + ".", partitions=6)
    await ensure_topics(env.kafka, topics)
    config = BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=env.kafka_bootstrap),
        clickhouse=ClickHouseConfig(dsn=f"chdb://{path}", apply_roles=False),
        builder_key=KeyPair.generate("bench-builder"),
        public_keys={key.key_id: key.public_key},
        topics=TopicNames(
            steps=topics.steps,
            runs=topics.runs,
            envelopes=topics.envelopes_topic,
            dlq=topics.dlq_topic,
        ),
        group_id=env.unique("bench-builder"),
        grace_seconds=30.0,
    )
    warm_batch, main_batch = batches
    n = len(main_batch)
    max_records = config.max_batch
    warm_wf = f"order-{10**9 // STEPS_PER_RUN:08d}"
    raw = _kafka_consumer(env, topics, config)
    floor_consumer = _kafka_consumer(env, topics, config)
    service = ReceiptBuilderService(config)
    timings: dict[str, tuple[float, float]] = {}
    await raw.start()
    await floor_consumer.start()
    try:
        await service.start()
        try:
            create = f"CREATE DATABASE IF NOT EXISTS {_FLOOR_DB}"
            await service.sink.call(lambda c: c.command(create))
            floor_sink = ClickHouseSink(
                ClickHouseConfig(dsn=f"chdb://{path}?database={_FLOOR_DB}", apply_roles=False)
            )
            await floor_sink.start()
            try:
                floor = _Floor(floor_consumer, floor_sink, topics.steps)
                await floor.prepare()
                warm, _ = await _fill(env, topics, warm_batch, start=10**9)
                await _drain_raw(raw, warm, max_records)
                await _drain_builder(service, warm)
                warm_rows = await _builder_rows(service, "workflow_id = {warm:String}", warm_wf)
                await floor.drain(_columns(warm_rows), warm, max_records)
                total, values = await _fill(env, topics, main_batch)
                columns = floor_rows
                floor_written = 0
                for who in order:
                    if who == "raw":
                        timings["raw"] = await _drain_raw(raw, total, max_records)
                    elif who == "builder":
                        timings["builder"] = await _drain_builder(service, total)
                        if columns is None:
                            columns = _columns(
                                await _builder_rows(
                                    service, "workflow_id != {warm:String}", warm_wf
                                )
                            )
                    else:
                        assert columns is not None, "the floor needs the builder's rows first"
                        seconds, cpu, floor_written = await floor.drain(columns, total, max_records)
                        timings["floor"] = (seconds, cpu)
                written = await service.sink.query(
                    "SELECT count() FROM step_receipts WHERE workflow_id != {warm:String}",
                    {"warm": warm_wf},
                )
                floor_count = await floor_sink.query("SELECT count() FROM step_receipts")
            finally:
                await floor_sink.close()
        finally:
            await service.stop()
    finally:
        await raw.stop()
        await floor_consumer.stop()
    assert columns is not None
    return {
        "messages": total,
        "values": values,
        "rows": columns,
        "order": list(order),
        "ours": n / timings["builder"][0],
        "ours_cores": timings["builder"][1] / timings["builder"][0],
        "raw": n / timings["raw"][0],
        "raw_cores": timings["raw"][1] / timings["raw"][0],
        "floor": n / timings["floor"][0],
        "floor_cores": timings["floor"][1] / timings["floor"][0],
        "floor_rows_inserted": floor_written,
        "floor_rows_in_table": int(floor_count[1][0][0]),
        "floor_inserts": floor.inserts,
        "written": int(written[1][0][0]),
    }


def _batch_rate(fn: Callable[[int], Any], n: int, batch: int, reps: int) -> float:
    """Items per second of ``fn(lo)`` over ``n`` items in slices of ``batch`` (median of
    ``reps``; GC disabled during a repetition)."""
    fn(0)  # warm
    rates = []
    for _ in range(max(1, reps)):
        gc.disable()
        try:
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                fn(lo)
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        rates.append(n / elapsed if elapsed > 0 else float("inf"))
    return statistics.median(rates)


async def _stages(size: Size, key: KeyPair, values: list[bytes], dsn: str) -> dict[str, Any]:
    """Per-message cost of each stage of the builder, measured alone (same process, same run)."""
    n = min(len(values), size.codec_n)
    sample = values[:n]
    plains = [decode_plain(v) for v in sample]
    reps = size.reps

    out: dict[str, Any] = {}
    # Decode and verification are timed as the builder runs them: per poll batch (the native
    # batch decoder; every signature of the batch, Avro and Chio, in one native check).
    batch = min(n, 2_000)
    out["decode_per_s"] = _batch_rate(
        lambda lo: decode_plain_batch(sample[lo : lo + batch]), n, batch, reps
    )
    pub = key.public_key
    checks = [(p, pub) for p in plains]
    trusted = frozenset({pub.hex()})
    out["verify_per_s"] = _batch_rate(
        lambda lo: _verify_all(checks[lo : lo + batch], trusted), n, batch, reps
    )
    builder = ReceiptBuilder(grace_us=10**9, evict_after_us=10**12)

    def aggregate(lo: int) -> None:
        # As the builder runs it: the batch's Chio columns in one native call, then per step.
        part = plains[lo : lo + batch]
        for i, chio in enumerate(chio_columns_batch([p.record for p in part]), lo):
            rec = plains[i].record
            k = f"{rec['namespace']}/{rec['workflow_id']}/{rec['run_id']}"
            run = builder.open_run(k, rec["namespace"], rec["workflow_id"], rec["run_id"], 0)
            builder.add_step(
                run,
                StepEntry(
                    str(rec["receipt_id"]),
                    str(rec["verdict"]),
                    envelope_step_body(plains[i]),
                    receipt_hash(plains[i].body),
                ),
                0,
            )
            step_row(rec, sample[i], 0, i, chio)

    out["aggregate_and_row_per_s"] = _batch_rate(aggregate, n, batch, reps)
    rows = [step_row(p.record, sample[i], 0, i) for i, p in enumerate(plains)]
    sink = ClickHouseSink(ClickHouseConfig(dsn=dsn, apply_roles=False))
    await sink.start()
    try:
        rates = []
        block = rows[: min(len(rows), 5_000)]
        for r in range(max(1, reps)):
            t0 = time.perf_counter()
            await sink.insert_steps(block, f"bench-stage-{time.time_ns()}-{r}")
            rates.append(len(block) / (time.perf_counter() - t0))
        out["clickhouse_insert_rows_per_s"] = statistics.median(rates)
        out["clickhouse_insert_block_rows"] = len(block)
    finally:
        await sink.close()
    per_msg_us = {
        "decode": 1e6 / out["decode_per_s"],
        "verify": 1e6 / out["verify_per_s"],
        "aggregate_and_row": 1e6 / out["aggregate_and_row_per_s"],
        "insert": 1e6 / out["clickhouse_insert_rows_per_s"],
    }
    out["us_per_step"] = per_msg_us
    out["sum_us_per_step"] = sum(per_msg_us.values())
    out["bound_steps_per_s_one_core"] = 1e6 / out["sum_us_per_step"]
    out["bound_without_verify_steps_per_s"] = 1e6 / (out["sum_us_per_step"] - per_msg_us["verify"])
    return out


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """Builder vs the floor (raw consume + chDB insert of the same rows) and raw consumption of
    the same topics, plus the per-stage costs."""
    assert env is not None, "the consumer benchmark needs the local stack"
    key = KeyPair.generate("bench-signer")
    steps = size.consumer_n
    reps: list[dict[str, Any]] = []
    rows: list[list[Any]] | None = None
    # Signed once, before any consumer joins (the same receipts in every repetition).
    batches = (
        signed_batch(STEPS_PER_RUN, key, steps_per_run=STEPS_PER_RUN, start=10**9),
        signed_batch(steps, key, steps_per_run=STEPS_PER_RUN),
    )
    for r in range(max(1, min(size.reps, 3))):
        rep = await _rep(
            env,
            key,
            batches,
            str(env.directory(f"ch{r}")),
            order=_ORDERS[r % len(_ORDERS)],
            floor_rows=rows,
        )
        rows = rep.pop("rows")
        reps.append(rep)
    values: list[bytes] = reps[-1]["values"]
    try:
        stages: dict[str, Any] = await _stages(
            size, key, values, f"chdb://{env.directory('ch-stages')}"
        )
    except Exception as exc:  # the builder's internals moved: the headline figures still stand
        _log.exception("consumer stages not measured")
        stages = {"error": f"{type(exc).__name__}: {exc}"}
    ours = [r["ours"] for r in reps]
    raw = [r["raw"] for r in reps]
    floor = [r["floor"] for r in reps]
    ours_med, raw_med, floor_med = (statistics.median(x) for x in (ours, raw, floor))
    ratio_floor = ours_med / floor_med
    return {
        "steps": steps,
        "messages": reps[-1]["messages"],
        "steps_per_run": STEPS_PER_RUN,
        "rows_written_last_rep": reps[-1]["written"],
        "floor_rows_inserted_last_rep": reps[-1]["floor_rows_inserted"],
        "floor_rows_in_table_last_rep": reps[-1]["floor_rows_in_table"],
        "floor_inserts_last_rep": reps[-1]["floor_inserts"],
        "steps_per_s": {
            "builder_with_verification": ours_med,
            "floor_kafka_and_chdb_insert": floor_med,
            "raw_aiokafka": raw_med,
        },
        "runs": {
            "builder_with_verification": ours,
            "floor_kafka_and_chdb_insert": floor,
            "raw_aiokafka": raw,
        },
        "orders": [r["order"] for r in reps],
        "cores_busy": {
            "builder": statistics.median(r["ours_cores"] for r in reps),
            "floor_kafka_and_chdb_insert": statistics.median(r["floor_cores"] for r in reps),
            "raw_aiokafka": statistics.median(r["raw_cores"] for r in reps),
        },
        "ratio_vs_floor": ratio_floor,
        "ratio_vs_floor_per_rep": [r["ours"] / r["floor"] for r in reps],
        "ratio_vs_raw": ours_med / raw_med,
        "target_steps_per_s": TARGET_STEPS_PER_S,
        "target_ratio_vs_floor": TARGET_RATIO_VS_FLOOR,
        "target_met": {
            "steps_per_s": ours_med >= TARGET_STEPS_PER_S,
            "ratio_vs_floor": ratio_floor >= TARGET_RATIO_VS_FLOOR,
        },
        "stages": stages,
    }
