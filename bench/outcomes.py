"""What outcome records add to each attempt, against the decision-only gate in the same run.

1. Per attempt, in process: the gate (``before_attempt``) then the body's end
   (``after_attempt``: classification, the result's keyed digest, the record, the hand-off to
   the queue), with outcome records on and off, interleaved. Two figures each: the activity's
   path (loop-thread CPU and wall time of the two calls: what an activity waits for) and the
   process CPU per attempt including the background task that signs (``LocalSidecar``, one
   Ed25519 signature of a Chio ``trace_observation`` receipt) and publishes the records. Sinks:
   a no-op sink, and with the stack the ``ReceiptStreamer`` (``queued``) into the real broker.
2. With the stack: activities/s on the real Temporal dev server, the same workflows on a worker
   with the gate and outcome records vs the gate alone (receipts and records to Kafka).

Yardstick (issue 19): one PyNaCl Ed25519 signature of the bytes the gate signs for a receipt,
thread CPU, a block before every repetition. The target with the outcome record, at most 2.6x
the yardstick, is judged on the whole process's CPU per attempt with the no-op sink: the
record's signature is made by a background task, so the activity's path alone would leave it
out. The path's ratio is reported beside it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from temporalio.worker import Worker

from bench._common import Size, cpu_seconds, percentiles, yardstick_sign
from bench._env import Env
from bench._workflows import BenchWorkflow, bench_step
from bench.interceptor import (
    _ARG_KEY,
    _ARGS,
    NullSink,
    _info,
    _run_workflows,
    signed_bytes_of_one_attempt,
)
from chio_receipts.interceptor import ChioActivityInterceptor, WorkflowGrant
from chio_receipts.schemas import StepOutcome
from chio_receipts.sidecar import LocalSidecar
from chio_receipts.streamer import ReceiptStreamer

__all__ = ["OUTCOME_TARGET_RATIO", "bench_outcome_cost", "bench_outcome_throughput", "run"]

OUTCOME_TARGET_RATIO = 2.6
"""Issue 19: CPU per attempt with the outcome record at most 2.6x the yardstick signature."""

_RESULT = {"order_id": "o-123456", "status": "charged", "authorization": "A-998877"}
_VARIANTS = ("decision_only", "with_outcomes")


class NullOutcomeSink(NullSink):
    """A no-op sink that takes outcome records too."""

    async def publish_outcome(self, outcome: StepOutcome) -> None:
        """Drop the record."""


def _gate(sidecar: LocalSidecar, grant: WorkflowGrant, sink: Any, outcomes: bool) -> Any:
    return ChioActivityInterceptor(
        evaluator=sidecar,
        receipt_sink=sink,
        grant_resolver=lambda info: grant,
        identity="4242@worker-a",
        argument_key=_ARG_KEY,
        max_runs=1_000_000,
        record_outcomes=outcomes,
    )


async def _block(
    gate: ChioActivityInterceptor, n: int
) -> tuple[list[float], list[float], list[float], float]:
    """Per-attempt path wall and loop-thread CPU µs, loop-thread CPU µs of the body's end alone
    (``after_attempt``), and process CPU µs per attempt including the background work (outcome
    records signed and accepted by the sink)."""
    infos = [_info(i, i // 10) for i in range(n)]
    perf, thread = time.perf_counter_ns, time.thread_time_ns
    wall: list[float] = []
    cpu: list[float] = []
    end: list[float] = []
    c0 = cpu_seconds()
    for info in infos:
        w0, t0 = perf(), thread()
        decision = await gate.before_attempt(info, _ARGS, ("", ""))
        te = thread()
        gate.after_attempt(info, decision, body_started_ns=perf(), result=_RESULT)
        t1, w1 = thread(), perf()
        wall.append((w1 - w0) / 1000)
        cpu.append((t1 - t0) / 1000)
        end.append((t1 - te) / 1000)
        await asyncio.sleep(0)  # let the background task run between attempts
    assert await gate.flush_outcomes(60.0), "outcome records not accepted"
    total = (cpu_seconds() - c0) / n * 1e6
    return wall, cpu, end, total


async def bench_outcome_cost(size: Size, env: Env | None) -> dict[str, Any]:
    """Per-attempt cost with and without outcome records, per sink."""
    sidecar = LocalSidecar()
    token = sidecar.mint("svc-orders", ["charge_card"], 3600)
    grant = WorkflowGrant(workflow_id="*", token=token)
    n = size.attempts
    message = await signed_bytes_of_one_attempt(_gate(sidecar, grant, NullOutcomeSink(), False))
    out: dict[str, Any] = {
        "attempts": n,
        "yardstick_message_bytes": len(message),
        "target_ratio_vs_yardstick": OUTCOME_TARGET_RATIO,
        "target_judged_on": "process_cpu_us_per_attempt, sink none, with_outcomes",
        "sinks": {},
    }
    sinks: list[tuple[str, str | None]] = [("none", None)]
    if env is not None:
        sinks.append(("streamer_queued", "queued"))
    for name, durability in sinks:
        streamer: ReceiptStreamer | None = None
        sink: Any = NullOutcomeSink()
        if durability is not None:
            assert env is not None
            streamer = await env.started_streamer("bench-out", durability)
            sink = streamer
        try:
            for variant in _VARIANTS:  # warm-up
                await _block(_gate(sidecar, grant, sink, variant != "decision_only"), min(200, n))
            if streamer is not None:
                assert await streamer.flush(30.0), "warm-up records not acknowledged"
            cpus: dict[str, list[float]] = {v: [] for v in _VARIANTS}
            walls: dict[str, list[float]] = {v: [] for v in _VARIANTS}
            totals: dict[str, list[float]] = {v: [] for v in _VARIANTS}
            ends: dict[str, list[float]] = {v: [] for v in _VARIANTS}
            stats: dict[str, dict[str, int]] = {}
            yard: list[float] = []
            for _ in range(max(1, size.reps)):
                yard.append(yardstick_sign(message, n)[0])
                for variant in _VARIANTS:  # interleaved: noise hits both alike
                    gate = _gate(sidecar, grant, sink, variant != "decision_only")
                    wall, cpu, end, total = await _block(gate, n)
                    if streamer is not None:
                        assert await streamer.flush(60.0), "records not acknowledged"
                    walls[variant] += wall
                    cpus[variant] += cpu
                    ends[variant] += end
                    totals[variant].append(total)
                    stats[variant] = {
                        "published": gate.stats.outcomes_published,
                        "unsigned": gate.stats.outcomes_unsigned,
                        "dropped": gate.stats.outcomes_dropped,
                    }
            path = {v: statistics.median(cpus[v]) for v in _VARIANTS}
            process = {v: statistics.median(totals[v]) for v in _VARIANTS}
            yard_us = statistics.median(yard)
            judged = name == "none"
            with_ratio = process["with_outcomes"] / yard_us
            out["sinks"][name] = {
                "yardstick_cpu_us": yard_us,
                "yardstick_cpu_us_per_rep": yard,
                "ratio_path_cpu_vs_yardstick": {v: path[v] / yard_us for v in _VARIANTS},
                "ratio_process_cpu_vs_yardstick": {v: process[v] / yard_us for v in _VARIANTS},
                "target_met": with_ratio <= OUTCOME_TARGET_RATIO if judged else None,
                "path_cpu_us": {v: percentiles(cpus[v]) for v in _VARIANTS},
                "path_wall_us": {v: percentiles(walls[v]) for v in _VARIANTS},
                "body_end_cpu_us": {v: percentiles(ends[v]) for v in _VARIANTS},
                "process_cpu_us_per_attempt": process,
                "added_path_cpu_us": path["with_outcomes"] - path["decision_only"],
                "added_process_cpu_us": process["with_outcomes"] - process["decision_only"],
                "ratio_path_cpu": path["with_outcomes"] / path["decision_only"],
                "ratio_process_cpu": process["with_outcomes"] / process["decision_only"],
                "outcome_records_last_rep": stats,
            }
        finally:
            if streamer is not None:
                await streamer.stop()
    return out


async def _throughput(env: Env, size: Size, outcomes: bool) -> tuple[float, int]:
    streamer = await env.started_streamer("bench-outwk", "queued")
    sidecar = LocalSidecar()
    token = sidecar.mint("svc-bench", ["bench_step"], 3600)
    gate = _gate(sidecar, WorkflowGrant(workflow_id="*", token=token), streamer, outcomes)
    task_queue = env.unique("bench-out-tq")
    try:
        async with Worker(
            env.temporal_client,
            task_queue=task_queue,
            workflows=[BenchWorkflow],
            activities=[bench_step],
            interceptors=[gate],
            max_concurrent_activities=200,
        ):
            rate = await _run_workflows(env, task_queue, size)
        await gate.aclose()
        await streamer.flush(30.0)
        return rate, gate.stats.outcomes_published
    finally:
        await streamer.stop()


async def bench_outcome_throughput(size: Size, env: Env) -> dict[str, Any]:
    """Activities/s on the dev server: gate with outcome records vs the gate alone."""
    await _throughput(env, Size.of("small"), True)  # warm the server and the worker code
    rates: dict[str, list[float]] = {v: [] for v in _VARIANTS}
    published: dict[str, int] = {}
    for _ in range(max(1, min(size.reps, 3))):
        for variant in _VARIANTS:
            rate, count = await _throughput(env, size, variant != "decision_only")
            rates[variant].append(rate)
            published[variant] = count
    base = statistics.median(rates["decision_only"])
    return {
        "workflows": size.workflows,
        "activities_per_workflow": size.activities_per_workflow,
        "activities_per_s": {v: statistics.median(r) for v, r in rates.items()},
        "runs_per_variant": rates,
        "outcome_records_last_rep": published,
        "ratio_with_vs_decision_only": statistics.median(rates["with_outcomes"]) / base,
    }


async def run(size: Size, env: Env | None) -> dict[str, Any]:
    """Both outcome benchmarks (throughput only with a stack)."""
    out: dict[str, Any] = {"attempt_cost": await bench_outcome_cost(size, env)}
    if env is not None:
        out["worker_throughput"] = await bench_outcome_throughput(size, env)
    return out
