"""The consumers' Chio receipt check, the key ring as trust list, rows and OCSF (no broker)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chio_receipts.consumers import (
    KeyRing,
    chio_refusal,
    parse_kernel_keys,
    signed_by,
    step_row,
)
from chio_receipts.consumers._wire import decode_plain
from chio_receipts.consumers.siem import envelope_to_ocsf, step_to_ocsf
from chio_receipts.schemas import KeyPair, Verdict, chio_step_fields
from tests.support.chio_runs import PARAMETERS, chio_run, resign, tampered_receipt, v1_run
from tests.support.http_receiver import Receiver
from tests.support.ocsf import ocsf_errors

SIDECAR = KeyPair.generate("ed25519-00000000000000aa")
KERNEL = KeyPair.generate("kernel")
ROGUE = KeyPair.generate("rogue")
TRUSTED = frozenset({KERNEL.public_key.hex(), SIDECAR.public_key.hex()})


def _record(wire: bytes) -> dict[str, object]:
    return decode_plain(wire).record


@pytest.mark.unit
def test_good_receipts_pass_for_sidecar_and_kernel_signed_steps() -> None:
    for sidecar in (SIDECAR, None):
        for step, wire in chio_run("wf-u", "r1", 3, kernel=KERNEL, sidecar=sidecar, deny=(1,)):
            record = _record(wire)
            assert chio_refusal(record, TRUSTED) is None
            assert signed_by(record) == ("sidecar" if sidecar else "kernel")
            assert step.chio_receipt


@pytest.mark.unit
def test_a_v1_step_has_no_receipt_to_refuse_and_a_step_with_neither_is_unsigned() -> None:
    [(_, wire)] = v1_run("wf-v1", "r1", 1, SIDECAR)
    record = _record(wire)
    assert record["chio_receipt"] == ""
    assert chio_refusal(record, frozenset()) is None
    assert signed_by(record) == "sidecar"
    assert signed_by(record | {"key_id": "", "signature": b""}) == "unsigned"


@pytest.mark.unit
def test_tampered_untrusted_and_moved_receipts_are_refused_with_their_reason() -> None:
    run = chio_run("wf-t", "r1", 2, kernel=KERNEL, sidecar=SIDECAR)
    other = chio_run("wf-other", "r9", 1, kernel=KERNEL, sidecar=SIDECAR)
    step, _ = run[0]
    tampered = _record(resign(step, SIDECAR, chio_receipt=tampered_receipt(step)))
    refusal = chio_refusal(tampered, TRUSTED)
    assert refusal is not None
    assert refusal.reason == "bad_chio_receipt"
    assert "differs from the body" in refusal.detail
    assert refusal.untrusted_key is None

    untrusted = chio_refusal(_record(run[1][1]), frozenset({ROGUE.public_key.hex()}))
    assert untrusted is not None
    assert untrusted.reason == "untrusted_kernel_key"
    assert untrusted.untrusted_key == KERNEL.public_key.hex()

    moved_from = other[0][0]
    moved = _record(
        resign(
            step, SIDECAR, chio_receipt=moved_from.chio_receipt, chio_signed=moved_from.chio_signed
        )
    )
    refusal = chio_refusal(moved, TRUSTED)
    assert refusal is not None
    assert refusal.reason == "bad_chio_receipt"
    assert "not bound to this step's Temporal context" in refusal.detail
    # The same step with its own receipt passes: the refusal is the move, not the step.
    assert chio_refusal(_record(resign(step, SIDECAR)), TRUSTED) is None


@pytest.mark.unit
def test_a_verdict_that_disagrees_with_the_receipt_is_refused() -> None:
    step, _ = chio_run("wf-v", "r1", 1, kernel=KERNEL, sidecar=SIDECAR)[0]
    flipped = dataclasses.replace(step, verdict=Verdict.DENY)
    # verdict is not in the request_id: it is compared with the receipt's decision.
    refusal = chio_refusal(_record(resign(flipped, SIDECAR)), TRUSTED)
    assert refusal is not None
    assert refusal.reason == "bad_chio_receipt"


@pytest.mark.unit
def test_trusted_kernel_keys_are_parsed_strictly() -> None:
    hexkey = KERNEL.public_key.hex()
    assert parse_kernel_keys(["0x" + hexkey.upper(), " ", hexkey]) == {hexkey}
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_kernel_keys(["abc"])
    with pytest.raises(ValueError, match="64 hex digits"):
        parse_kernel_keys(["zz" * 32])


@pytest.mark.unit
def test_the_ring_trusts_its_keys_and_the_configured_kernel_keys() -> None:
    ring = KeyRing(
        {SIDECAR.key_id: SIDECAR.public_key}, trusted_kernel_keys=[KERNEL.public_key.hex()]
    )
    assert ring.trusted_hex == TRUSTED


@pytest.mark.integration
async def test_an_unknown_kernel_key_refreshes_the_ring_once() -> None:
    published = [{"key_id": SIDECAR.key_id, "public_key": SIDECAR.public_key.hex()}]
    async with Receiver(reply=lambda _: json.dumps({"keys": published}).encode()) as server:
        ring = KeyRing({}, url=server.url, min_refresh_interval=0.2)
        assert await ring.refresh()
        assert ring.trusted_hex == {SIDECAR.public_key.hex()}
        rotated = KeyPair.generate("ed25519-00000000000000bb")
        published.append({"key_id": rotated.key_id, "public_key": rotated.public_key.hex()})
        await ring.refresh_for(kernel_keys={rotated.public_key.hex()})
        assert rotated.public_key.hex() in ring.trusted_hex
        assert len(server.requests) == 2
        # A kernel key nobody publishes is looked up once, then only rate-limited.
        await ring.refresh_for(kernel_keys={ROGUE.public_key.hex()})
        assert len(server.requests) == 3
        assert ROGUE.public_key.hex() not in ring.trusted_hex
        await ring.refresh_for(kernel_keys={ROGUE.public_key.hex()})
        assert len(server.requests) == 3  # within the rate limit: no second waiting refresh


@pytest.mark.unit
def test_a_step_row_carries_the_receipt_and_its_analytics_columns() -> None:
    step, wire = chio_run("wf-row", "r1", 1, kernel=KERNEL, sidecar=SIDECAR, deny=(0,))[0]
    row = step_row(_record(wire), wire, 0, 7)
    fields = chio_step_fields(step)
    assert row.chio_receipt == step.chio_receipt
    assert row.chio_signed == step.chio_signed
    assert row.chio_receipt_id == fields.receipt_id != ""
    assert (row.decision, row.guard) == ("deny", "capability")
    assert row.kernel_key == KERNEL.public_key.hex()
    assert (row.receipt_kind, row.trust_level) == ("mediated_decision", "mediated")
    assert row.parameter_hash == fields.parameter_hash != ""
    [(_, v1_wire)] = v1_run("wf-row", "r0", 1, SIDECAR)
    v1_row = step_row(_record(v1_wire), v1_wire, 0, 1)
    assert (v1_row.chio_receipt, v1_row.chio_signed, v1_row.chio_receipt_id) == ("", b"", "")
    assert v1_row.decision == v1_row.kernel_key == ""


@pytest.mark.unit
def test_ocsf_step_events_name_the_receipt_and_never_carry_parameters() -> None:
    run = chio_run("wf-ocsf", "r1", 2, kernel=KERNEL, sidecar=SIDECAR, deny=(1,))
    for step, wire in run:
        event = step_to_ocsf(_record(wire))
        assert ocsf_errors(event) == []
        fields = chio_step_fields(step)
        unmapped = event["unmapped"]
        assert unmapped["chio_receipt_id"] == fields.receipt_id
        assert unmapped["chio_decision"] == fields.decision
        assert unmapped["chio_guard"] == fields.guard
        assert unmapped["kernel_key"] == KERNEL.public_key.hex()
        assert unmapped["policy_hash"] == fields.policy_hash
        [enrichment] = event["enrichments"]
        assert enrichment["name"] == "chio_receipt"
        assert enrichment["value"] == fields.receipt_id
        assert enrichment["data"]["decision"] == fields.decision
        text = json.dumps(event)
        assert "tok_secret_4242" not in text
        assert "parameter" not in text
        assert str(PARAMETERS["order"]["amount"]) not in text
    assert [step_to_ocsf(_record(w))["unmapped"]["chio_decision"] for _, w in run] == [
        "allow",
        "deny",
    ]
    # A v1 step's event has no Chio fields, and stays valid.
    [(_, v1_wire)] = v1_run("wf-ocsf", "r0", 1, SIDECAR)
    v1_event = step_to_ocsf(_record(v1_wire))
    assert "enrichments" not in v1_event
    assert "chio_receipt_id" not in v1_event["unmapped"]
    assert ocsf_errors(v1_event) == []


@pytest.mark.unit
def test_ocsf_envelope_events_list_the_steps_receipts() -> None:
    run = chio_run("wf-env", "r1", 2, kernel=KERNEL, sidecar=None)
    steps = [_record(w) for _, w in run]
    record = {
        "version": "chio-temporal/v1",
        "workflow_id": "wf-env",
        "run_id": "r1",
        "parent_workflow_ids": [],
        "started_at": 1_700_000_000_000_000,
        "completed_at": 1_700_000_001_000_000,
        "outcome": "success",
        "step_count": 2,
        "allow_count": 2,
        "deny_count": 0,
        "steps": steps,
        "metadata": {"namespace": "default", "workflow_type": "OrderWorkflow", "revision": "1"},
    }
    event = envelope_to_ocsf(record)
    assert ocsf_errors(event) == []
    assert event["unmapped"]["chio_receipt_ids"] == [chio_step_fields(s).receipt_id for s, _ in run]
    assert event["unmapped"]["kernel_keys"] == [KERNEL.public_key.hex()]
    assert "tok_secret_4242" not in json.dumps(event)
