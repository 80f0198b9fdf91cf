"""Worker-side rows on the session stack (slow matrix): F5 oversized arguments, F6 kill -9
inside the activity body, F7 kill -9 before / after the spool write, F8 graceful shutdown."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from tests.support.faults.failpoints import spec
from tests.support.faults.pipeline import Pipeline
from tests.support.faults.scenario import finish
from tests.support.faults.workload import FaultInput
from tests.support.helpers import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.timeout(400)
async def test_f5_oversized_arguments(make_pipeline: Callable[..., Pipeline]) -> None:
    """1.5 MB activity arguments: only their digest enters the receipt, which is delivered."""
    # The SDK holds every in-flight attempt's 1.5 MB arguments: the worker's RSS rightly grows
    # from its ~90 MiB baseline by more than the default 2x.
    p = make_pipeline(rss_limit=5.0)
    await p.start()
    await p.start_runs(4, FaultInput(steps=2, payload="A" * 1_500_000))
    out = await finish(p, "F5", "1.5 MB activity arguments")
    assert len(out.snap.steps) >= 8
    log = (p.worker_dir(p.workers[0]) / "worker.log").read_text()
    assert "TooLarge" not in log
    assert "rejected.spool" not in log


async def _restart_after_exit(p: Pipeline, timeout: float = 120) -> None:
    worker = p.workers[0]
    code = await worker.wait(timeout)
    assert code == 137, f"the worker exited with {code}:\n{worker.log_tail()}"
    worker.start()


@pytest.mark.timeout(500)
async def test_f6_worker_killed_inside_the_activity_body(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """The worker dies (exit 137) while an activity body runs, after its receipt was published:
    Temporal retries it on the restarted worker; both attempts' receipts are present with
    distinct ids and the envelope lists both."""
    p = make_pipeline()
    await p.setup()
    p.add_worker().start(env=spec("activity.body", at=7))
    p.make_consumer().start()
    await p.start_runs(6, FaultInput(steps=3, start_to_close_s=3))
    await _restart_after_exit(p)
    t0 = time.monotonic()
    out = await finish(p, "F6", "worker exit 137 inside the activity body", recovery_from=t0)
    # Activities whose first attempt was receipted and then died with the worker (the one in
    # the body when the point fired among them) ran again with a new receipt. An attempt the
    # worker had received but not yet evaluated has no receipt: nothing was decided.
    by_activity: dict[tuple[str, str, str], list[str]] = {}
    for rid in out.oracle.accepted:
        e = out.oracle.proposed[rid]
        by_activity.setdefault((e.workflow_id, e.run_id, e.activity_id), []).append(rid)
    twice = {k: v for k, v in by_activity.items() if len(v) >= 2}
    assert twice, "no receipted attempt was retried after the kill"
    for (wf, run, _), ids in twice.items():
        assert len(set(ids)) == len(ids)
        env = next(e for e in out.snap.envelopes if (e.workflow_id, e.run_id) == (wf, run))
        assert set(ids) <= set(env.receipt_ids), "the envelope does not list every attempt"
    # An attempt the worker received but never evaluated is WORKER_LOST (Temporal saw it time
    # out), not a gap: every envelope ends complete.
    assert all(e.complete for e in out.snap.envelopes), out.snap.envelopes


@pytest.mark.timeout(500)
@pytest.mark.parametrize(
    ("point", "row"), [("sink.before_publish", "F7a"), ("sink.after_publish", "F7b")]
)
async def test_f7_worker_killed_around_the_spool_write(
    make_pipeline: Callable[..., Pipeline], point: str, row: str
) -> None:
    """The worker dies after the decision, before or after the spool write: a receipt whose
    write completed is replayed from the spool with the same id on restart; one that was never
    written does not exist, and the body did not run (Temporal retries the attempt)."""
    p = make_pipeline()
    await p.setup()
    p.add_worker().start(env=spec(point, at=5))
    p.make_consumer().start()
    await p.start_runs(5, FaultInput(steps=3, start_to_close_s=3))
    await _restart_after_exit(p)
    t0 = time.monotonic()
    out = await finish(p, row, f"worker exit 137 at {point}", recovery_from=t0)
    oracle_lines = (p.worker_dir(p.workers[0]) / "oracle.log").read_text().splitlines()
    proposed = [json.loads(x) for x in oracle_lines if '"e":"proposed"' in x]
    fifth = proposed[4]["id"]  # the receipt in flight when the point fired
    if point == "sink.after_publish":
        assert fifth in out.oracle.accepted
        assert fifth in out.snap.receipt_ids, "the spooled receipt was not replayed"
    else:
        assert fifth not in out.oracle.accepted
        assert fifth not in out.snap.receipt_ids, "a receipt that was never written appeared"
        lost = [a for e in out.snap.envelopes for a in e.accounts if a[2] == "WORKER_LOST"]
        assert lost, "the attempt whose receipt was never written is not accounted for"
    # No envelope is left incomplete for an explained gap.
    assert all(e.complete for e in out.snap.envelopes), out.snap.envelopes


@pytest.mark.timeout(500)
async def test_f8_graceful_worker_shutdown(make_pipeline: Callable[..., Pipeline]) -> None:
    """SIGTERM mid-stream: worker.shutdown(), then the streamer drains or persists to the spool,
    within its timeouts; a new worker on the same spool finishes the runs."""
    p = make_pipeline()
    await p.start()
    await p.start_runs(10, FaultInput(steps=4, step_sleep_s=0.5))
    await eventually(lambda: len(p.oracle().accepted) >= 12, 120)
    worker = p.workers[0]
    t0 = time.monotonic()
    code = await worker.terminate(60)
    took = time.monotonic() - t0
    status = json.loads((p.worker_dir(worker) / "status.json").read_text())
    assert code == 0, worker.log_tail()
    assert status.get("stopped"), status
    # graceful_shutdown_timeout (5 s) + the streamer's stop_timeout_s (10 s) + process exit.
    assert took < 25, f"shutdown took {took:.1f}s"
    worker.start()
    out = await finish(
        p, "F8", "SIGTERM: graceful worker shutdown, restart", note=f"stop took {took:.1f}s"
    )
    assert out.snap.counts["without FINAL"][0] == len(out.oracle.accepted)
