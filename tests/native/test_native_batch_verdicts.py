"""The builder's batch verification gives each step (and outcome record) the verdict the
one-by-one check gives.

``_verify_all`` verifies every Ed25519 signature of a poll batch (Avro and Chio) with one native
``verify_batch``; the oracle below checks each step alone with PyNaCl: the Avro signature first,
then ``chio_refusal`` with a PyNaCl signature check. Same verdict, same dead-letter reason and
detail, for every kind of bad step, wherever it sits in the batch.
"""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import nacl.exceptions
import nacl.signing
import pytest

from chio_receipts.consumers._chio import (
    SIDECAR_SIGNED,
    ChioRefusal,
    chio_refusal,
    outcome_refusal,
    signed_by,
)
from chio_receipts.consumers._consumer import _outcome_refusals, _verify_all
from chio_receipts.consumers._dlq import Reason
from chio_receipts.consumers._wire import Plain, decode_plain
from chio_receipts.schemas import (
    KeyPair,
    StepOutcome,
    StepStatus,
    sign_chio_outcome,
    signed_body,
)
from tests.support.chio_runs import chio_run, resign, tampered_receipt, v1_run

pytestmark = pytest.mark.unit

SIDECAR = KeyPair.from_seed("ed25519-00000000000000aa", bytes(range(32)))
KERNEL = KeyPair.from_seed("kernel", bytes(range(1, 33)))
ROGUE = KeyPair.from_seed("rogue", bytes(range(2, 34)))
TRUSTED = frozenset({KERNEL.public_key.hex(), SIDECAR.public_key.hex()})


