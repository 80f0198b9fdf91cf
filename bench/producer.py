"""Producer benchmark: receipts/s through ``ReceiptStreamer`` vs raw aiokafka, real broker.

Ours: ``publish_step`` each signed receipt with its wire body to a started ``ReceiptStreamer``
with the production settings; the clock stops when ``flush`` says every record is acknowledged
(acks=all, idempotent, lz4). The body is the one signing produced (``sign_receipt``, as the gate
hands it to the sink): encoding it is the gate's work, timed in the gate's section, and the
baseline sends the same bytes encoded beforehand, so neither side is charged for it here.
Baseline: a raw ``AIOKafkaProducer`` with the same settings sending the same framed bytes, keyed
by run key, awaiting every acknowledgement. Both durability modes are measured; repetitions
alternate ours and the baseline so machine noise hits both alike.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from bench._common import Size, cpu_seconds, signed_batch
from bench._env import Env
from chio_receipts.schemas import STEP_SCHEMA, KeyPair, StepReceipt, frame
from chio_receipts.streamer import (
    Durability,
    PartitionCache,
    ReceiptStreamer,
    StreamerConfig,
    TopicsConfig,
    ensure_topics,
    step_record,
)

__all__ = ["run"]

_SPILLED: dict[str, list[int]] = {}  # receipts spilled to the spool (queue full), per run
CONCURRENCY = 64  # attempts in flight in before_execute mode (the worker's activity slots)
_Record = tuple[bytes, bytes, list[tuple[str, bytes]] | None]  # key, value, headers


async def _raw(
    env: Env,
    cfg: StreamerConfig,
    topic: str,
    values: list[_Record],
    *,
    keyed: bool,
) -> tuple[float, float]:
    producer = AIOKafkaProducer(
        bootstrap_servers=env.kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        compression_type=None if cfg.compression == "none" else cfg.compression,
        linger_ms=cfg.linger_ms,
        max_batch_size=cfg.max_batch_size,
        max_request_size=cfg.max_request_size,
        request_timeout_ms=cfg.request_timeout_ms,
    )
    await producer.start()
    try:
        parts = len(await producer.partitions_for(topic))
        cache = PartitionCache()
        # Warm-up: metadata and partition leaders known, connections open (as for ours).
        await asyncio.gather(
            *[await producer.send(topic, v, key=k, headers=h) for k, v, h in values[:60]]
        )
        c0, t0 = cpu_seconds(), time.perf_counter()
        futures = []
        for key, value, headers in values:
            partition = cache.get(key, parts) if keyed else None
            futures.append(
                await producer.send(topic, value, key=key, partition=partition, headers=headers)
            )
        await asyncio.gather(*futures)
        return len(values) / (time.perf_counter() - t0), (cpu_seconds() - c0) / len(values)
    finally:
        await producer.stop()


async def _ours(
    env: Env, cfg: StreamerConfig, receipts: list[tuple[StepReceipt, bytes]]
) -> tuple[float, float]:
    streamer = ReceiptStreamer(cfg)
    await streamer.start()
    try:
        # Connect first (the first send opens the producer), like a running worker.
        await streamer.publish_step(receipts[0][0], receipts[0][1])
        assert await streamer.flush(30.0), "warm-up receipt not acknowledged"
        c0, t0 = cpu_seconds(), time.perf_counter()
        if cfg.durability == "queued":
            for i, (receipt, body) in enumerate(receipts):
                await streamer.publish_step(receipt, body)
                if i % 100 == 99:
                    await asyncio.sleep(0)  # activities interleave with the sender
        else:
            # Each publish waits for its fsync; a worker runs many activities at once, and the
            # spool commits their appends as a group. CONCURRENCY attempts are in flight.
            for start in range(0, len(receipts), CONCURRENCY):
                await asyncio.gather(
                    *(streamer.publish_step(r, b) for r, b in receipts[start : start + CONCURRENCY])
                )
        ok = await streamer.flush(120.0)
        elapsed = time.perf_counter() - t0
        assert ok, f"{streamer.pending} receipts not acknowledged"
        spilled = streamer.metrics.registry.get_sample_value(
            "chio_streamer_spooled_total", {"reason": "spill"}
        )
        _SPILLED.setdefault(f"streamer_{cfg.durability}", []).append(int(spilled or 0))
        return len(receipts) / elapsed, (cpu_seconds() - c0) / len(receipts)
    finally:
        await streamer.stop()


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """Ours (both durability modes) vs raw aiokafka on the same bytes."""
    assert env is not None, "the producer benchmark needs the local stack"
    key = KeyPair.generate("bench")
    receipts = signed_batch(size.producer_n, key)
    topics = TopicsConfig(prefix=env.unique("bench-prod") + ".", partitions=6)
    await ensure_topics(env.kafka, topics)
    base_cfg = StreamerConfig(
        kafka=env.kafka,
        spool_dir=str(env.directory("spool")),
        topics=topics,
    )
    # The exact records ReceiptStreamer sends (value = framed body, key = run key).
    records = [
        step_record(r, b, topic=topics.steps, source=base_cfg.source, framer=_frame)
        for r, b in receipts
    ]
    # Baseline: the same key, value and CloudEvents headers, partition computed once per key.
    same: list[_Record] = [(rec.key, rec.value, list(rec.headers)) for rec in records]
    # Reference: key and value only, aiokafka's default (pure Python) partitioner.
    bare: list[_Record] = [(rec.key, rec.value, None) for rec in records]
    rates: dict[str, list[float]] = {
        "raw_aiokafka_keyed": [],
        "raw_aiokafka_default_partitioner": [],
        "streamer_queued": [],
        "streamer_before_execute": [],
    }
    cpu: dict[str, list[float]] = {k: [] for k in rates}
    _SPILLED.clear()
    for _ in range(max(1, size.reps)):
        for name in rates:
            if name.startswith("raw"):
                keyed = name == "raw_aiokafka_keyed"
                r, c = await _raw(env, base_cfg, topics.steps, same if keyed else bare, keyed=keyed)
            else:
                mode: Durability = "queued" if name == "streamer_queued" else "before_execute"
                cfg = StreamerConfig(
                    kafka=env.kafka,
                    spool_dir=str(env.directory("spool")),
                    topics=topics,
                    durability=mode,
                )
                r, c = await _ours(env, cfg, receipts)
            rates[name].append(r)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in rates.items()}
    baseline = med["raw_aiokafka_keyed"]
    return {
        "receipts": size.producer_n,
        "value_bytes": len(same[0][1]),
        "before_execute_concurrency": CONCURRENCY,
        "settings": {
            "acks": "all",
            "enable_idempotence": True,
            "compression": base_cfg.compression,
            "linger_ms": base_cfg.linger_ms,
            "max_batch_size": base_cfg.max_batch_size,
            "partitions": topics.partitions,
        },
        "receipts_per_s": med,
        "runs": rates,
        "cpu_us_per_receipt": {k: statistics.median(v) * 1e6 for k, v in cpu.items()},
        # Queued mode spills to the spool when the burst outruns Kafka past queue_size.
        "spilled_per_run": dict(_SPILLED),
        "ratio_vs_raw_keyed": {k: v / baseline for k, v in med.items() if k.startswith("streamer")},
        "ratio_vs_raw_default_partitioner": {
            k: v / med["raw_aiokafka_default_partitioner"]
            for k, v in med.items()
            if k.startswith("streamer")
        },
        "target_ratio": 0.8,
        "target_met": {k: v / baseline >= 0.8 for k, v in med.items() if k.startswith("streamer")},
    }


def _frame(name: str, body: bytes, topic: str) -> bytes:
    return frame(name, body)


_ = STEP_SCHEMA
