"""Consumer benchmark: steps/s from Kafka through the receipt builder into ClickHouse (chDB).

Ours: ``consumers.ReceiptBuilderService`` (decode, Ed25519 verification of every step,
aggregation into envelopes, step and envelope inserts with deduplication tokens, envelope
publication, offset commits) over a topic pair filled beforehand with signed steps (5 per run)
and one completion per run; the clock runs from the first poll until every message is processed.
Baseline: a raw ``AIOKafkaConsumer`` reading the same topics, no decoding, no verification.
The per-message CPU of each stage (decode, verify, aggregate, row building, insert) is measured
in the same run, so the table shows what bounds the total.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from bench._common import Size, cpu_seconds, median_rate, signed_batch
from bench._env import Env
from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ClickHouseSink,
    ReceiptBuilderService,
)
from chio_receipts.consumers._builder import ReceiptBuilder, StepEntry
from chio_receipts.consumers._rows import step_row
from chio_receipts.consumers._wire import decode_plain, envelope_step_body
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
    verify_body,
)
from chio_receipts.streamer import TopicsConfig, ensure_topics

__all__ = ["run"]

STEPS_PER_RUN = 5


async def _fill(
    env: Env, topics: TopicsConfig, key: KeyPair, n: int, *, start: int = 0
) -> tuple[int, list[bytes]]:
    """Produce ``n`` steps and one completion per run; returns (messages, step values)."""
    batch = signed_batch(n, key, steps_per_run=STEPS_PER_RUN, start=start)
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


async def _drain_raw(consumer: AIOKafkaConsumer, total: int) -> tuple[float, float]:
    """Read ``total`` messages; (seconds, CPU seconds) from the first poll."""
    seen = 0
    payload = 0
    c0, t0 = cpu_seconds(), time.perf_counter()
    deadline = time.monotonic() + 300
    while seen < total and time.monotonic() < deadline:
        data = await consumer.getmany(timeout_ms=200, max_records=5_000)
        for records in data.values():
            for msg in records:
                seen += 1
                payload += len(msg.value)  # touch every value, decode nothing
    assert seen >= total, f"raw consumer saw {seen} of {total}"
    assert payload > 0
    return time.perf_counter() - t0, cpu_seconds() - c0


async def _drain_builder(service: ReceiptBuilderService, total: int) -> tuple[float, float]:
    """Process ``total`` messages; (seconds, CPU seconds) from the first poll."""
    seen = 0
    c0, t0 = cpu_seconds(), time.perf_counter()
    deadline = time.monotonic() + 600
    while seen < total and time.monotonic() < deadline:
        seen += await service.run_once()
    assert seen >= total, f"builder processed {seen} of {total}"
    return time.perf_counter() - t0, cpu_seconds() - c0


async def _rep(env: Env, key: KeyPair, n: int, dsn: str, *, raw_first: bool) -> dict[str, Any]:
    """One repetition on fresh topics: both consumers join and drain a warm-up run first, then
    the main batch is produced and each consumer is timed over it (prefetch included, as in
    production)."""
    topics = TopicsConfig(prefix=env.unique("bench-cons") + ".", partitions=6)
    await ensure_topics(env.kafka, topics)
    raw = AIOKafkaConsumer(
        topics.steps,
        topics.runs,
        bootstrap_servers=env.kafka_bootstrap,
        group_id=env.unique("bench-raw"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=52_428_800,
        isolation_level="read_committed",
    )
    config = BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=env.kafka_bootstrap),
        clickhouse=ClickHouseConfig(dsn=dsn, apply_roles=False),
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
    service = ReceiptBuilderService(config)
    await raw.start()
    try:
        await service.start()
        try:
            warm, _ = await _fill(env, topics, key, STEPS_PER_RUN, start=10**9)
            await _drain_raw(raw, warm)
            await _drain_builder(service, warm)
            total, values = await _fill(env, topics, key, n)
            if raw_first:
                raw_s, raw_cpu = await _drain_raw(raw, total)
                ours_s, ours_cpu = await _drain_builder(service, total)
            else:
                ours_s, ours_cpu = await _drain_builder(service, total)
                raw_s, raw_cpu = await _drain_raw(raw, total)
            written = await service.sink.query(
                "SELECT count() FROM step_receipts WHERE workflow_id != {warm:String}",
                {"warm": f"order-{10**9 // STEPS_PER_RUN:08d}"},
            )
        finally:
            await service.stop()
    finally:
        await raw.stop()
    return {
        "messages": total,
        "values": values,
        "ours": n / ours_s,
        "ours_cores": ours_cpu / ours_s,
        "raw": n / raw_s,
        "raw_cores": raw_cpu / raw_s,
        "written": int(written[1][0][0]),
    }


async def _stages(size: Size, key: KeyPair, values: list[bytes], dsn: str) -> dict[str, Any]:
    """Per-message cost of each stage of the builder, measured alone (same process, same run)."""
    n = min(len(values), size.codec_n)
    sample = values[:n]
    plains = [decode_plain(v) for v in sample]
    reps = size.reps
    it = iter(range(1 << 62))

    def one(fn: Any) -> Any:
        def call() -> None:
            fn(next(it) % n)

        return call

    out: dict[str, Any] = {}
    out["decode_per_s"] = median_rate(one(lambda i: decode_plain(sample[i])), n, reps)
    pub = key.public_key
    out["verify_per_s"] = median_rate(one(lambda i: verify_body(plains[i].body, pub)), n, reps)
    builder = ReceiptBuilder(grace_us=10**9, evict_after_us=10**12)

    def aggregate(i: int) -> None:
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
        step_row(rec, sample[i], 0, i)

    out["aggregate_and_row_per_s"] = median_rate(one(aggregate), n, reps)
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
    """Builder vs raw consumption of the same topics, plus the per-stage costs."""
    assert env is not None, "the consumer benchmark needs the local stack"
    key = KeyPair.generate("bench-signer")
    steps = size.consumer_n
    reps = [
        await _rep(env, key, steps, f"chdb://{env.directory(f'ch{r}')}", raw_first=r % 2 == 0)
        for r in range(max(1, min(size.reps, 3)))
    ]
    values: list[bytes] = reps[-1]["values"]
    stages = await _stages(size, key, values, f"chdb://{env.directory('ch-stages')}")
    ours = [r["ours"] for r in reps]
    raw = [r["raw"] for r in reps]
    ours_med, raw_med = statistics.median(ours), statistics.median(raw)
    return {
        "steps": steps,
        "messages": reps[-1]["messages"],
        "steps_per_run": STEPS_PER_RUN,
        "rows_written_last_rep": reps[-1]["written"],
        "steps_per_s": {"builder_with_verification": ours_med, "raw_aiokafka": raw_med},
        "runs": {"builder_with_verification": ours, "raw_aiokafka": raw},
        "cores_busy": {
            "builder": statistics.median(r["ours_cores"] for r in reps),
            "raw_aiokafka": statistics.median(r["raw_cores"] for r in reps),
        },
        "ratio_vs_raw": ours_med / raw_med,
        "target_steps_per_s": 15_000,
        "target_ratio": 0.5,
        "target_met": {"steps_per_s": ours_med >= 15_000, "ratio": ours_med / raw_med >= 0.5},
        "stages": stages,
    }
