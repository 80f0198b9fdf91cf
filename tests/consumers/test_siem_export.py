"""SIEM export on the real broker: Splunk HEC to a local HTTP receiver, and to a file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    ReceiptBuilderService,
    parse_dead_letter_headers,
)
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.consumers.siem import (
    ElasticOutput,
    ExporterConfig,
    SiemExporter,
    SyslogOutput,
    parse_output,
)
from chio_receipts.schemas import KafkaConnection, KeyPair, Outcome, TopicNames
from tests.support.consumer_factory import completion, completion_value, signed_run
from tests.support.helpers import eventually
from tests.support.http_receiver import Receiver
from tests.support.kafka_topics import create_topics, make_topics, produce, read_all
from tests.support.ocsf import ocsf_errors

KEY = KeyPair.generate("worker-siem")


async def _steps_topic(bootstrap: str, unique: Callable[[str], str]) -> tuple[str, list[bytes]]:
    topic = unique("steps")
    await create_topics(bootstrap, [topic], 2)
    run = signed_run(KEY, "wf-siem", "r1", 4, deny=(2,))
    await produce(bootstrap, topic, [(b"default/wf-siem/r1", w, None) for _, w in run])
    return topic, [w for _, w in run]


async def _dlq_topic(bootstrap: str, unique: Callable[[str], str]) -> str:
    topic = unique("dlq")
    await create_topics(bootstrap, [topic], 1)
    return topic


async def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    """The offsets ``group`` committed on ``topic`` (0 where none)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return [await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)]
    finally:
        await consumer.stop()


def _hec_uids(body: bytes) -> list[str]:
    return [json.loads(line)["event"]["metadata"]["uid"] for line in body.decode().splitlines()]


async def _export_until(config: ExporterConfig, done: Callable[[], Any]) -> None:
    stop = asyncio.Event()
    async with SiemExporter(config) as exporter:
        task = asyncio.create_task(exporter.run(stop))
        try:

            def check() -> Any:
                if task.done():
                    task.result()
                return done()

            await eventually(check, timeout=30)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


