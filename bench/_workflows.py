"""Workflow and activity of the interceptor throughput benchmark (importable by the sandbox)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import activity, workflow

__all__ = ["BenchWorkflow", "bench_step"]


@activity.defn(name="bench_step")
async def bench_step(n: int) -> int:
    """A trivial activity body: the benchmark measures the gate, not the work."""
    return n + 1


@workflow.defn(name="BenchWorkflow", sandboxed=False)
class BenchWorkflow:
    """Runs ``count`` activities concurrently and returns how many succeeded."""

    @workflow.run
    async def run(self, count: int) -> int:
        """Fan out ``count`` activities."""
        results = await asyncio.gather(
            *(
                workflow.execute_activity(
                    bench_step, i, start_to_close_timeout=timedelta(seconds=30)
                )
                for i in range(count)
            )
        )
        return len(results)