def _nacl(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def _one_by_one(plain: Plain, key: bytes | None) -> object:
    if key is not None:
        parts = signed_body(plain.body)
        if parts is None or not _nacl(key, *parts):
            return False
    return chio_refusal(plain.record, TRUSTED, _nacl)


def _with_signature(receipt_json: str, signature: str) -> str:
    receipt = json.loads(receipt_json)
    receipt["signature"] = signature
    return json.dumps(receipt, separators=(",", ":"))


def _batch() -> tuple[list[bytes], dict[str, list[int]]]:
    """Wire values of a batch: good steps around one of every bad kind, and where each is."""
    good = [w for _, w in chio_run("wf-good", "r1", 40, kernel=KERNEL, sidecar=SIDECAR)]
    good += [w for _, w in chio_run("wf-kern", "r1", 20, kernel=KERNEL, sidecar=None, deny=(3,))]
    good += [w for _, w in v1_run("wf-v1", "r1", 10, SIDECAR)]
    [(step, _), (step2, _)] = chio_run("wf-bad", "r1", 2, kernel=KERNEL, sidecar=SIDECAR)
    [(rogue, rogue_wire)] = chio_run("wf-rogue", "r1", 1, kernel=ROGUE, sidecar=SIDECAR)
    [(kstep, _)] = chio_run("wf-kbad", "r1", 1, kernel=KERNEL, sidecar=None)
    avro_bad = bytearray(resign(step, SIDECAR))
    avro_bad[-5] ^= 1  # inside the Avro signature
    wrong_sig = KERNEL.sign(b"another message").hex()
    bad = {
        "avro signature": bytes(avro_bad),
        "chio signature": resign(
            step, SIDECAR, chio_receipt=_with_signature(step.chio_receipt, wrong_sig)
        ),
        "chio signature, kernel-signed": resign(
            kstep, None, chio_receipt=_with_signature(kstep.chio_receipt, wrong_sig)
        ),
        "tampered receipt": resign(step2, SIDECAR, chio_receipt=tampered_receipt(step2)),
        "untrusted signer": rogue_wire,
        "untrusted signer, bad signature": resign(
            rogue, SIDECAR, chio_receipt=_with_signature(rogue.chio_receipt, wrong_sig)
        ),
        "signature not hex": resign(
            step, SIDECAR, chio_receipt=_with_signature(step.chio_receipt, "zz")
        ),
    }
    values = list(good)
    where: dict[str, list[int]] = {}
    rng = random.Random(7)
    for wire in bad.values():
        values.insert(rng.randrange(len(values) + 1), wire)
    for name, wire in bad.items():
        where[name] = [i for i, v in enumerate(values) if v == wire]
    return values, where


@pytest.mark.parametrize("repeat", [1, 5])
def test_batch_verdicts_are_the_one_by_one_verdicts(repeat: int) -> None:
    values, where = _batch()
    values = values * repeat
    checks: list[tuple[Plain, bytes | None]] = []
    for wire in values:
        plain = decode_plain(wire)
        key = SIDECAR.public_key if signed_by(plain.record) == SIDECAR_SIGNED else None
        checks.append((plain, key))
    got = _verify_all(checks, TRUSTED)
    expected = [_one_by_one(plain, key) for plain, key in checks]
    assert got == expected
    n = len(values) // repeat
    refused = {i % n for i, verdict in enumerate(got) if verdict is not None}
    assert refused == {i for found in where.values() for i in found}
    first = {name: got[found[0]] for name, found in where.items()}
    assert first["avro signature"] is False
    for name in (
        "chio signature",
        "chio signature, kernel-signed",
        "untrusted signer, bad signature",
        "signature not hex",
    ):
        verdict = first[name]
        assert isinstance(verdict, ChioRefusal), name
        assert verdict.reason == Reason.BAD_CHIO_RECEIPT, name
        assert "signature does not verify" in verdict.detail, name
    tampered = first["tampered receipt"]
    assert isinstance(tampered, ChioRefusal)
    assert tampered.reason == Reason.BAD_CHIO_RECEIPT
    assert "signature" not in tampered.detail
    untrusted = first["untrusted signer"]
    assert isinstance(untrusted, ChioRefusal)
    assert untrusted.reason == Reason.UNTRUSTED_KERNEL_KEY
    assert untrusted.untrusted_key == ROGUE.public_key.hex()


def _outcome(i: int, **overrides: object) -> StepOutcome:
    fields: dict[str, object] = {
        "outcome_id": f"0190c0de-0000-7000-8000-{i:012d}",
        "namespace": "default",
        "workflow_id": f"order-{i // 4}",
        "run_id": "run-1",
        "workflow_type": "OrderWorkflow",
        "task_queue": "orders",
        "activity_id": str(i % 4),
        "activity_type": "charge_card",
        "attempt": 1,
        "is_local": False,
        "tool_server": "payments",
        "tool": "charge_card",
        "capability_id": "cap-1",
        "decision_receipt_id": "0190c0de-0000-7000-8000-0000000000aa",
        "decision_chio_id": "ab" * 32,
        "status": StepStatus.COMPLETED,
        "error_type": "",
        "started_at": 1_763_000_000_000_000,
        "ended_at": 1_763_000_000_250_000,
        "duration_us": 250_000,
        "result_digest": "",
        "result_key_id": "hmac-1",
        "worker_identity": "worker-1@host",
        "trace_id": "",
        "span_id": "",
    }
    fields.update(overrides)
    return StepOutcome(**fields)  # type: ignore[arg-type]


def _signed(i: int, key: KeyPair) -> StepOutcome:
    return sign_chio_outcome(_outcome(i), key, policy_hash="11" * 32)


def test_outcome_batch_verdicts_are_the_one_by_one_verdicts() -> None:
    records = [_signed(i, KERNEL) for i in range(300)]
    wrong_sig = KERNEL.sign(b"another message").hex()
    rogue = _signed(41, ROGUE)
    bad = {
        17: dataclasses.replace(
            records[17], chio_receipt=_with_signature(records[17].chio_receipt, wrong_sig)
        ),
        40: _signed(40, ROGUE),
        41: dataclasses.replace(rogue, chio_receipt=_with_signature(rogue.chio_receipt, wrong_sig)),
        99: dataclasses.replace(records[99], error_type="rewritten"),
        250: _outcome(250),  # unsigned: not refused here
    }
    for i, outcome in bad.items():
        records[i] = outcome
    messages = [SimpleNamespace(plain=SimpleNamespace(record=o.to_avro())) for o in records]
    got = _outcome_refusals(messages, TRUSTED)
    expected = [outcome_refusal(m.plain.record, TRUSTED, _nacl) for m in messages]
    assert got == expected
    assert {i for i, r in enumerate(got) if r is not None} == {17, 40, 41, 99}
    for i in (17, 41):
        assert got[i] is not None
        assert got[i].reason == Reason.BAD_CHIO_RECEIPT
        assert "signature does not verify" in got[i].detail
    assert got[40] is not None
    assert got[40].reason == Reason.UNTRUSTED_KERNEL_KEY
    assert got[99] is not None
    assert "signature" not in got[99].detail
