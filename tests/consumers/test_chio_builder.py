"""Chio kernel receipts end to end on the real broker and ClickHouse (chDB by default): the
builder, ``verify`` over rows, the in-place migration of a v1 database, and the SIEM exporter."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chio_receipts.consumers import (
    BuilderConfig,
    ClickHouseConfig,
    open_client,
    parse_dead_letter_headers,
    verify_run,
)
from chio_receipts.consumers._clickhouse import migrations as shipped_migrations
from chio_receipts.consumers._clickhouse import split_statements
from chio_receipts.consumers._envelope import Envelope
from chio_receipts.consumers._wire import decode_plain, encode_plain, envelope_step_body
from chio_receipts.consumers.siem import ExporterConfig, SiemExporter, parse_output
from chio_receipts.schemas import (
    STEP_SCHEMA,
    KafkaConnection,
    KeyPair,
    StepReceipt,
    TopicNames,
    chain_root,
    chio_step_fields,
    receipt_hash,
)
from tests.support.builder_service import Running
from tests.support.chio_runs import chio_run, released_run, resign, tampered_receipt, v1_run
from tests.support.consumer_factory import completion, completion_value
from tests.support.helpers import eventually
from tests.support.http_receiver import Receiver
from tests.support.kafka_topics import make_topics, produce, read_all

pytestmark = pytest.mark.integration
SIDECAR = KeyPair.generate("ed25519-00000000000000c1")
KERNEL = KeyPair.generate("kernel-1")
ROGUE = KeyPair.generate("rogue-kernel")
BUILDER = KeyPair.generate("builder-chio")
KEYS = {SIDECAR.key_id: SIDECAR.public_key, BUILDER.key_id: BUILDER.public_key}
TRUSTED = frozenset({KERNEL.public_key.hex()})
OLD_DDL = Path(__file__).resolve().parents[1] / "data" / "clickhouse-v1"
_Msg = tuple[bytes, bytes, None]


def _config(bootstrap: str, dsn: str, topics: TopicNames, **kw: Any) -> BuilderConfig:
    settings: dict[str, Any] = {
        "public_keys": {SIDECAR.key_id: SIDECAR.public_key},
        "trusted_kernel_keys": TRUSTED,
        "grace_seconds": 1.0,
        **kw,
    }
    return BuilderConfig(
        kafka=KafkaConnection(bootstrap_servers=bootstrap),
        clickhouse=ClickHouseConfig(dsn=dsn),
        builder_key=BUILDER,
        topics=topics,
        group_id=f"g-{topics.steps}",
        poll_timeout_ms=100,
        **settings,
    )


def _key(wf: str, rid: str) -> bytes:
    return f"default/{wf}/{rid}".encode()


def _dead_reasons(dead: list[Any]) -> dict[int, tuple[str, str]]:
    out = {}
    for message in dead:
        headers = parse_dead_letter_headers(message.headers)
        out[int(headers["offset"])] = (headers["reason"], headers["detail"])
    return out


async def test_good_receipts_are_built_and_bad_ones_dead_lettered_never_counted(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    """Sidecar+kernel signed, kernel-only and sidecar-as-kernel steps are built into rows and
    envelopes; a tampered receipt, an untrusted kernel key, a receipt moved from another run and a
    step signed by nobody (``unsigned_step``, not ``unknown_key``) go to the DLQ with their reason
    and no envelope counts them."""
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf = unique("wf-chio")
    both = chio_run(wf, "both", 3, kernel=KERNEL, sidecar=SIDECAR, deny=(1,))
    kernel_only = chio_run(wf, "kernel", 2, kernel=KERNEL, sidecar=None)
    # Our sidecar's own receipts: the Chio receipt signed by the sidecar key (trusted: the ring).
    ours = chio_run(wf, "ours", 2, kernel=SIDECAR, sidecar=SIDECAR)
    good = {"both": both, "kernel": kernel_only, "ours": ours}
    # Run "bad": one good step, then the refused ones (each Avro-signed by the sidecar unless
    # kernel-only, so only the Chio check can refuse them).
    bad_run = chio_run(wf, "bad", 6, kernel=KERNEL, sidecar=SIDECAR)
    untrusted = chio_run(wf, "bad", 6, kernel=ROGUE, sidecar=SIDECAR)
    rogue_only = chio_run(wf, "bad", 6, kernel=ROGUE, sidecar=None)
    moved_from = both[0][0]
    refused: list[tuple[bytes, str, str]] = [
        (
            resign(bad_run[1][0], SIDECAR, chio_receipt=tampered_receipt(bad_run[1][0])),
            "bad_chio_receipt",
            "differs from the body",
        ),
        (untrusted[2][1], "untrusted_kernel_key", "is not a trusted signer"),
        (
            resign(
                bad_run[3][0],
                SIDECAR,
                chio_receipt=moved_from.chio_receipt,
                chio_signed=moved_from.chio_signed,
            ),
            "bad_chio_receipt",
            "not bound to this step's Temporal context",
        ),
        (rogue_only[4][1], "untrusted_kernel_key", "is not a trusted signer"),
        (
            resign(bad_run[5][0], None, chio_receipt="", chio_signed=b""),
            "unsigned_step",
            "UnsignedStep",
        ),
    ]
    steps: list[_Msg] = [(_key(wf, rid), w, None) for rid, run in good.items() for _, w in run]
    steps.append((_key(wf, "bad"), bad_run[0][1], None))
    first_bad = len(steps)
    steps += [(_key(wf, "bad"), value, None) for value, _, _ in refused]
    runs = [
        (_key(wf, rid), completion_value(completion(wf, rid, expected=len(run))), None)
        for rid, run in [*good.items(), ("bad", bad_run)]
    ]
    await produce(kafka_bootstrap, topics.steps, steps)
    await produce(kafka_bootstrap, topics.runs, runs)
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def envelopes() -> bool:
            count = await running.rows("SELECT count() FROM workflow_receipts")
            return count[0][0] >= 4

        await eventually(envelopes, timeout=60)
        rows = await running.rows(
            "SELECT run_id, toString(receipt_id), key_id, chio_receipt_id, decision, guard, "
            "kernel_key, receipt_kind, policy_hash, parameter_hash, length(chio_signed) "
            "FROM step_receipts ORDER BY run_id, toString(receipt_id)"
        )
        env = await running.rows(
            "SELECT run_id, step_count, allow_count, deny_count, complete, missing_steps, "
            "receipt_ids FROM workflow_receipts FINAL ORDER BY run_id"
        )
        report = verify_run(
            running.service.sink.client,
            wf,
            keys=KEYS,
            trusted_kernel_keys=TRUSTED | {SIDECAR.public_key.hex()},
        )
    by_run: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_run.setdefault(row[0], []).append(row)
    assert sorted(by_run) == ["bad", "both", "kernel", "ours"]
    assert [r[1] for r in by_run["bad"]] == [str(bad_run[0][0].receipt_id)]
    for rid, run in good.items():
        assert len(by_run[rid]) == len(run)
        for (step, _), row in zip(
            sorted(run, key=lambda s: s[0].receipt_id), by_run[rid], strict=True
        ):
            fields = chio_step_fields(step)
            assert row[1] == step.receipt_id
            assert row[2] == ("" if rid == "kernel" else SIDECAR.key_id)
            assert row[3:10] == (
                fields.receipt_id,
                fields.decision,
                fields.guard,
                fields.kernel_key,
                fields.receipt_kind,
                fields.policy_hash,
                fields.parameter_hash,
            )
            assert row[10] == len(step.chio_signed)
    envelopes_by_run = {e[0]: e for e in env}
    assert envelopes_by_run["both"][1:6] == (3, 2, 1, True, 0)
    assert envelopes_by_run["kernel"][1:6] == (2, 2, 0, True, 0)
    assert envelopes_by_run["ours"][1:6] == (2, 2, 0, True, 0)
    # The refused steps are never counted: written incomplete after the grace, one step only.
    assert envelopes_by_run["bad"][1:6] == (1, 1, 0, False, 5)
    assert list(envelopes_by_run["bad"][6]) == [str(bad_run[0][0].receipt_id)]
    assert report.ok, report.summary()
    assert (report.steps, report.envelopes) == (8, 4)
    dead = _dead_reasons(await read_all(kafka_bootstrap, topics.dlq, len(refused)))
    assert sorted(dead) == list(range(first_bad, first_bad + len(refused)))
    for offset, (_, reason, detail) in enumerate(refused, start=first_bad):
        assert dead[offset][0] == reason
        assert detail in dead[offset][1]


async def test_an_unknown_kernel_key_refreshes_the_builders_key_ring_once(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    """A kernel-signed step by a key the sidecar publishes only after the builder started is
    accepted (the ring is refreshed for its kernel_key); one by a key nobody publishes is not."""
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    rotated = KeyPair.generate("ed25519-00000000000000c2")
    published = [{"key_id": SIDECAR.key_id, "public_key": SIDECAR.public_key.hex()}]
    wf = unique("wf-refresh")
    fresh = chio_run(wf, "r1", 2, kernel=rotated, sidecar=None)
    foreign = chio_run(wf, "r2", 1, kernel=ROGUE, sidecar=None)
    async with Receiver(reply=lambda _: json.dumps({"keys": published}).encode()) as server:
        config = _config(
            kafka_bootstrap,
            clickhouse_dsn,
            topics,
            public_keys={},
            trusted_kernel_keys=frozenset(),
            key_url=server.url,
        )
        async with Running(config) as running:
            assert len(server.requests) == 1  # at start: only the old key
            published.append({"key_id": rotated.key_id, "public_key": rotated.public_key.hex()})
            await produce(
                kafka_bootstrap,
                topics.steps,
                [(_key(wf, "r1"), w, None) for _, w in fresh]
                + [(_key(wf, "r2"), w, None) for _, w in foreign],
            )

            async def written() -> bool:
                rows = await running.rows("SELECT count() FROM step_receipts")
                return rows[0][0] >= 2

            await eventually(written, timeout=60)
            dead = await read_all(kafka_bootstrap, topics.dlq, 1)
            kernel_keys = await running.rows("SELECT DISTINCT kernel_key FROM step_receipts")
        assert 2 <= len(server.requests) <= 3
    assert kernel_keys == [(rotated.public_key.hex(),)]
    [(reason, detail)] = _dead_reasons(dead).values()
    assert reason == "untrusted_kernel_key"
    assert ROGUE.public_key.hex()[:16] in detail


def _v1_row_values(wire: bytes, columns: list[str], offset: int) -> tuple[Any, ...]:
    """A step_receipts row as the v1 consumer wrote it (old columns only)."""
    record = decode_plain(wire).record
    values = {**record, "wire": wire, "kafka_partition": 0, "kafka_offset": offset}
    return tuple(values[c] for c in columns)


async def test_a_v1_database_upgrades_in_place_and_verify_checks_v1_and_v2_rows(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    """Tables created with the released (pre-v2) DDL and holding v1 rows and their envelope are
    migrated by the consumer (0003: ADD COLUMN), which then writes a v2 run into them; verify
    checks both runs of the workflow, and names a changed Chio column or receipt."""
    wf = unique("wf-migrate")
    old_run = v1_run(wf, "old", 3, SIDECAR)
    client = open_client(clickhouse_dsn, create=True)
    try:
        for name in ("0001_tables.sql", "0002_views.sql"):
            for statement in split_statements((OLD_DDL / name).read_text("utf-8")):
                client.command(statement)
        client.command(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
            "checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
            "ENGINE = ReplacingMergeTree ORDER BY version"
        )
        client.insert(
            "schema_migrations",
            [(1, "0001_tables.sql", "v1"), (2, "0002_views.sql", "v1")],
            column_names=("version", "name", "checksum"),
        )
        old_columns = [
            r[0] for r in client.query("SELECT name FROM system.columns WHERE "
            "table = 'step_receipts' AND database = currentDatabase() "
            "AND default_kind = '' ORDER BY position").result_rows
        ]  # fmt: skip
        assert "chio_receipt" not in old_columns
        client.insert(
            "step_receipts",
            [_v1_row_values(w, old_columns, i) for i, (_, w) in enumerate(old_run)],
            column_names=old_columns,
        )
    finally:
        client.close()
    # The old envelope of the v1 run, as the v1 builder signed it (steps re-encoded as the
    # current schema; the chain over the wire bodies as sent).
    plains = sorted((decode_plain(w) for _, w in old_run), key=lambda p: p.record["receipt_id"])
    done = completion(wf, "old", expected=3)
    envelope = Envelope(
        namespace="default",
        workflow_id=wf,
        run_id="old",
        workflow_type="OrderWorkflow",
        parent_workflow_ids=(),
        started_at=done.started_at,
        completed_at=done.closed_at,
        outcome="success",
        revision=1,
        complete=True,
        missing_steps=0,
        expected_steps=3,
        allow_count=3,
        deny_count=0,
        receipt_ids=tuple(str(p.record["receipt_id"]) for p in plains),
        steps=tuple(envelope_step_body(p) for p in plains),
        chain_root=chain_root(receipt_hash(p.body) for p in plains),
    ).signed_by(BUILDER)
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    new_run = chio_run(wf, "new", 2, kernel=KERNEL, sidecar=SIDECAR, deny=(0,))
    await produce(kafka_bootstrap, topics.steps, [(_key(wf, "new"), w, None) for _, w in new_run])
    await produce(
        kafka_bootstrap,
        topics.runs,
        [(_key(wf, "new"), completion_value(completion(wf, "new", expected=2)), None)],
    )
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:
        sink = running.service.sink
        from chio_receipts.consumers import envelope_row

        await sink.insert_envelopes([envelope_row(envelope)], "v1-envelope")

        async def built() -> bool:
            rows = await running.rows("SELECT count() FROM workflow_receipts")
            return rows[0][0] >= 2

        await eventually(built, timeout=60)
        migrations = await running.rows("SELECT version FROM schema_migrations FINAL ORDER BY 1")
        v1_cols = await running.rows(
            "SELECT chio_receipt, length(chio_signed), decision, kernel_key FROM step_receipts "
            "WHERE run_id = 'old'"
        )
        trusted = TRUSTED | {SIDECAR.public_key.hex()}
        report = await sink.call(
            lambda c: verify_run(c, wf, keys=KEYS, trusted_kernel_keys=trusted)
        )
        assert report.ok, report.summary()
        assert (report.runs, report.steps, report.envelopes) == (2, 5, 2)
        # Untrusted kernel: the v2 rows fail, the v1 rows do not.
        untrusting = await sink.call(
            lambda c: verify_run(c, wf, keys=KEYS, trusted_kernel_keys=frozenset())
        )
        assert len(untrusting.problems) == 2
        assert all("run new" in p and "untrusted_kernel_key" in p for p in untrusting.problems)
        # Tampering with a Chio column or the receipt of a v2 row is named.
        new_id = str(new_run[1][0].receipt_id)
        await sink.query(
            "ALTER TABLE step_receipts UPDATE decision = 'deny' WHERE receipt_id = {id:UUID} "
            "SETTINGS mutations_sync = 1",
            {"id": new_id},
        )
        await sink.query(
            "ALTER TABLE step_receipts UPDATE chio_receipt = {text:String} "
            "WHERE receipt_id = {id:UUID} SETTINGS mutations_sync = 1",
            {"id": str(new_run[0][0].receipt_id), "text": tampered_receipt(new_run[0][0])},
        )
        tampered = await sink.call(
            lambda c: verify_run(c, wf, keys=KEYS, trusted_kernel_keys=trusted)
        )
    assert [m[0] for m in migrations] == [m.version for m in shipped_migrations()]
    assert v1_cols == [("", 0, "", "")] * 3
    problems = "\n".join(tampered.problems)
    assert f"receipt {new_id}" in problems
    assert "column decision changed" in problems
    assert "field chio_receipt changed" in problems
    assert "run old" not in problems


async def test_steps_of_every_released_writer_are_built_and_verify(
    kafka_bootstrap: str, clickhouse_dsn: str, unique: Callable[[str], str]
) -> None:
    """Old messages still decode on the real stack: steps written with the released v1 and v2
    StepReceipt schemas (no Chio receipt, no trace context) are stored, enveloped complete, and
    verify from the rows, their signatures checked over the bytes their writers signed."""
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf = unique("wf-released")
    runs = {f"v{v}": released_run(wf, f"v{v}", 2, SIDECAR, version=v) for v in (1, 2)}
    for rid, run in runs.items():
        await produce(kafka_bootstrap, topics.steps, [(_key(wf, rid), w, None) for _, w in run])
        await produce(
            kafka_bootstrap,
            topics.runs,
            [(_key(wf, rid), completion_value(completion(wf, rid, expected=2)), None)],
        )
    async with Running(_config(kafka_bootstrap, clickhouse_dsn, topics)) as running:

        async def built() -> bool:
            rows = await running.rows("SELECT count() FROM workflow_receipts FINAL WHERE complete")
            return rows[0][0] == 2

        await eventually(built, timeout=60)
        stored = await running.rows(
            "SELECT run_id, count(), countIf(trace_id = '' AND chio_receipt = '') "
            "FROM step_receipts GROUP BY run_id ORDER BY run_id"
        )
        report = await running.service.sink.call(lambda c: verify_run(c, wf, keys=KEYS))
        running.check()  # no crash of the loop meanwhile
    assert stored == [("v1", 2, 2), ("v2", 2, 2)]
    assert report.ok, report.summary()
    assert (report.runs, report.steps, report.envelopes) == (2, 4, 2)


async def test_the_siem_exporter_exports_only_steps_whose_chio_receipt_checks(
    kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    """Good v2 and v1 steps are exported; tampered and untrusted ones are not (the builder
    dead-letters them); an envelope embedding a tampered step is dead-lettered by the exporter."""
    topics = await make_topics(kafka_bootstrap, unique, partitions=1)
    wf = unique("wf-siem")
    good = chio_run(wf, "r1", 2, kernel=KERNEL, sidecar=SIDECAR, deny=(1,))
    kernel_only = chio_run(wf, "r2", 1, kernel=KERNEL, sidecar=None)
    legacy = v1_run(wf, "r0", 1, SIDECAR)
    bad = chio_run(wf, "r3", 2, kernel=KERNEL, sidecar=SIDECAR)
    tampered_step = bad[0][0]
    tampered = resign(tampered_step, SIDECAR, chio_receipt=tampered_receipt(tampered_step))
    untrusted = chio_run(wf, "r4", 1, kernel=ROGUE, sidecar=None)
    values = [w for _, w in good + kernel_only + legacy] + [tampered, untrusted[0][1]]
    await produce(kafka_bootstrap, topics.steps, [(_key(wf, "r"), v, None) for v in values])
    # An envelope (signed by a builder) embedding the tampered step's body.
    bodies = [decode_plain(tampered).body, decode_plain(bad[1][1]).body]
    plains = [decode_plain(tampered), decode_plain(bad[1][1])]
    envelope = Envelope(
        namespace="default",
        workflow_id=wf,
        run_id="r3",
        workflow_type="OrderWorkflow",
        parent_workflow_ids=(),
        started_at=1,
        completed_at=2,
        outcome="success",
        revision=1,
        complete=True,
        missing_steps=0,
        expected_steps=2,
        allow_count=2,
        deny_count=0,
        receipt_ids=tuple(str(p.record["receipt_id"]) for p in plains),
        steps=tuple(encode_plain(STEP_SCHEMA, p.record) for p in plains),
        chain_root=chain_root(receipt_hash(b) for b in bodies),
    ).signed_by(BUILDER)
    good_envelope = Envelope(
        **{
            **{f: getattr(envelope, f) for f in ("namespace", "workflow_id", "workflow_type")},
            "run_id": "r1",
            "parent_workflow_ids": (),
            "started_at": 1,
            "completed_at": 2,
            "outcome": "success",
            "revision": 1,
            "complete": True,
            "missing_steps": 0,
            "expected_steps": 2,
            "allow_count": 1,
            "deny_count": 1,
            "receipt_ids": tuple(str(s.receipt_id) for s, _ in good),
            "steps": tuple(decode_plain(w).body for _, w in good),
            "chain_root": b"\x00" * 32,
        }
    ).signed_by(BUILDER)
    await produce(
        kafka_bootstrap,
        topics.envelopes,
        [(_key(wf, "r3"), envelope.framed(), None), (_key(wf, "r1"), good_envelope.framed(), None)],
    )
    out = tmp_path / "ocsf.jsonl"
    config = ExporterConfig(
        kafka=KafkaConnection(bootstrap_servers=kafka_bootstrap),
        output=parse_output(f"jsonl:{out}"),
        group_id=unique("g"),
        topics=topics,
        export_envelopes=True,
        public_keys={SIDECAR.key_id: SIDECAR.public_key},
        trusted_kernel_keys=TRUSTED,
    )
    stop = asyncio.Event()
    async with SiemExporter(config) as exporter:
        task = asyncio.create_task(exporter.run(stop))
        try:

            def refused() -> dict[str, float]:
                return {
                    s.labels["reason"]: s.value
                    for m in exporter.metrics.refused.collect()
                    for s in m.samples
                    if s.name.endswith("_total")
                }

            def done() -> bool:
                assert not task.done(), task
                lines = out.read_text().count("\n") if out.exists() else 0
                return lines >= 5 and sum(refused().values()) >= 3

            await eventually(done, timeout=60)
            await asyncio.sleep(0.5)  # anything more would show now
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        refusals = refused()
    events = [json.loads(line) for line in out.read_text().splitlines()]
    exported = {e["metadata"]["uid"] for e in events}
    expected: list[StepReceipt] = [s for s, _ in good + kernel_only + legacy]
    assert exported == {str(s.receipt_id) for s in expected} | {f"{wf}/r1/1"}
    assert refusals == {"bad_chio_receipt": 2.0, "untrusted_kernel_key": 1.0}
    [dead] = await read_all(kafka_bootstrap, topics.dlq, 1)
    headers = parse_dead_letter_headers(dead.headers)
    assert headers["topic"] == topics.envelopes
    assert headers["reason"] == "bad_chio_receipt"
    assert f"embedded step {tampered_step.receipt_id}" in headers["detail"]
    assert dead.value == envelope.framed()
