"""The builder's per-run state machine and the envelope encoding (pure)."""

from __future__ import annotations

import io

import fastavro
import pytest

from chio_receipts.consumers import Envelope, ReceiptBuilder, StepEntry, verify_envelope_signature
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA
from chio_receipts.schemas import (
    KeyPair,
    chain_root,
    encode_body,
    parsed_schema,
    receipt_hash,
    step_body,
)
from tests.support.consumer_factory import completion, signed_run

pytestmark = pytest.mark.unit
KEY = KeyPair.generate("worker-1")
GRACE = 5_000_000


def _entry(receipt, wire: bytes) -> StepEntry:
    body = wire[10:]
    return StepEntry(receipt.receipt_id, receipt.verdict.value, body, receipt_hash(body))


def _setup(n: int = 3):
    b = ReceiptBuilder(grace_us=GRACE, evict_after_us=60_000_000)
    run = b.open_run("default/wf/run", "default", "wf", "run", 0)
    b.hydrate(run, [])
    return b, run, [_entry(r, w) for r, w in signed_run(KEY, "wf", "run", n, deny=(1,))]


def test_complete_run_is_written_once_with_counts_and_root() -> None:
    b, run, entries = _setup(3)
    for e in entries:
        assert b.add_step(run, e, 1)
    assert list(b.due(2)) == []  # no completion yet
    b.add_completion(run, completion("wf", "run", expected=3), offset=7, now_us=2)
    assert b.pending_offset(0) == 7
    [(same, env)] = list(b.due(3))
    assert same is run
    assert (env.revision, env.complete, env.missing_steps) == (1, True, 0)
    assert (env.step_count, env.allow_count, env.deny_count) == (3, 2, 1)
    ordered = sorted(entries, key=lambda e: e.receipt_id)
    assert env.receipt_ids == tuple(e.receipt_id for e in ordered)
    assert env.chain_root == chain_root(e.hash for e in ordered)
    b.mark_written(run, env, 4)
    assert b.pending_offset(0) is None
    assert list(b.due(5)) == []


def test_duplicate_steps_are_ignored() -> None:
    b, run, entries = _setup(2)
    assert b.add_step(run, entries[0], 1)
    assert not b.add_step(run, entries[0], 2)
    assert len(run.steps) == 1


def test_grace_period_gives_incomplete_envelope_then_late_step_gives_revision_2() -> None:
    b, run, entries = _setup(3)
    for e in entries[:2]:
        b.add_step(run, e, 1)
    b.add_completion(run, completion("wf", "run", expected=3), offset=1, now_us=10)
    assert list(b.due(10 + GRACE - 1)) == []  # still inside the grace period
    [(_, env)] = list(b.due(10 + GRACE))
    assert (env.revision, env.complete, env.missing_steps, env.step_count) == (1, False, 1, 2)
    b.mark_written(run, env, 10 + GRACE)
    b.add_step(run, entries[2], 20 + GRACE)
    [(_, env2)] = list(b.due(21 + GRACE))
    assert (env2.revision, env2.complete, env2.missing_steps, env2.step_count) == (2, True, 0, 3)


def test_duplicate_completion_is_ignored() -> None:
    b, run, entries = _setup(1)
    b.add_step(run, entries[0], 1)
    assert b.add_completion(run, completion("wf", "run", expected=1), offset=1, now_us=2)
    [(_, env)] = list(b.due(3))
    b.mark_written(run, env, 3)
    assert not b.add_completion(run, completion("wf", "run", expected=1), offset=2, now_us=4)
    assert list(b.due(5)) == []
    assert run.revision == 1


def test_rehydrated_run_with_same_steps_is_not_rewritten() -> None:
    b, run, entries = _setup(2)
    for e in entries:
        b.add_step(run, e, 1)
    b.add_completion(run, completion("wf", "run", expected=2), offset=1, now_us=1)
    [(_, env)] = list(b.due(2))
    # A restarted builder: same steps from storage, revision 1 already written.
    b2 = ReceiptBuilder(grace_us=GRACE, evict_after_us=1)
    run2 = b2.open_run(run.key, "default", "wf", "run", 0)
    b2.hydrate(run2, entries, revision=1, written_root=env.chain_root, written_complete=True)
    b2.add_completion(run2, completion("wf", "run", expected=2), offset=1, now_us=3)
    assert list(b2.due(4)) == []
    assert b2.pending_offset(0) is None


def test_eviction_keeps_pending_runs_and_drops_written_ones() -> None:
    b, run, entries = _setup(1)
    b.add_step(run, entries[0], 1)
    b.add_completion(run, completion("wf", "run", expected=2), offset=1, now_us=1)
    assert b.evict(10**12) == 0  # completion pending: kept
    [(_, env)] = list(b.due(1 + GRACE))
    b.mark_written(run, env, 1 + GRACE)
    assert b.evict(1 + GRACE + 60_000_001) == 1
    assert len(b) == 0


def test_drop_partitions_forgets_revoked_runs() -> None:
    b, run, entries = _setup(1)
    b.add_step(run, entries[0], 1)
    b.drop_partitions([0])
    assert b.get(run.key) is None


def test_envelope_body_is_the_avro_encoding_and_signature_verifies() -> None:
    b, run, entries = _setup(3)
    for e in entries:
        b.add_step(run, e, 1)
    b.add_completion(run, completion("wf", "run", expected=3), offset=1, now_us=2)
    [(_, env)] = list(b.due(3))
    builder_key = KeyPair.generate("builder")
    signed = env.signed_by(builder_key)
    assert (env.key_id, env.signature, env.encoded) == ("", b"", b"")  # a copy is signed
    assert len(signed.signature) == 64
    assert signed.key_id == builder_key.key_id
    body = signed.avro_body()
    record = fastavro.schemaless_reader(io.BytesIO(body), parsed_schema(ENVELOPE_SCHEMA), None)
    assert record["version"] == "chio-temporal/v1"
    assert [str(s["receipt_id"]) for s in record["steps"]] == list(signed.receipt_ids)
    assert record["metadata"]["signature"] == signed.signature.hex()
    assert record["metadata"]["chain_root"] == signed.chain_root.hex()
    assert encode_body(ENVELOPE_SCHEMA, record) == body  # splice == fastavro's own encoding
    assert verify_envelope_signature(signed, builder_key.public_key)
    tampered = Envelope(**{**_fields(signed), "deny_count": 0})
    assert not verify_envelope_signature(tampered, builder_key.public_key)
    doc = signed.to_json()
    assert set(doc) == {
        "version",
        "workflow_id",
        "run_id",
        "parent_workflow_ids",
        "started_at",
        "completed_at",
        "outcome",
        "step_count",
        "allow_count",
        "deny_count",
        "steps",
        "metadata",
        "outcomes",
        "attempts",
    }
    assert doc["outcome"] == "success"
    assert {
        "namespace",
        "workflow_type",
        "revision",
        "complete",
        "missing_steps",
        "chain_root",
        "key_id",
        "signature",
    } <= set(doc["metadata"])


def _fields(env: Envelope) -> dict:
    return {name: getattr(env, name) for name in Envelope.__dataclass_fields__}


def test_step_bodies_in_envelope_equal_schemas_encoding() -> None:
    [(r, wire)] = signed_run(KEY, "wf", "run", 1)
    assert wire[10:] == step_body(r)