@pytest.mark.integration
async def test_hec_export_to_a_local_receiver_with_retry(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    topic, wires = await _steps_topic(kafka_bootstrap, unique)
    dlq = await _dlq_topic(kafka_bootstrap, unique)
    group = unique("g")
    async with Receiver(status=[503]) as receiver:  # first attempt: unavailable -> retried
        config = ExporterConfig(
            kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
            output=parse_output(f"hec:{receiver.url}", token="tok-123", index="chio"),
            group_id=group,
            topics=TopicNames(steps=topic, dlq=dlq),
            retry_initial_seconds=0.05,
        )

        def events() -> list[dict[str, Any]]:
            out = []
            for _, _, _, body in receiver.requests[1:]:
                out += [json.loads(line) for line in body.decode().splitlines() if line]
            return out if len(out) >= 4 else []

        await _export_until(config, events)
        method, path, headers, _ = receiver.requests[1]
        assert (method, path) == ("POST", "/services/collector/event")
        assert headers["authorization"] == "Splunk tok-123"
        docs = events()
        assert len(docs) == 4  # the 503 batch was retried, not duplicated after success
        by_uid = {d["event"]["metadata"]["uid"]: d for d in docs}
        records = {decode_plain(w).record["receipt_id"]: decode_plain(w).record for w in wires}
        assert set(by_uid) == set(records)
        for uid, doc in by_uid.items():
            rec = records[uid]
            assert doc["sourcetype"] == "ocsf:api_activity"
            assert doc["source"] == "chio-receipts"
            assert doc["index"] == "chio"
            assert doc["time"] == pytest.approx(rec["evaluated_at"] / 1_000_000, abs=0.001)
            event = doc["event"]
            assert event["class_uid"] == 6003
            assert event["action"] == ("Denied" if rec["verdict"] == "DENY" else "Allowed")
            assert event["actor"]["user"]["name"] == rec["subject"]
            assert event["api"]["operation"] == rec["activity_type"]
            assert event["resources"][0]["uid"] == rec["resource"]
            assert event["time"] == rec["evaluated_at"] // 1000
        assert sum(d["event"]["action"] == "Denied" for d in docs) == 1
        assert receiver.requests[0][3] == receiver.requests[1][3]  # the same batch, once more
    assert await read_all(kafka_bootstrap, dlq, 1, timeout=3) == []
    assert sum(await _committed(kafka_bootstrap, group, topic, 2)) == 4


@pytest.mark.integration
async def test_a_batch_the_output_refuses_goes_to_the_dlq_and_export_goes_on(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    topic = unique("steps")
    await create_topics(kafka_bootstrap, [topic], 1)
    dlq = await _dlq_topic(kafka_bootstrap, unique)
    group = unique("g")
    first = signed_run(KEY, "wf-refused", "r1", 3)
    later = signed_run(KEY, "wf-later", "r1", 3)
    await produce(kafka_bootstrap, topic, [(b"default/wf-refused/r1", w, None) for _, w in first])
    async with Receiver(status=[400]) as receiver:  # the first batch is refused
        config = ExporterConfig(
            kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
            output=parse_output(f"hec:{receiver.url}", token="tok-1"),
            group_id=group,
            topics=TopicNames(steps=topic, dlq=dlq),
            retry_initial_seconds=0.05,
        )
        stop = asyncio.Event()
        async with SiemExporter(config) as exporter:
            task = asyncio.create_task(exporter.run(stop))
            try:
                await eventually(lambda: len(receiver.requests) >= 1, timeout=30)
                refused = _hec_uids(receiver.requests[0][3])
                await produce(
                    kafka_bootstrap, topic, [(b"default/wf-later/r1", w, None) for _, w in later]
                )

                def delivered() -> list[str]:
                    assert not task.done(), task
                    uids = [u for *_, body in receiver.requests[1:] for u in _hec_uids(body)]
                    return uids if len(uids) + len(refused) >= 6 else []

                accepted = await eventually(delivered, timeout=30)

                async def committed() -> bool:
                    return await _committed(kafka_bootstrap, group, topic, 1) == [6]

                await eventually(committed, timeout=30)
                assert not task.done(), "the exporter stopped after a refused batch"
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    ids = {str(r.receipt_id): i for i, (r, _) in enumerate(first + later)}
    assert refused, "the refused request carried no events"
    assert sorted(refused + accepted) == sorted(ids)  # each event once: refused or accepted
    assert not set(refused) & set(accepted)
    dead = await read_all(kafka_bootstrap, dlq, len(refused))
    assert len(dead) == len(refused)
    wires = [w for _, w in first + later]
    for message in dead:
        headers = parse_dead_letter_headers(message.headers)
        assert headers["reason"] == "output_rejected"
        assert headers["error_class"] == "OutputRejected"
        assert "HTTP 400" in headers["detail"]
        assert headers["topic"] == topic
        assert headers["partition"] == "0"
        offset = int(headers["offset"])
        assert message.value == wires[offset]  # the original bytes, at their origin offset
        assert decode_plain(message.value).record["receipt_id"] in refused


@pytest.mark.integration
async def test_file_export_deny_only_keeps_denies(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, _ = await _steps_topic(kafka_bootstrap, unique)
    out = tmp_path / "ocsf.jsonl"
    config = ExporterConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        output=parse_output(f"jsonl:{out}"),
        group_id=unique("g"),
        topics=TopicNames(steps=topic),
        deny_only=True,
    )
    await _export_until(config, lambda: out.exists() and out.read_text().count("\n") >= 1)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 1
    assert lines[0]["action"] == "Denied"
    assert lines[0]["class_uid"] == 6003


@pytest.mark.integration
async def test_elastic_bulk_uses_create_with_receipt_id() -> None:
    def reply(body: bytes) -> bytes:
        n = body.count(b"\n") // 2
        items = [{"create": {"status": 201 if i else 409}} for i in range(n)]
        return json.dumps({"errors": True, "items": items}).encode()

    async with Receiver(reply=reply) as receiver, ElasticOutput(receiver.url, index="ix") as out:
        events = [
            {"metadata": {"uid": f"id-{i}"}, "class_uid": 6003, "action_id": 1} for i in range(3)
        ]
        await out.write(events)  # 409 = already there: accepted (idempotent replay)
        _, path, headers, body = receiver.requests[0]
        assert path == "/_bulk"
        assert headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in body.decode().splitlines()]
        assert lines[0] == {"create": {"_index": "ix", "_id": "id-0"}}
        assert lines[1]["metadata"]["uid"] == "id-0"


@pytest.mark.integration
async def test_syslog_tcp_rfc5424_octet_counting() -> None:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with SyslogOutput(f"syslog+tcp://127.0.0.1:{port}") as out:
            event = {
                "metadata": {"uid": "r-1"},
                "time": 1_700_000_000_000,
                "action_id": 2,
                "action": "Denied",
                "class_uid": 6003,
            }
            await out.write([event])
            await eventually(lambda: received and received[0], timeout=10)
    finally:
        server.close()
        await server.wait_closed()
    length, _, message = received[0].partition(b" ")
    assert int(length) == len(message)
    assert message.startswith(b"<132>1 2023-11-14T22:13:20.000+00:00 ")  # local0.warning
    assert b'[chio@32473 uid="r-1" action="Denied"]' in message
    assert json.loads(message.split(b"\xef\xbb\xbf", 1)[1])["class_uid"] == 6003


@pytest.mark.integration
async def test_siem_export_command_to_a_file_stops_on_sigterm(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, _ = await _steps_topic(kafka_bootstrap, unique)
    out = tmp_path / "out.jsonl"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chio_receipts.cli_consumers",
            "siem-export",
            "--bootstrap",
            kafka_bootstrap,
            "--output",
            f"jsonl:{out}",
            "--group",
            unique("g"),
            "--steps-topic",
            topic,
        ],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await eventually(lambda: out.exists() and out.read_text().count("\n") >= 4, timeout=60)
    finally:
        child.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(child.wait, 60)
    assert code == 0, child.stderr.read().decode() if child.stderr else code
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == 4
    assert {e["action"] for e in events} == {"Allowed", "Denied"}


@pytest.mark.integration
async def test_syslog_udp_one_datagram_per_event() -> None:
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            got.put_nowait(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        async with SyslogOutput(f"syslog+udp://127.0.0.1:{port}") as out:
            events = [
                {"metadata": {"uid": f"r-{i}"}, "time": 1_700_000_000_000, "action_id": 1,
                 "action": "Allowed", "class_uid": 6003}
                for i in range(2)
            ]  # fmt: skip
            await out.write(events)
            first = await asyncio.wait_for(got.get(), 10)
            second = await asyncio.wait_for(got.get(), 10)
    finally:
        transport.close()
    assert first.startswith(b"<134>1 ")  # local0.info, no octet count over UDP
    assert b'uid="r-0"' in first
    assert b'uid="r-1"' in second


@pytest.mark.integration
async def test_every_exported_event_validates_against_the_ocsf_json_schema(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Steps (allowed and denied) and the builder's envelopes of runs closed every way, exported
    to a file by the real exporter; every line it wrote is valid OCSF of the version it claims."""
    topics = await make_topics(kafka_bootstrap, unique, partitions=2)
    outcomes = [o for o in Outcome if o is not Outcome.UNKNOWN]
    steps: list[tuple[bytes, bytes, None]] = []
    runs: list[tuple[bytes, bytes, None]] = []
    for i, outcome in enumerate(outcomes):
        wf = unique(f"wf-{outcome.value.lower()}")
        key = f"default/{wf}/r1".encode()
        steps += [(key, w, None) for _, w in signed_run(KEY, wf, "r1", 2, deny=(i % 3,))]
        done = completion(wf, "r1", expected=2, outcome=outcome)
        if outcome is Outcome.CONTINUED_AS_NEW:
            done = dataclasses.replace(done, continued_as_new_run_id="r2")
        runs.append((key, completion_value(done), None))
    await produce(kafka_bootstrap, topics.steps, steps)
    await produce(kafka_bootstrap, topics.runs, runs)
    builder = ReceiptBuilderService(
        BuilderConfig(
            kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
            clickhouse=ClickHouseConfig(dsn=clickhouse_dsn),
            builder_key=KeyPair.generate("builder-siem"),
            public_keys={KEY.key_id: KEY.public_key},
            topics=topics,
            group_id=unique("builder"),
            poll_timeout_ms=100,
        )
    )
    stop = asyncio.Event()
    await builder.start()
    task = asyncio.create_task(builder.run(stop))
    try:
        await read_all(kafka_bootstrap, topics.envelopes, len(runs))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await builder.stop()
    out = tmp_path / "ocsf.jsonl"
    config = ExporterConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        output=parse_output(f"jsonl:{out}"),
        group_id=unique("g"),
        topics=topics,
        export_envelopes=True,
    )
    total = len(steps) + len(runs)
    await _export_until(config, lambda: out.exists() and out.read_text().count("\n") >= total)
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(events) == total
    invalid = {e["metadata"]["uid"]: errors for e in events if (errors := ocsf_errors(e))}
    assert invalid == {}, invalid
    assert {e["metadata"]["version"] for e in events} == {"1.5.0"}
    assert {tuple(e["metadata"]["profiles"]) for e in events} == {("security_control",)}
    step_events = [e for e in events if e["metadata"]["log_name"] == "chio.receipts.steps"]
    assert {e["action"] for e in step_events} == {"Allowed", "Denied"}
    assert {e["src_endpoint"]["hostname"] for e in events} == {"host"}  # worker-1@host
    status = {
        e["unmapped"]["outcome"]: e["status_id"]
        for e in events
        if e["metadata"]["log_name"] == "chio.receipts.envelopes"
    }
    assert status == {
        "success": 1,
        "failure": 2,
        "cancelled": 2,
        "terminated": 2,
        "timed_out": 2,
        "continued_as_new": 99,
    }
    # The validator bites on the exporter's own output: without src_endpoint it is invalid.
    broken = dict(events[0])
    del broken["src_endpoint"]
    assert "<event>: 'src_endpoint' is a required property" in ocsf_errors(broken)
