"""``verify``: check a workflow's receipts from ClickHouse rows alone.

For every step row: the signature over the stored message (``wire``), then every column against
that signed message (so a changed field is named), duplicates, and the chain (every non-empty
``prev_hash`` must be the hash of a step of the same run). For the run's current envelope: the
steps it lists exist, are in receipt-id order and match its counts, the chain root, and the
builder's signature over the canonical envelope rebuilt from the rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.exceptions import ClickHouseError

from chio_receipts.consumers._clickhouse import (
    BINARY_FORMATS,
    ENVELOPE_SELECT,
    STEP_SELECT,
    translate,
)
from chio_receipts.consumers._envelope import verify_envelope_signature
from chio_receipts.consumers._rows import (
    STEP_FIELDS,
    envelope_from_row,
    plain_from_row,
    receipt_from_row,
)
from chio_receipts.consumers._wire import (
    STEP_SCHEMA,
    decode_plain,
    encode_plain,
    envelope_step_body,
)
from chio_receipts.schemas import DecodeError, chain_root, receipt_hash, verify_body, verify_receipt

__all__ = ["VerifyReport", "verify_run"]


@dataclass(slots=True, kw_only=True)
class VerifyReport:
    """What ``verify`` found: ``problems`` is empty when everything checks out."""

    workflow_id: str
    run_id: str | None
    runs: int = 0
    steps: int = 0
    envelopes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (and there was something to check)."""
        return not self.problems and self.runs > 0

    def summary(self) -> str:
        """One line for OK, else one line per problem."""
        if self.ok:
            return (
                f"OK: {self.runs} run(s), {self.steps} step(s), {self.envelopes} envelope(s) "
                f"of workflow {self.workflow_id} verified"
            )
        if self.runs == 0:
            return f"NOT FOUND: no receipts for workflow {self.workflow_id}"
        return "\n".join(f"FAIL: {p}" for p in self.problems)


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex() or "''"
    return repr(value)


def verify_run(
    client: Any,
    workflow_id: str,
    run_id: str | None = None,
    *,
    keys: Mapping[str, bytes],
) -> VerifyReport:
    """Verify the receipts of ``workflow_id`` (one run when ``run_id`` is given).

    ``client`` is a clickhouse-connect client; ``keys`` maps key id to Ed25519 public key for
    the workers' receipt keys and the builder's envelope key."""
    report = VerifyReport(workflow_id=workflow_id, run_id=run_id)
    where = "workflow_id = {wf:String}" + (" AND run_id = {run:String}" if run_id else "")
    params = {"wf": workflow_id, "run": run_id or ""}
    try:
        step_rows = client.query(
            f"SELECT {STEP_SELECT} FROM step_receipts WHERE {where}",  # noqa: S608 - bound params
            parameters=params,
            column_formats=BINARY_FORMATS,
        ).result_rows
        env_rows = client.query(
            f"SELECT {ENVELOPE_SELECT} FROM workflow_receipts WHERE {where} "  # noqa: S608
            "ORDER BY revision DESC LIMIT 1 BY namespace, workflow_id, run_id",
            parameters=params,
            column_formats=BINARY_FORMATS,
        ).result_rows
    except (ClickHouseError, OSError, ValueError) as exc:
        raise translate(exc, "verify") from exc
    by_run: dict[str, list[Sequence[Any]]] = {}
    for row in step_rows:
        by_run.setdefault(row[3], []).append(row)
    envelopes = {row[2]: row for row in env_rows}
    for rid in sorted(set(by_run) | set(envelopes)):
        report.runs += 1
        _verify_one(report, rid, by_run.get(rid, []), envelopes.get(rid), keys)
    return report


