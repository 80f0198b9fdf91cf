"""Memory benchmarks.

1. Bytes per open run in the receipt builder (``consumers.ReceiptBuilder``), measured with
   tracemalloc over ``open_runs`` runs: an empty run, and a run holding one buffered step (the
   step's Avro body counted separately, since it is the message itself). Baseline: the raw
   Avro bytes of the buffered message.
2. RSS over a steady run: the interceptor gate feeding ``ReceiptStreamer`` (queued mode) into the
   real Kafka broker at a fixed rate, RSS sampled every second. The figure is for the duration
   the run states (``rss_seconds``), not a 10-minute run unless it says 600 s.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from typing import Any

from bench._common import Size, rss_bytes, signed_batch
from bench._env import Env
from bench.interceptor import _info, _interceptor
from chio_receipts.consumers._builder import ReceiptBuilder, StepEntry
from chio_receipts.interceptor import (
    WorkflowGrant,
)
from chio_receipts.schemas import KeyPair, receipt_hash
from chio_receipts.sidecar import LocalSidecar
from chio_receipts.streamer import ReceiptStreamer, StreamerConfig, TopicsConfig, ensure_topics

__all__ = ["bench_builder_memory", "bench_rss", "run"]


def bench_builder_memory(size: Size) -> dict[str, Any]:
    """tracemalloc bytes per open run: empty runs, and runs with one buffered step."""
    key = KeyPair.generate("bench")
    template = signed_batch(1, key)[0]
    receipt, body = template
    n = size.open_runs
    keys = [
        (f"default/order-{i:08d}/0f9e8d7c-6b5a-4c3d-9e2f-{i:012d}", f"order-{i:08d}")
        for i in range(n)
    ]
    out: dict[str, Any] = {"open_runs": n, "body_bytes": len(body)}

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        builder = ReceiptBuilder(grace_us=60_000_000, evict_after_us=300_000_000)
        for k, wf in keys:
            # Run keys, ids and names arrive as new strings decoded from each message.
            builder.open_run(k, "default", wf, k[-36:], hash(k) % 6)
        empty = tracemalloc.get_traced_memory()[0] - before
        for i, (k, _) in enumerate(keys):
            run = builder.runs[k]
            # A distinct copy of the body, as each message brings its own bytes.
            step_body = bytes(bytearray(body))
            builder.add_step(
                run,
                StepEntry(
                    f"0192f0a1-0000-7000-8000-{i:012d}",
                    "ALLOW",
                    step_body,
                    receipt_hash(step_body),
                ),
                0,
            )
        with_step = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    body_cost = len(body) + 33  # bytes object header
    state = with_step / n - body_cost
    out.update(
        {
            "bytes_per_empty_run": empty / n,
            "bytes_per_run_with_one_step": with_step / n,
            "bytes_per_run_state_excluding_body": state,
            "raw_avro_bytes_per_message": len(body),
            "ratio_state_vs_message_bytes": state / len(body),
            "target_bytes": 1200,
            "target_met": state <= 1200,
        }
    )
    _ = receipt
    return out


async def bench_rss(size: Size, env: Env, *, seconds: float | None = None) -> dict[str, Any]:
    """RSS of a steady gate -> streamer -> Kafka run at a fixed attempt rate."""
    duration = size.rss_seconds if seconds is None else seconds
    rate = size.e2e_rate
    topics = TopicsConfig(prefix=env.unique("bench-rss") + ".", partitions=6)
    await ensure_topics(env.kafka, topics)
    streamer = ReceiptStreamer(
        StreamerConfig(
            kafka=env.kafka,
            spool_dir=str(env.directory("spool")),
            topics=topics,
            durability="queued",
        )
    )
    sidecar = LocalSidecar()
    grant = WorkflowGrant(workflow_id="*", token=sidecar.mint("svc", ["charge_card"], 3600))
    samples: list[tuple[float, int]] = []
    attempts = 0
    await streamer.start()
    try:
        gate = _interceptor(sidecar, grant, streamer)
        t0 = time.monotonic()
        next_sample = t0
        i = 0
        while (now := time.monotonic()) - t0 < duration:
            if now >= next_sample:
                samples.append((now - t0, rss_bytes()))
                next_sample += 1.0
            due = int((now - t0) * rate)
            while attempts < due:
                run = i // 10
                await gate.before_attempt(_info(i, run), [{"n": i}])
                if i % 10 == 9:
                    # Runs end: free the in-process envelope as a worker would.
                    await gate.flush_workflow_receipt(
                        workflow_id=f"order-{run}",
                        run_id=f"0f9e8d7c-6b5a-4c3d-9e2f-{run:012d}",
                    )
                i += 1
                attempts += 1
            await asyncio.sleep(0.01)
        samples.append((time.monotonic() - t0, rss_bytes()))
        await streamer.flush(30.0)
    finally:
        await streamer.stop()
    warm = [s for s in samples if s[0] >= min(5.0, duration / 3)] or samples
    first, last = warm[0], warm[-1]
    span_min = max((last[0] - first[0]) / 60, 1e-9)
    return {
        "seconds": duration,
        "attempts": attempts,
        "attempts_per_s_target": rate,
        "rss_mb_first": first[1] / 2**20,
        "rss_mb_last": last[1] / 2**20,
        "rss_mb_max": max(s[1] for s in samples) / 2**20,
        "rss_growth_mb_per_min_after_warmup": (last[1] - first[1]) / 2**20 / span_min,
        "samples_mb": [round(s[1] / 2**20, 1) for s in samples],
        "ten_minute_run": duration >= 600,
    }


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """Builder memory (pure) and, with a stack, steady-run RSS."""
    out: dict[str, Any] = {"builder": bench_builder_memory(size)}
    if env is not None:
        out["rss"] = await bench_rss(size, env)
    return out
