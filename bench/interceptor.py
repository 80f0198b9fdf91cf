"""Interceptor benchmarks.

1. CPU time per attempt inside the gate (``ChioActivityInterceptor.before_attempt``: grant
   lookup, argument digest, LocalSidecar decision, signing, Avro encoding, hand-off to the sink),
   activity body excluded, with three sinks: none (a no-op sink), ``ReceiptStreamer`` in
   ``queued`` mode and in ``before_execute`` mode (fsync'd spool, group commit). Yardstick
   (issue 19): one PyNaCl Ed25519 signature of the same receipt bytes (the signed bytes of a
   receipt the gate produced), thread CPU, measured in a block before every repetition of every
   sink; the targets are ratios to it (decision median at most 2x). ``sign_receipt`` of a
   ready-made receipt is kept as a reference.
2. Activities per second on the real Temporal dev server: the same workflows on a worker with
   the interceptor (each durability mode, receipts to the real Kafka broker) vs without it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import temporalio.activity
import temporalio.common
from temporalio.worker import Worker

from bench._common import Size, cpu_seconds, percentiles, sample_receipt, yardstick_sign
from bench._env import Env
from bench._workflows import BenchWorkflow, bench_step
from chio_receipts.interceptor import (
    ArgumentKey,
    ChioActivityInterceptor,
    Evaluator,
    WorkflowGrant,
)
from chio_receipts.schemas import KeyPair, RunCompletion, StepReceipt, sign_receipt, signed_body
from chio_receipts.sidecar import LocalSidecar
from chio_receipts.streamer import ReceiptStreamer

__all__ = ["GATE_TARGET_RATIO", "bench_attempt_cpu", "bench_worker_throughput", "run"]

GATE_TARGET_RATIO = 2.0
"""Issue 19: the gate's median CPU per attempt at most 2x the yardstick (one PyNaCl signature)."""

_ARG_KEY = ArgumentKey("args-bench", bytes(range(32)))
_ARGS = [{"order_id": "o-123456", "amount_cents": 12_500, "currency": "EUR", "items": [1, 2, 3]}]


class NullSink:
    """A sink that accepts everything and does nothing (the gate's own cost)."""

    async def publish_step(self, receipt: StepReceipt, body: bytes) -> None:
        """Drop the receipt."""

    async def publish_completion(self, event: RunCompletion) -> None:
        """Drop the event."""

    async def publish_envelope(self, envelope: Mapping[str, Any]) -> None:
        """Drop the envelope."""


def _info(i: int, run: int) -> temporalio.activity.Info:
    now = datetime.now(UTC)
    return temporalio.activity.Info(
        activity_id=str(i),
        activity_type="charge_card",
        attempt=1,
        current_attempt_scheduled_time=now,
        heartbeat_details=[],
        heartbeat_timeout=None,
        is_local=False,
        namespace="default",
        schedule_to_close_timeout=None,
        scheduled_time=now,
        start_to_close_timeout=timedelta(seconds=30),
        started_time=now,
        task_queue="orders",
        task_token=b"token",
        workflow_id=f"order-{run}",
        workflow_namespace="default",
        workflow_run_id=f"0f9e8d7c-6b5a-4c3d-9e2f-{run:012d}",
        workflow_type="OrderWorkflow",
        priority=temporalio.common.Priority.default,
        retry_policy=None,
    )


