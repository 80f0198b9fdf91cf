"""Consumer-side rows: F9 (kill -9 between the ClickHouse insert and the offset commit) and
F16 (poison messages), on the session stack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from chio_receipts.schemas import (
    STEP_SCHEMA,
    KeyPair,
    confluent_frame,
    encode_body,
    frame,
    parsed_schema,
    schema_fingerprint,
)
from tests.support.faults.pipeline import Pipeline
from tests.support.faults.scenario import finish
from tests.support.faults.workload import FaultInput
from tests.support.helpers import eventually

pytestmark = pytest.mark.e2e

FAILPOINT = {"CHIO_FAILPOINT": "consumer.after_insert_before_commit@1=exit"}


async def _stored_steps(p: Pipeline) -> int:
    def count() -> int:
        client = p.clickhouse()
        try:
            return int(
                client.query(
                    "SELECT count() FROM step_receipts WHERE workflow_id LIKE {p:String}",
                    parameters={"p": f"{p.name}-%"},
                ).result_rows[0][0]
            )
        finally:
            client.close()

    return await asyncio.to_thread(count)


@pytest.mark.timeout(400)
async def test_f9_consumer_killed_between_insert_and_commit(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """The consumer dies (exit 137, like kill -9) right after inserting a batch, before
    committing it; the restarted consumer replays that batch, and insert deduplication (not a
    background merge) keeps I3 without FINAL."""
    p = make_pipeline()
    await p.setup()
    p.add_worker().start()
    await p.start_runs(20, FaultInput(steps=4), deny_every=4)
    consumer = p.make_consumer()
    # Produce first, so the consumer's first non-empty batch is inserted and then killed.
    await eventually(lambda: p.worker_pending() == 0 and len(p.oracle().accepted) >= 20, 120)
    fired = 0
    for _ in range(6):
        consumer.start(env=FAILPOINT)
        code = await consumer.wait(120)
        assert code == 137, f"consumer exited with {code}:\n{consumer.log_tail()}"
        # The point fires after every poll; it only tests something once a batch was inserted.
        if await _stored_steps(p) > 0:
            fired += 1
            break
    assert fired, "the failpoint never fired after an insert"
    assert await p.lag() > 0, "the killed consumer committed its batch"
    t0 = time.monotonic()
    consumer.start()
    out = await finish(p, "F9", "consumer exit 137 after insert, before commit", recovery_from=t0)
    assert out.snap.counts["without FINAL"][0] == len(out.oracle.accepted)


def _bad_values(worker: KeyPair, stranger: KeyPair) -> list[tuple[str, bytes | None, str]]:
    """(name, value, expected DLQ reason) of every kind of poison for the steps topic."""
    import tests.support.avro_strategies as avro_strategies
    from chio_receipts.schemas import sign_receipt

    _good, body = sign_receipt(avro_strategies.sample_step(key_id=worker.key_id), worker)
    framed = frame(STEP_SCHEMA, body)
    fp = schema_fingerprint(parsed_schema(STEP_SCHEMA))
    _, stranger_body = sign_receipt(avro_strategies.sample_step(), stranger)
    tampered = bytearray(framed)
    tampered[-1] ^= 0xFF
    completion_on_steps = frame(
        "dev.chio.receipts.v1.RunCompletion",
        encode_body(
            "dev.chio.receipts.v1.RunCompletion",
            {
                "event_id": "0190f3b0-0000-7000-8000-000000000001",
                "namespace": "default",
                "workflow_id": "w",
                "run_id": "r",
                "workflow_type": "W",
                "task_queue": "q",
                "outcome": "SUCCESS",
                "started_at": 1,
                "closed_at": 2,
                "parent_workflow_ids": [],
                "parent_run_id": None,
                "continued_from_run_id": None,
                "continued_as_new_run_id": None,
                "expected_steps": None,
                "source": "WATCHER",
                "emitted_at": 3,
            },
        ),
    )
    return [
        ("random bytes", bytes(range(0x7F, 0x7F + 64)), "unknown_format"),
        ("empty value", None, "malformed"),
        ("truncated avro", framed[: len(framed) // 2], "malformed"),
        ("wrong magic", b"\xc3\x02" + framed[2:], "unknown_format"),
        ("unknown fingerprint", b"\xc3\x01" + b"\x11" * 8 + body, "unknown_schema"),
        ("confluent unknown schema id", confluent_frame(987654, body), ""),
        (
            "absurd string length",
            b"\xc3\x01" + fp + b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f",
            "malformed",
        ),
        ("absurd array count", b"\xc3\x01" + fp + body[:40] + b"\xfe\xff\xff\xff\x0f", "malformed"),
        ("trailing bytes", framed + b"\x00\x01", "malformed"),
        ("bad signature", bytes(tampered), "bad_signature"),
        ("unknown signing key", frame(STEP_SCHEMA, stranger_body), "unknown_key"),
        ("wrong schema on topic", completion_on_steps, "wrong_schema"),
        ("oversized", b"\xc3\x01" + fp + b"\x00" * 300_000, "oversized"),
    ]


@pytest.mark.timeout(400)
async def test_f16_poison_messages_go_to_the_dlq(make_pipeline: Callable[..., Pipeline]) -> None:
    """Every kind of bad input, injected between good receipts, lands in the DLQ exactly once
    with its origin and reason; no good record does; the consumer neither crashes nor spins."""
    p = make_pipeline(consumer={"max_message_bytes": 200_000})
    await p.start()
    await p.start_runs(10, FaultInput(steps=3))
    stranger = KeyPair.generate("stranger")
    bad = _bad_values(p.worker_key, stranger)
    injected: dict[tuple[str, int, int], str] = {}
    values: dict[tuple[str, int, int], bytes | None] = {}
    # On the steps topic while runs execute, then two on the runs topic.
    for i, (_name, value, reason) in enumerate(bad):
        key = f"default/poison-{i}/run".encode()
        [origin] = await p.produce_raw(p.topics.steps, [(key, value)])
        injected[origin] = reason
        values[origin] = value
    [origin] = await p.produce_raw(p.topics.runs, [(b"default/poison/run", b"\x00garbage")])
    injected[origin] = ""
    [origin] = await p.produce_raw(p.topics.runs, [(b"default/poison/run", bad[-4][1])])
    injected[origin] = "wrong_schema"  # a signed step receipt on the runs topic
    await p.start_runs(5, FaultInput(steps=2))
    out = await finish(
        p,
        "F16",
        f"{len(injected)} poison messages among good receipts",
        injected=injected,
    )
    assert len(out.snap.dead_letters) == len(injected)
    for d in out.snap.dead_letters:
        if d.origin in values:
            assert (d.value or None) == values[d.origin], f"{d.origin}: original bytes not kept"
    assert p.consumer is not None
    assert p.consumer.starts == 1, "the consumer was restarted"


@pytest.mark.slow
@pytest.mark.timeout(500)
async def test_f10_consumer_killed_with_open_runs(make_pipeline: Callable[..., Pipeline]) -> None:
    """kill -9 the consumer while runs are open in its memory (steps seen, completions not yet):
    the restarted one rebuilds them from the uncommitted offsets and ClickHouse; one envelope
    per run."""
    p = make_pipeline()
    await p.start()
    await p.start_runs(12, FaultInput(steps=4, step_sleep_s=1.0), deny_every=3)
    await eventually(lambda: len(p.oracle().accepted) >= 16, 120)
    assert p.consumer is not None
    await p.consumer.kill9()
    p.consumer.start()
    t0 = time.monotonic()
    await finish(p, "F10", "consumer kill -9 with open runs", recovery_from=t0)


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize(("action", "row"), [("exit", "F12a"), ("raise", "F12b")])
async def test_f12_clickhouse_write_fails_mid_stream(
    make_pipeline: Callable[..., Pipeline], action: str, row: str
) -> None:
    """The third ClickHouse insert fails: the process dies inside it (``exit``), or the insert
    raises (``raise``, what a failed server write looks like to the builder). The batch is
    written again (same rows, deduplicated); I3 holds without FINAL."""
    p = make_pipeline()
    await p.setup()
    p.add_worker().start()
    consumer = p.make_consumer()
    consumer.start(env={"CHIO_FAILPOINT": f"clickhouse.insert@3={action}"})
    await p.consumer_ready()
    await p.start_runs(12, FaultInput(steps=4, step_sleep_s=0.3))
    await eventually(lambda: not consumer.alive() or len(p.oracle().accepted) >= 48, 180)
    restarted = False
    if not consumer.alive():
        code = consumer.returncode()
        assert code in (137, 3), consumer.log_tail()
        consumer.start()
        restarted = True
    t0 = time.monotonic()
    out = await finish(
        p,
        row,
        f"ClickHouse insert #3 fails ({action})",
        recovery_from=t0,
        note="consumer exited and was restarted" if restarted else "retried in process",
        assert_held=False,
    )
    p.expected_exits.add(consumer.name)
    from tests.support.faults.invariants import assert_invariants

    results = {k: [d for d in v if "consumer exited" not in d] for k, v in out.results.items()}
    assert_invariants(results, context=row)
    assert out.snap.counts["without FINAL"][0] == len(out.oracle.accepted)
    if action == "raise":
        assert not restarted, (
            "a failed insert crashed the builder instead of being retried:\n"
            + consumer.log_tail(20)
        )


@pytest.mark.slow
@pytest.mark.timeout(500)
async def test_f20_duplicate_and_early_completions(make_pipeline: Callable[..., Pipeline]) -> None:
    """A completion arrives before the run's steps (as soon as it starts), the watcher's own
    arrives later, and every completion is sent once more at the end: one envelope per run,
    which waits for the expected steps (or is marked incomplete, then revised)."""
    from chio_receipts.schemas import CompletionSource, Outcome, RunCompletion
    from chio_receipts.streamer._history import completion_event_id

    p = make_pipeline(grace_seconds=5.0)
    await p.start()
    handles = await p.start_runs(8, FaultInput(steps=4, step_sleep_s=1.0))
    streamer = p._watcher_streamer
    assert streamer is not None
    early = []
    for h in handles:
        run_id = h.result_run_id or h.first_execution_run_id or ""
        now = time.time_ns() // 1000
        event = RunCompletion(
            event_id=completion_event_id("default", h.id, run_id),
            namespace="default",
            workflow_id=h.id,
            run_id=run_id,
            workflow_type="FaultWorkflow",
            task_queue=p.task_queue,
            outcome=Outcome.SUCCESS,
            started_at=now,
            closed_at=now,
            expected_steps=4,
            source=CompletionSource.FINALIZE,
            emitted_at=now,
        )
        await streamer.publish_completion(event)
        early.append(event)
    await p.wait_runs(180)
    await p.quiesce(120)
    for event in early:  # duplicates, long after the runs closed
        await streamer.publish_completion(event)
    t0 = time.monotonic()
    out = await finish(p, "F20", "early + duplicate completion events", recovery_from=t0)
    assert len(out.snap.envelopes) == 8
    assert all(e.complete for e in out.snap.envelopes), out.snap.envelopes


@pytest.mark.timeout(400)
async def test_f27_message_key_differs_from_its_run_key(
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """A well-formed, signed step and a completion whose Kafka keys name another run, injected
    while runs execute: both are dead-lettered as key mismatches exactly once, and every run's
    envelope is as if they had never been produced."""
    import tests.support.avro_strategies as avro_strategies
    from chio_receipts.schemas import RunCompletion, encode, sign_receipt
    from tests.support.consumer_factory import completion

    p = make_pipeline()
    await p.start()
    await p.start_runs(6, FaultInput(steps=3))
    step, body = sign_receipt(
        avro_strategies.sample_step(key_id=p.worker_key.key_id, workflow_id=f"{p.name}-f27"),
        p.worker_key,
    )
    injected: dict[tuple[str, int, int], str] = {}
    [origin] = await p.produce_raw(
        p.topics.steps, [(b"default/f27-elsewhere/run", frame(STEP_SCHEMA, body))]
    )
    injected[origin] = "key_mismatch"
    done: RunCompletion = completion(f"{p.name}-f27", step.run_id, expected=1)
    [origin] = await p.produce_raw(
        p.topics.runs,
        [
            (
                b"default/f27-elsewhere/run",
                encode("dev.chio.receipts.v1.RunCompletion", done.to_avro()),
            )
        ],
    )
    injected[origin] = "key_mismatch"
    await p.start_runs(3, FaultInput(steps=2))
    out = await finish(p, "F27", "message key differs from its run key", injected=injected)
    assert len(out.snap.dead_letters) == 2
    assert all(e.complete for e in out.snap.envelopes)
    assert not any(e.workflow_id == f"{p.name}-f27" for e in out.snap.envelopes)
