"""Pure parts of the streamer: partitioning, record building, history folding, checkpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowExecutionStatus

import chio_receipts.schemas as schemas
import chio_receipts.streamer as streamer
from chio_receipts.streamer._history import completion_event_id, outcome_of
from tests.support.avro_strategies import sample_run, sample_step
from tests.support.chio_steps import kernel_receipt_body, with_chio_receipt

pytestmark = pytest.mark.unit


def test_public_surface_matches_all() -> None:
    public = {n for n in dir(streamer) if not n.startswith("_")}
    assert set(streamer.__all__) <= public
    assert {"ReceiptStreamer", "CompletionWatcher", "ensure_topics", "Spool"} <= set(
        streamer.__all__
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_the_java_client(data: bytes, expected: int) -> None:
    # Vectors from Kafka's UtilsTest.
    assert streamer.murmur2(data) == expected


def test_partition_matches_aiokafkas_default_partitioner_and_is_cached() -> None:
    cache = streamer.PartitionCache(max_entries=3)
    parts = list(range(12))
    for i in range(50):
        key = f"default/wf-{i}/run-{i}".encode()
        assert cache.get(key, 12) == DefaultPartitioner()(key, parts, parts)
    assert len(cache) == 3


def test_step_record_frames_the_signed_body_without_re_encoding() -> None:
    receipt, body = schemas.sign_receipt(sample_step(), schemas.KeyPair.generate("k1"))
    rec = streamer.step_record(receipt, body, topic="steps", source="urn:test")
    assert rec.key == receipt.run_key.encode()
    assert rec.value == schemas.frame(schemas.STEP_SCHEMA, body)
    assert rec.value.endswith(body)
    headers = dict(rec.headers)
    assert headers["ce_id"] == receipt.receipt_id.encode()
    assert headers["ce_type"] == streamer.STEP_TYPE.encode()
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_source"] == b"urn:test"
    assert headers["content-type"] == b"application/avro"


@pytest.mark.parametrize("verdict", ["allow", "incomplete", "deny"])
def test_a_step_with_a_chio_receipt_gets_chio_streaming_headers(verdict: str) -> None:
    key = schemas.KeyPair.generate("k1")
    step = sample_step(verdict=schemas.Verdict.DENY if verdict == "deny" else schemas.Verdict.ALLOW)
    body = kernel_receipt_body(step, parameters={"args": [1]})
    if verdict == "incomplete":
        body["decision"] = {"verdict": "incomplete", "reason": "pre-execution authorization"}
    step = with_chio_receipt(step, key, body=body)
    receipt, signed = schemas.sign_receipt(step, key)
    rec = streamer.step_record(receipt, signed, topic="steps", source="urn:test")
    names = [name for name, _ in rec.headers]
    assert names == [*schemas.CE_HEADERS, schemas.X_CHIO_RECEIPT, schemas.X_CHIO_VERDICT]
    headers = dict(rec.headers)
    assert headers[schemas.X_CHIO_RECEIPT] == json.loads(step.chio_receipt)["id"].encode()
    assert headers[schemas.X_CHIO_VERDICT] == verdict.encode()
    plain = streamer.step_record(*schemas.sign_receipt(sample_step(), key), topic="t", source="s")
    assert [name for name, _ in plain.headers] == list(schemas.CE_HEADERS)


def test_completion_and_envelope_records() -> None:
    event = sample_run()
    rec = streamer.completion_record(event, topic="runs", source="s")
    assert schemas.RunCompletion.from_avro(schemas.decode(rec.value).record) == event
    assert dict(rec.headers)["ce_id"] == event.event_id.encode()
    envelope = {
        "version": "chio-temporal/v1",
        "workflow_id": "w",
        "run_id": "r",
        "parent_workflow_ids": [],
        "started_at": 1,
        "completed_at": 2,
        "outcome": "success",
        "step_count": 0,
        "allow_count": 0,
        "deny_count": 0,
        "steps": [],
        "metadata": {"namespace": "ns", "revision": "3"},
    }
    rec = streamer.envelope_record(envelope, topic="env", source="s")
    assert rec.key == b"ns/w/r"
    # A worker's flush: its own type, and an id no builder revision ("w/r/3") can have.
    assert dict(rec.headers)["ce_type"] == schemas.WORKER_ENVELOPE_EVENT_TYPE.encode()
    assert dict(rec.headers)["ce_type"] != schemas.ENVELOPE_EVENT_TYPE.encode()
    ce_id = dict(rec.headers)["ce_id"].decode()
    assert ce_id.startswith("w/r/worker-")
    assert ce_id != schemas.envelope_event_id("w", "r", 3)
    rooted = {**envelope, "metadata": {**envelope["metadata"], "chain_root": "ab" * 32}}
    rec = streamer.envelope_record(rooted, topic="env", source="s")
    assert dict(rec.headers)["ce_id"] == f"w/r/worker-{'ab' * 32}".encode()
    with pytest.raises(schemas.EncodeError):
        streamer.envelope_record({**envelope, "step_count": "x"}, topic="env", source="s")


def _ev(kind: int, **attrs: object) -> HistoryEvent:
    ev = HistoryEvent(event_type=kind)  # type: ignore[arg-type]
    for field, values in attrs.items():
        sub = getattr(ev, field)
        for k, v in values.items():  # type: ignore[attr-defined]
            if isinstance(v, dict):
                for kk, vv in v.items():
                    setattr(getattr(sub, k), kk, vv)
            else:
                setattr(sub, k, v)
    return ev


def test_history_facts_count_attempts_markers_and_links() -> None:
    events = [
        _ev(
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
            workflow_execution_started_event_attributes={
                "continued_execution_run_id": "prev-run",
                "parent_workflow_execution": {"workflow_id": "parent", "run_id": "prun"},
            },
        ),
        _ev(
            EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
            activity_task_started_event_attributes={"attempt": 3, "scheduled_event_id": 10},
        ),
        _ev(
            EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED,
            activity_task_started_event_attributes={"attempt": 1, "scheduled_event_id": 11},
        ),
        _ev(
            EventType.EVENT_TYPE_MARKER_RECORDED,
            marker_recorded_event_attributes={"marker_name": "core_local_activity"},
        ),
        _ev(
            EventType.EVENT_TYPE_MARKER_RECORDED,
            marker_recorded_event_attributes={"marker_name": "core_patch"},
        ),
        _ev(
            EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
            workflow_execution_continued_as_new_event_attributes={"new_execution_run_id": "next"},
        ),
    ]
    facts = streamer.history_facts(events)
    assert facts.expected_steps == 5
    assert (facts.activity_attempts, facts.local_activity_markers) == (4, 1)
    assert facts.continued_from_run_id == "prev-run"
    assert facts.continued_as_new_run_id == "next"
    assert (facts.parent_workflow_id, facts.parent_run_id) == ("parent", "prun")


def test_completion_event_maps_outcomes_and_ids_are_deterministic() -> None:
    assert outcome_of(WorkflowExecutionStatus.TIMED_OUT) is schemas.Outcome.TIMED_OUT
    assert outcome_of(WorkflowExecutionStatus.CANCELED) is schemas.Outcome.CANCELLED
    assert outcome_of(None) is schemas.Outcome.UNKNOWN
    facts = streamer.history_facts([])
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ev = streamer.completion_event(
        namespace="ns",
        workflow_id="w",
        run_id="r",
        workflow_type="T",
        task_queue="q",
        status=WorkflowExecutionStatus.TERMINATED,
        start_time=t0,
        close_time=t0 + timedelta(seconds=1),
        facts=facts,
        parent_workflow_ids=("p",),
        emitted_at=5,
    )
    assert ev.outcome is schemas.Outcome.TERMINATED
    assert ev.closed_at - ev.started_at == 1_000_000
    assert ev.event_id == completion_event_id("ns", "w", "r")
    assert ev.source is schemas.CompletionSource.WATCHER
    schemas.encode("dev.chio.receipts.v1.RunCompletion", ev.to_avro())


def test_checkpoint_round_trip_prune_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    t = datetime(2026, 1, 1, tzinfo=UTC)
    cp = streamer.Checkpoint.load(path, t)
    assert cp.watermark == t
    cp.seen = {"old": t - timedelta(minutes=5), "new": t}
    cp.prune(timedelta(seconds=30))
    assert set(cp.seen) == {"new"}
    cp.save(path)
    again = streamer.Checkpoint.load(path, datetime(1970, 1, 1, tzinfo=UTC))
    assert again.watermark == t
    assert again.seen == {"new": t}
    path.write_text("{not json")
    with pytest.raises(streamer.WatcherError):
        streamer.Checkpoint.load(path, t)


def test_topics_config_co_partitions_steps_and_runs() -> None:
    cfg = streamer.TopicsConfig(prefix="x.", partitions=3)
    s = cfg.settings()
    assert s["x.chio.receipts.steps.v1"].partitions == s["x.chio.receipts.runs.v1"].partitions == 3
    assert set(s) == {
        "x.chio.receipts.steps.v1",
        "x.chio.receipts.runs.v1",
        "x.chio.receipts.envelopes.v1",
        "x.chio.receipts.dlq.v1",
    }
    assert s["x.chio.receipts.envelopes.v1"].configs()["cleanup.policy"] == "compact,delete"


def test_metrics_instances_do_not_collide() -> None:
    a, b = streamer.StreamerMetrics(), streamer.StreamerMetrics()
    a.produced.labels("t").inc()
    assert b.registry.get_sample_value("chio_streamer_produced_total", {"topic": "t"}) is None
    assert a.registry.get_sample_value("chio_streamer_produced_total", {"topic": "t"}) == 1.0


async def test_publish_before_start_or_after_stop_is_refused(tmp_path: Path) -> None:
    s = streamer.ReceiptStreamer(
        streamer.StreamerConfig(
            kafka=schemas.KafkaConnection(bootstrap_servers="127.0.0.1:1"), spool_dir=str(tmp_path)
        )
    )
    with pytest.raises(schemas.ReceiptSinkError):
        await s.publish_completion(sample_run())


def test_metrics_server_serves_on_loopback() -> None:
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    metrics = streamer.StreamerMetrics()
    metrics.spool_depth.set(7)
    streamer.start_metrics_server(port, metrics.registry)
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert "chio_streamer_spool_depth 7.0" in body
    assert "chio_streamer_send_latency_seconds_bucket" in body
