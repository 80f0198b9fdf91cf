"""F0 (baseline, no fault) and F21 (tampering) on the same pipeline run."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from harness.scenario import finish
from harness.workload import FaultInput

pytestmark = pytest.mark.e2e

QUICK_RUNS = int(os.environ.get("CHIO_F0_RUNS", "50"))


@pytest.mark.timeout(400)
async def test_f0_baseline_quick(make_pipeline: Callable[..., Any]) -> None:
    p = make_pipeline()
    await p.start()
    await p.start_runs(QUICK_RUNS, FaultInput(steps=4, payload="x" * 64), deny_every=5)
    out = await finish(p, "F0", f"none ({QUICK_RUNS} runs x 4 steps)")
    # 4 steps per run, the denied one included: every attempt has exactly one receipt.
    assert len(out.oracle.accepted) >= QUICK_RUNS * 4
    assert len(out.snap.envelopes) == QUICK_RUNS
