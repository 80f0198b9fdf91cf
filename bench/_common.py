"""Shared pieces of the benchmarks: sizes, timing statistics, machine description, sample data.

Every benchmark measures our path and a baseline in the same process and the same run, and
reports both absolute figures and their ratio, so a reader can judge numbers taken on a noisy
shared machine. Rates are medians over ``reps`` repetitions.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import nacl.signing

from chio_receipts.schemas import KeyPair, StepReceipt, Verdict, sign_receipt
from tests.support.chio_steps import with_chio_receipt

__all__ = [
    "Size",
    "cpu_seconds",
    "machine",
    "median_rate",
    "percentiles",
    "rate_block",
    "rss_bytes",
    "sample_receipt",
    "signed_batch",
    "yardstick_sign",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Size:
    """How big each benchmark runs: ``small`` (smoke test, seconds) or ``full`` (make bench).

    ``e2e_rate`` is the steady rate of the memory section's RSS run; ``e2e_target_rate`` the
    attempts/s of the end-to-end latency section (issue 19's target: 2,000/s)."""

    name: str
    reps: int
    codec_n: int
    crypto_n: int
    attempts: int
    workflows: int
    activities_per_workflow: int
    producer_n: int
    consumer_n: int
    open_runs: int
    e2e_seconds: float
    e2e_rate: int
    e2e_target_rate: int
    rss_seconds: float
    decisions: int

    @classmethod
    def of(cls, name: str) -> Size:
        """The named size."""
        if name == "small":
            return cls(
                name="small",
                reps=1,
                codec_n=300,
                crypto_n=100,
                attempts=300,
                workflows=4,
                activities_per_workflow=5,
                producer_n=500,
                consumer_n=600,
                open_runs=2_000,
                e2e_seconds=2.0,
                e2e_rate=100,
                e2e_target_rate=100,
                rss_seconds=2.0,
                decisions=40,
            )
        if name == "full":
            return cls(
                name="full",
                reps=5,
                codec_n=20_000,
                crypto_n=5_000,
                attempts=5_000,
                workflows=40,
                activities_per_workflow=25,
                producer_n=30_000,
                consumer_n=30_000,
                open_runs=100_000,
                e2e_seconds=20.0,
                e2e_rate=500,
                e2e_target_rate=2_000,
                rss_seconds=600.0,
                decisions=2_000,
            )
        raise ValueError(f"unknown size {name!r} (small | full)")


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 / p95 / p99 / max of ``samples`` (same unit as the samples)."""
    if not samples:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1], "n": len(ordered)}


def cpu_seconds() -> float:
    """CPU time of this process (all threads), seconds."""
    return time.process_time()


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def rate_block(fn: Callable[[], Any], n: int) -> float:
    """Calls per second of ``fn`` over ``n`` calls (GC disabled during the block)."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - t0
    finally:
        gc.enable()
    return n / elapsed if elapsed > 0 else float("inf")


def median_rate(fn: Callable[[], Any], n: int, reps: int) -> float:
    """Median over ``reps`` repetitions of :func:`rate_block`."""
    fn()  # warm caches (schema parsing, key objects)
    return statistics.median(rate_block(fn, n) for _ in range(max(1, reps)))


_YARDSTICK_KEY = nacl.signing.SigningKey(bytes(range(32)))


def yardstick_sign(message: bytes, n: int) -> tuple[float, float]:
    """One block of the gate's yardstick: (thread CPU µs, wall µs) per PyNaCl Ed25519 signature
    of ``message``, mean over ``n`` signatures (GC disabled).

    PyNaCl's ``SigningKey.sign`` is called directly, never the project's ``KeyPair`` or a native
    signer, so the yardstick does not move when our code does; only the machine moves it."""
    sign = _YARDSTICK_KEY.sign
    sign(message)  # warm
    gc.disable()
    try:
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(n):
            sign(message)
        w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
    finally:
        gc.enable()
    return (c1 - c0) / 1000 / n, (w1 - w0) / 1000 / n


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """Description of the machine and the library versions the numbers were taken with."""
    load: list[float] = []
    with contextlib.suppress(OSError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "cpu_model": _cpu_model(),
        "cpus_visible": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": _ram_bytes(),
        "loadavg_at_start": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "libraries": {
            d: _version(d)
            for d in (
                "fastavro",
                "aiokafka",
                "temporalio",
                "PyNaCl",
                "cryptography",
                "cramjam",
                "clickhouse-connect",
                "chdb",
            )
        },
    }


def sample_receipt(i: int = 0, *, run: int = 0, steps_per_run: int = 5) -> StepReceipt:
    """A realistic unsigned step receipt (field sizes as the interceptor makes them)."""
    base = 1_763_880_000_000_000 + i * 1_000
    run_id = f"0f9e8d7c-6b5a-4c3d-9e2f-{run:012d}"
    return StepReceipt(
        receipt_id=f"0192f0a1-{i // 65536 % 65536:04x}-7{i % 4096:03x}-8000-{i:012x}",
        namespace="default",
        workflow_id=f"order-{run:08d}",
        run_id=run_id,
        workflow_type="OrderWorkflow",
        task_queue="orders",
        activity_id=str(i % steps_per_run + 1),
        activity_type="charge_card",
        attempt=1,
        is_local=False,
        tool_server="payments",
        tool="charge_card",
        action="invoke",
        resource="payments/charge_card",
        subject="svc-orders",
        capability_id="cap-0192f0a1-7b3c-7d4e-8f50-61728394a5b6",
        capability_chain=("cap-0192f0a1-0000-7d4e-8f50-61728394a5b6",),
        scope=("charge_card", "refund_card"),
        verdict=Verdict.ALLOW if i % 10 else Verdict.DENY,
        reason="tool 'charge_card' allowed by capability cap-0192f0a1-7b3c-7d4e-8f50-61728394a5b6",
        argument_digest="9f" * 32,
        argument_key_id="args-2026-11",
        scheduled_at=base,
        started_at=base + 150,
        evaluated_at=base + 190,
        latency_us=38,
        worker_identity="4242@worker-a",
        prev_hash=bytes(32),
    )


SAMPLE_PARAMETERS: dict[str, Any] = {"args": [{"order": "o-42", "amount_cents": 1250}]}
"""The call parameters a benchmark step's Chio receipt signs (a small activity argument)."""


def signed_batch(
    n: int, key: KeyPair, *, steps_per_run: int = 5, start: int = 0
) -> list[tuple[StepReceipt, bytes]]:
    """``n`` signed receipts with their wire bodies, ``steps_per_run`` per run; receipt ``i``
    for ``i`` in ``start .. start + n - 1`` (distinct ids and runs for distinct ranges).

    Each carries a Chio receipt signed by the same key, as our sidecar's steps do (schema v2),
    so consumer benchmarks pay for both checks."""
    return [
        sign_receipt(
            with_chio_receipt(
                sample_receipt(i, run=i // steps_per_run, steps_per_run=steps_per_run),
                key,
                parameters=SAMPLE_PARAMETERS,
            ),
            key,
        )
        for i in range(start, start + n)
    ]
