"""Runs of v2 steps carrying Chio kernel receipts, and v1 steps as the released schema wrote them
(no services)."""

from __future__ import annotations

import dataclasses
import io
import json
from importlib import resources
from typing import Any

import fastavro

from chio_receipts.schemas import (
    SINGLE_OBJECT_MAGIC,
    KeyPair,
    StepReceipt,
    Verdict,
    frame,
    receipt_hash,
    schema_fingerprint,
    sign_receipt,
    step_body,
)
from tests.support.chio_steps import with_chio_receipt
from tests.support.consumer_factory import STEP, receipt

PARAMETERS = {"order": {"card": "tok_secret_4242", "amount": 12.5}}
"""Call parameters the receipts carry; a SIEM event must never show them."""


def chio_step(
    step: StepReceipt, kernel: KeyPair, sidecar: KeyPair | None
) -> tuple[StepReceipt, bytes]:
    """``step`` with a Chio receipt signed by ``kernel``, then Avro-signed by ``sidecar`` (or,
    with ``sidecar`` None, kernel-signed only: empty key_id and signature); (step, body)."""
    step = with_chio_receipt(step, kernel, parameters=PARAMETERS)
    if sidecar is None:
        return step, step_body(step)
    return sign_receipt(step, sidecar)


def chio_run(
    workflow_id: str,
    run_id: str,
    n: int,
    *,
    kernel: KeyPair,
    sidecar: KeyPair | None,
    deny: tuple[int, ...] = (),
) -> list[tuple[StepReceipt, bytes]]:
    """``n`` chained v2 steps of one run: (step, framed wire value)."""
    out: list[tuple[StepReceipt, bytes]] = []
    prev = b""
    for i in range(n):
        verdict = Verdict.DENY if i in deny else Verdict.ALLOW
        step, body = chio_step(
            receipt(workflow_id, run_id, i, verdict=verdict, prev_hash=prev), kernel, sidecar
        )
        prev = receipt_hash(body)
        out.append((step, frame(STEP, body)))
    return out


def resign(step: StepReceipt, sidecar: KeyPair | None, **changes: Any) -> bytes:
    """The framed wire value of ``step`` changed by ``changes`` and signed again by ``sidecar``
    (the Chio receipt left as it is, so only its own check can notice)."""
    changed = dataclasses.replace(step, **changes)
    if sidecar is None:
        return frame(STEP, step_body(dataclasses.replace(changed, key_id="", signature=b"")))
    return frame(STEP, sign_receipt(changed, sidecar)[1])


def tampered_receipt(step: StepReceipt) -> str:
    """``step``'s Chio receipt JSON with the decision's reason changed (id and signature kept)."""
    receipt_json = json.loads(step.chio_receipt)
    receipt_json["decision"]["reason"] = "rewritten after signing"
    return json.dumps(receipt_json, separators=(",", ":"))


def _released_step_schema(version: int) -> Any:
    text = (
        resources.files("chio_receipts.schemas")
        .joinpath("avro", "released", f"step_receipt.v{version}.avsc")
        .read_text("utf-8")
    )
    return fastavro.parse_schema(json.loads(text), named_schemas={})


def released_run(
    workflow_id: str, run_id: str, n: int, key: KeyPair, *, version: int
) -> list[tuple[StepReceipt, bytes]]:
    """``n`` chained steps as a writer of the released ``StepReceipt`` v``version`` sent them:
    (step, framed wire value), signed over that version's encoding."""
    schema = _released_step_schema(version)
    names = {f["name"] for f in schema["fields"]}
    magic = SINGLE_OBJECT_MAGIC + schema_fingerprint(schema)
    out: list[tuple[StepReceipt, bytes]] = []
    prev = b""
    for i in range(n):
        step = receipt(workflow_id, run_id, i, prev_hash=prev)
        record = {k: v for k, v in step.to_avro().items() if k in names}
        record["key_id"], record["signature"] = key.key_id, b""
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, record)
        unsigned = buf.getvalue()
        signature = key.sign(unsigned)
        body = unsigned[:-1] + b"\x80\x01" + signature
        prev = receipt_hash(body)
        out.append((step.with_signature(key_id=key.key_id, signature=signature), magic + body))
    return out


def v1_run(workflow_id: str, run_id: str, n: int, key: KeyPair) -> list[tuple[StepReceipt, bytes]]:
    """``n`` chained steps as a v1 writer sent them: (step, framed v1 wire value)."""
    return released_run(workflow_id, run_id, n, key, version=1)