def _verify_one(
    report: VerifyReport,
    rid: str,
    rows: list[Sequence[Any]],
    env: Sequence[Any] | None,
    keys: Mapping[str, bytes],
) -> None:
    problems = report.problems
    bodies: dict[str, bytes] = {}
    hashes: dict[str, bytes] = {}
    counts = Counter(str(r[0]) for r in rows)
    for receipt_id, n in sorted(counts.items()):
        if n > 1:
            problems.append(f"run {rid}: receipt {receipt_id} has {n} rows (duplicate)")
    for row in rows:
        report.steps += 1
        receipt_id = str(row[0])
        label = f"run {rid}: receipt {receipt_id} (activity {row[6]} attempt {row[8]})"
        wire = bytes(row[len(STEP_FIELDS)])
        columns = plain_from_row(row)
        if wire:
            try:
                plain = decode_plain(wire)
            except DecodeError as exc:
                problems.append(f"{label}: stored message does not decode ({exc})")
                continue
            public_key = keys.get(str(plain.record["key_id"]))
            if public_key is None:
                problems.append(f"{label}: unknown signing key {plain.record['key_id']!r}")
            elif not verify_body(plain.body, public_key):
                problems.append(f"{label}: signature invalid (the stored message was altered)")
            for name in STEP_FIELDS:
                if plain.record[name] != columns[name]:
                    problems.append(
                        f"{label}: field {name} changed: signed value {_fmt(plain.record[name])}, "
                        f"row has {_fmt(columns[name])}"
                    )
            bodies[receipt_id] = envelope_step_body(plain)
            hashes[receipt_id] = receipt_hash(plain.body)
        else:
            receipt = receipt_from_row(row)
            if not verify_receipt(receipt, keys):
                problems.append(f"{label}: signature invalid (a field of the row was changed)")
            body = encode_plain(STEP_SCHEMA, columns)
            bodies[receipt_id] = body
            hashes[receipt_id] = receipt_hash(body)
    known = set(hashes.values())
    for row in rows:
        prev = bytes(row[27])
        if prev and prev not in known:
            problems.append(
                f"run {rid}: receipt {row[0]} refers to previous step {prev.hex()[:16]}... "
                "which is not among the run's rows (a step row is missing or was altered)"
            )
    if env is None:
        if rows:
            problems.append(f"run {rid}: no envelope ({len(rows)} step rows, run still open?)")
        return
    report.envelopes += 1
    listed = [str(r) for r in env[15]]
    revision = env[11]
    tag = f"run {rid}: envelope revision {revision}"
    if listed != sorted(listed):
        problems.append(f"{tag}: steps are not in receipt-id order (reordered)")
    if int(env[8]) != len(listed):
        problems.append(f"{tag}: step_count {env[8]} but it lists {len(listed)} steps")
    missing = [r for r in listed if r not in bodies]
    for receipt_id in missing:
        problems.append(f"{tag}: step {receipt_id} has no row (deleted)")
    extra = sorted(set(bodies) - set(listed))
    for receipt_id in extra:
        problems.append(
            f"{tag}: row {receipt_id} is not in the envelope (inserted, or a late step "
            "not yet enveloped)"
        )
    if missing:
        return
    verdicts = {str(r[0]): str(r[18]) for r in rows}
    allow = sum(1 for r in listed if verdicts.get(r) == "ALLOW")
    deny = sum(1 for r in listed if verdicts.get(r) == "DENY")
    if (allow, deny) != (int(env[9]), int(env[10])):
        problems.append(
            f"{tag}: allow/deny counts {env[9]}/{env[10]} but its steps say {allow}/{deny}"
        )
    root = chain_root(hashes[r] for r in listed)
    if root != bytes(env[16]):
        problems.append(f"{tag}: chain_root does not match its steps")
    envelope = envelope_from_row(env, [bodies[r] for r in listed])
    builder_key = keys.get(envelope.key_id)
    if builder_key is None:
        problems.append(f"{tag}: unknown builder key {envelope.key_id!r}")
    elif not verify_envelope_signature(envelope, builder_key):
        problems.append(f"{tag}: builder signature invalid (the envelope row was altered)")