async def _gate_samples(
    interceptor: ChioActivityInterceptor, n: int, *, steps_per_run: int = 10
) -> tuple[list[float], list[float], float]:
    """Per-attempt wall and loop-thread CPU microseconds, and attempts/s over the block."""
    infos = [_info(i, i // steps_per_run) for i in range(n)]
    wall: list[float] = []
    cpu: list[float] = []
    perf = time.perf_counter_ns
    thread = time.thread_time_ns
    t_start = time.perf_counter()
    busy = 0.0
    for info in infos:
        w0, c0 = perf(), thread()
        await interceptor.before_attempt(info, _ARGS)
        c1, w1 = thread(), perf()
        wall.append((w1 - w0) / 1000)
        cpu.append((c1 - c0) / 1000)
        busy += (w1 - w0) / 1e9
        # Let the streamer's sender run between attempts, as it would between activities.
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - t_start
    _ = elapsed
    return wall, cpu, n / busy if busy else 0.0


def _interceptor(sidecar: Evaluator, grant: WorkflowGrant, sink: Any) -> ChioActivityInterceptor:
    return ChioActivityInterceptor(
        evaluator=sidecar,
        receipt_sink=sink,
        grant_resolver=lambda info: grant,
        identity="4242@worker-a",
        argument_key=_ARG_KEY,
        max_runs=1_000_000,
    )


async def signed_bytes_of_one_attempt(interceptor: ChioActivityInterceptor) -> bytes:
    """The bytes the gate signs for one attempt (its receipt's body without the signature):
    the message of the yardstick signature."""
    decision = await interceptor.before_attempt(_info(10**8, 10**7), _ARGS)
    parts = signed_body(decision.body)
    assert parts is not None, "the gate returned an unsigned receipt"
    return parts[0]


def _yardstick_block(message: bytes, n: int, into: list[float]) -> None:
    cpu_us, _ = yardstick_sign(message, n)
    into.append(cpu_us)


async def bench_attempt_cpu(size: Size, env: Env | None) -> dict[str, Any]:
    """CPU per attempt inside the gate, per sink, vs the yardstick signature."""
    sidecar = LocalSidecar()
    token = sidecar.mint("svc-orders", ["charge_card", "refund_card"], 3600)
    grant = WorkflowGrant(workflow_id="*", token=token)
    key = KeyPair.generate("floor")
    receipt = sample_receipt(1)
    n = size.attempts
    message = await signed_bytes_of_one_attempt(_interceptor(sidecar, grant, NullSink()))

    floor: list[float] = []
    yard: list[float] = []
    for _ in range(max(1, size.reps)):
        _yardstick_block(message, n, yard)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            sign_receipt(receipt, key)
        floor.append((time.perf_counter_ns() - t0) / 1000 / n)
    floor_us = statistics.median(floor)

    out: dict[str, Any] = {
        "floor_sign_receipt_us": floor_us,
        "attempts": n,
        "target_ratio_vs_yardstick": GATE_TARGET_RATIO,
        "sinks": {},
    }
    sinks: list[tuple[str, Any]] = [("none", None)]
    if env is not None:
        sinks += [("streamer_queued", "queued"), ("streamer_before_execute", "before_execute")]
    for name, durability in sinks:
        streamer: ReceiptStreamer | None = None
        sink: Any = NullSink()
        if durability is not None:
            assert env is not None
            streamer = await env.started_streamer("bench-gate", durability)
            sink = streamer
        try:
            gate = _interceptor(sidecar, grant, sink)
            await _gate_samples(gate, min(200, n))  # warm-up
            if streamer is not None:
                # Connected and drained: publish_step takes its steady-state path.
                assert await streamer.flush(30.0), "warm-up receipts not acknowledged"
            walls: list[float] = []
            cpus: list[float] = []
            rates: list[float] = []
            cpu_medians: list[float] = []
            totals: list[float] = []
            yard_here: list[float] = []
            for _ in range(max(1, size.reps)):
                # The yardstick right before each block: a burst of load hits both.
                _yardstick_block(message, n, yard_here)
                gate = _interceptor(sidecar, grant, sink)
                c0 = cpu_seconds()
                wall, cpu, rate = await _gate_samples(gate, n)
                if streamer is not None:
                    assert await streamer.flush(60.0), "receipts not acknowledged"
                totals.append((cpu_seconds() - c0) / n * 1e6)
                walls += wall
                cpus += cpu
                rates.append(rate)
                cpu_medians.append(statistics.median(cpu))
            yard += yard_here
            median_cpu = statistics.median(cpus)
            yard_us = statistics.median(yard_here)
            ratio = median_cpu / yard_us
            # In before_execute mode the call awaits the spool's fsync; whatever the loop runs
            # meanwhile (the sender) lands in the window, so cpu_us is an upper bound, not the
            # gate's own CPU: the target is judged on the other sinks.
            upper_bound = durability == "before_execute"
            out["sinks"][name] = {
                "cpu_us": percentiles(cpus),
                "wall_us": percentiles(walls),
                "cpu_median_us_per_rep": cpu_medians,
                "yardstick_cpu_us": yard_us,
                "yardstick_cpu_us_per_rep": yard_here,
                "ratio_cpu_vs_yardstick": ratio,
                "ratio_cpu_vs_yardstick_per_rep": [
                    c / y for c, y in zip(cpu_medians, yard_here, strict=True)
                ],
                "process_cpu_us_per_attempt_incl_sending": statistics.median(totals),
                "gate_attempts_per_s": statistics.median(rates),
                "ratio_cpu_vs_floor": median_cpu / floor_us,
                "target_ratio_vs_yardstick": None if upper_bound else GATE_TARGET_RATIO,
                "target_met": None if upper_bound else ratio <= GATE_TARGET_RATIO,
                "cpu_window_includes_background": upper_bound,
            }
        finally:
            if streamer is not None:
                await streamer.stop()
    out["yardstick"] = {
        "what": "PyNaCl SigningKey.sign of the bytes the gate signs for one receipt",
        "message_bytes": len(message),
        "cpu_us": statistics.median(yard),
        "cpu_us_per_block": yard,
        "signatures_per_block": n,
    }
    return out


async def _run_workflows(env: Env, task_queue: str, size: Size) -> float:
    """Start the workflows on ``task_queue`` and return activities/s until all finished."""
    client = env.temporal_client
    count = size.activities_per_workflow
    t0 = time.perf_counter()
    handles = [
        await client.start_workflow(
            BenchWorkflow.run,
            count,
            id=env.unique("bench-wf"),
            task_queue=task_queue,
            execution_timeout=timedelta(minutes=5),
        )
        for _ in range(size.workflows)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 300)
    elapsed = time.perf_counter() - t0
    assert sum(results) == size.workflows * count
    return size.workflows * count / elapsed


async def _throughput(env: Env, size: Size, durability: str | None) -> tuple[float, int]:
    task_queue = env.unique("bench-tq")
    interceptors: list[Any] = []
    streamer: ReceiptStreamer | None = None
    gate: ChioActivityInterceptor | None = None
    if durability is not None:
        streamer = await env.started_streamer("bench-wk", durability)
        sidecar = LocalSidecar()
        token = sidecar.mint("svc-bench", ["bench_step"], 3600)
        grant = WorkflowGrant(workflow_id="*", token=token)
        gate = _interceptor(sidecar, grant, streamer)
        interceptors.append(gate)
    try:
        async with Worker(
            env.temporal_client,
            task_queue=task_queue,
            workflows=[BenchWorkflow],
            activities=[bench_step],
            interceptors=interceptors,
            max_concurrent_activities=200,
        ):
            rate = await _run_workflows(env, task_queue, size)
        allowed = gate.stats.allowed if gate is not None else 0
        if streamer is not None:
            await streamer.flush(30.0)
        return rate, allowed
    finally:
        if streamer is not None:
            await streamer.stop()


async def bench_worker_throughput(size: Size, env: Env) -> dict[str, Any]:
    """Activities/s on the dev server with the interceptor (both durability modes) vs without."""
    modes: dict[str, str | None] = {
        "without_interceptor": None,
        "queued": "queued",
        "before_execute": "before_execute",
    }
    await _throughput(env, Size.of("small"), None)  # warm the server and the worker code
    rates: dict[str, list[float]] = {m: [] for m in modes}
    receipts: dict[str, int] = {}
    for _ in range(max(1, min(size.reps, 3))):
        for mode, durability in modes.items():  # interleaved: noise hits every mode alike
            rate, allowed = await _throughput(env, size, durability)
            rates[mode].append(rate)
            receipts[mode] = allowed
    base = statistics.median(rates["without_interceptor"])
    out: dict[str, Any] = {
        "workflows": size.workflows,
        "activities_per_workflow": size.activities_per_workflow,
        "activities_per_s": {m: statistics.median(r) for m, r in rates.items()},
        "runs_per_mode": {m: r for m, r in rates.items()},
        "receipts_allowed_last_rep": receipts,
    }
    out["ratio_vs_without"] = {
        m: statistics.median(r) / base for m, r in rates.items() if m != "without_interceptor"
    }
    out["target_ratio"] = 0.9
    out["target_met"] = {m: r >= 0.9 for m, r in out["ratio_vs_without"].items()}
    return out


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """Both interceptor benchmarks (throughput only with a stack)."""
    out: dict[str, Any] = {"attempt_cpu": await bench_attempt_cpu(size, env)}
    if env is not None:
        out["worker_throughput"] = await bench_worker_throughput(size, env)
    return out
