"""``verify``: check a workflow's receipts from ClickHouse rows alone.

Rows are read as typed records built by column name (:mod:`._rows`), and each run goes through
three checks:

* **steps**: duplicates; for every step row the signature over the stored message (``wire``),
  then every column against that signed message (so a changed field is named); a row without
  ``wire`` is verified by re-encoding its columns; a step carrying a Chio kernel receipt (schema
  v2) must also pass ``schemas.check_chio_step`` under the trusted keys, and a kernel-signed
  step (no ``key_id``, no signature) is verified by its Chio receipt alone;
* **chain**: every non-empty ``prev_hash`` is the hash of a step of the same run;
* **envelope**: the run's current envelope lists exactly the step rows (none missing, none
  extra, in receipt-id order, counts and chain root matching), and the builder's signature over
  the canonical envelope rebuilt from the rows holds. The envelope embeds exactly the steps' signed
  bodies, so each embedded step's Chio receipt is the one the steps check verified.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.exceptions import ClickHouseError

from chio_receipts.consumers._chio import KERNEL_SIGNED, UNSIGNED, chio_refusal, signed_by
from chio_receipts.consumers._clickhouse import select_envelopes, select_steps, translate
from chio_receipts.consumers._envelope import verify_envelope_signature
from chio_receipts.consumers._rows import (
    STEP_FIELDS,
    EnvelopeRow,
    StepRow,
    chio_columns,
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


_UNSIGNED = "unsigned step (neither an Avro signature nor a Chio receipt)"


def verify_run(
    client: Any,
    workflow_id: str,
    run_id: str | None = None,
    *,
    keys: Mapping[str, bytes],
    trusted_kernel_keys: Collection[str] | None = None,
) -> VerifyReport:
    """Verify the receipts of ``workflow_id`` (one run when ``run_id`` is given).

    ``client`` is a clickhouse-connect client; ``keys`` maps key id to Ed25519 public key for
    the workers' receipt keys and the builder's envelope key. ``trusted_kernel_keys`` (lowercase
    hex) are the signers of Chio receipts to trust; by default every key of ``keys``."""
    trusted = (
        frozenset(k.hex() for k in keys.values())
        if trusted_kernel_keys is None
        else frozenset(trusted_kernel_keys)
    )
    report = VerifyReport(workflow_id=workflow_id, run_id=run_id)
    where = "workflow_id = {wf:String}" + (" AND run_id = {run:String}" if run_id else "")
    params = {"wf": workflow_id, "run": run_id or ""}
    try:
        step_rows = select_steps(client, where, params)
        env_rows = select_envelopes(client, where, params)
    except (ClickHouseError, OSError, ValueError, KeyError) as exc:
        raise translate(exc, "verify") from exc
    by_run: dict[str, list[StepRow]] = {}
    for row in step_rows:
        by_run.setdefault(row.run_id, []).append(row)
    envelopes = {env.run_id: env for env in env_rows}
    for rid in sorted(set(by_run) | set(envelopes)):
        report.runs += 1
        rows = by_run.get(rid, [])
        signed = _check_steps(report, rid, rows, keys, trusted)
        _check_chain(report, rid, rows, signed)
        env = envelopes.get(rid)
        if env is None:
            if rows:
                report.problems.append(
                    f"run {rid}: no envelope ({len(rows)} step rows, run still open?)"
                )
            continue
        report.envelopes += 1
        _check_envelope(report, rid, env, rows, signed, keys)
    return report


@dataclass(frozen=True, slots=True, kw_only=True)
class _Signed:
    """What a step row was signed as: its envelope step body and its receipt hash."""

    body: bytes
    hash: bytes


def _check_steps(
    report: VerifyReport,
    rid: str,
    rows: list[StepRow],
    keys: Mapping[str, bytes],
    trusted: frozenset[str],
) -> dict[str, _Signed]:
    """Duplicates, then each step's signatures and columns; returns the signed bodies and
    hashes of the rows that decode, by receipt id."""
    problems = report.problems
    signed: dict[str, _Signed] = {}
    counts = Counter(row.receipt_id for row in rows)
    for receipt_id, n in sorted(counts.items()):
        if n > 1:
            problems.append(f"run {rid}: receipt {receipt_id} has {n} rows (duplicate)")
    for row in rows:
        report.steps += 1
        label = (
            f"run {rid}: receipt {row.receipt_id} "
            f"(activity {row.activity_id} attempt {row.attempt})"
        )
        columns = plain_from_row(row)
        if row.wire:
            try:
                plain = decode_plain(row.wire)
            except DecodeError as exc:
                problems.append(f"{label}: stored message does not decode ({exc})")
                continue
            record = plain.record
            how = signed_by(record)
            public_key = keys.get(str(record["key_id"]))
            if how is KERNEL_SIGNED:
                pass  # its only signature is the Chio receipt, checked below
            elif how is UNSIGNED:
                problems.append(f"{label}: {_UNSIGNED}")
            elif public_key is None:
                problems.append(f"{label}: unknown signing key {record['key_id']!r}")
            elif not verify_body(plain.body, public_key):
                problems.append(f"{label}: signature invalid (the stored message was altered)")
            _check_chio(problems, label, record, trusted)
            for name in STEP_FIELDS:
                if record[name] != columns[name]:
                    problems.append(
                        f"{label}: field {name} changed: signed value {_fmt(record[name])}, "
                        f"row has {_fmt(columns[name])}"
                    )
            if record["chio_receipt"] == row.chio_receipt:
                _check_chio_columns(problems, label, record, row)
            signed[row.receipt_id] = _Signed(
                body=envelope_step_body(plain), hash=receipt_hash(plain.body)
            )
        else:
            row_how = signed_by(columns)
            if row_how is UNSIGNED:
                problems.append(f"{label}: {_UNSIGNED}")
            elif row_how is not KERNEL_SIGNED and not verify_receipt(receipt_from_row(row), keys):
                problems.append(f"{label}: signature invalid (a field of the row was changed)")
            _check_chio(problems, label, columns, trusted)
            _check_chio_columns(problems, label, columns, row)
            body = encode_plain(STEP_SCHEMA, columns)
            signed[row.receipt_id] = _Signed(body=body, hash=receipt_hash(body))
    return signed


def _check_chio(
    problems: list[str], label: str, record: Mapping[str, Any], trusted: frozenset[str]
) -> None:
    """The step's Chio receipt, when it carries one, checks under ``trusted``."""
    refusal = chio_refusal(record, trusted)
    if refusal is not None:
        problems.append(f"{label}: Chio receipt refused ({refusal.reason}): {refusal.detail}")


def _check_chio_columns(
    problems: list[str], label: str, record: Mapping[str, Any], row: StepRow
) -> None:
    """The Chio analytics columns are the signed receipt's."""
    try:
        expected = chio_columns(record)
    except (ValueError, AttributeError, TypeError):
        return  # an unreadable receipt was reported by the Chio check
    for name, value in expected.items():
        got = getattr(row, name)
        if got != value:
            problems.append(
                f"{label}: column {name} changed: the signed Chio receipt says {value!r}, "
                f"row has {got!r}"
            )


def _check_chain(
    report: VerifyReport, rid: str, rows: list[StepRow], signed: Mapping[str, _Signed]
) -> None:
    """Every non-empty ``prev_hash`` names a step of the same run."""
    known = {s.hash for s in signed.values()}
    for row in rows:
        if row.prev_hash and row.prev_hash not in known:
            report.problems.append(
                f"run {rid}: receipt {row.receipt_id} refers to previous step "
                f"{row.prev_hash.hex()[:16]}... which is not among the run's rows "
                "(a step row is missing or was altered)"
            )


def _check_envelope(
    report: VerifyReport,
    rid: str,
    env: EnvelopeRow,
    rows: list[StepRow],
    signed: Mapping[str, _Signed],
    keys: Mapping[str, bytes],
) -> None:
    """The envelope's steps equal the run's rows, and its builder signature holds."""
    problems = report.problems
    listed = list(env.receipt_ids)
    tag = f"run {rid}: envelope revision {env.revision}"
    if listed != sorted(listed):
        problems.append(f"{tag}: steps are not in receipt-id order (reordered)")
    if env.step_count != len(listed):
        problems.append(f"{tag}: step_count {env.step_count} but it lists {len(listed)} steps")
    missing = [r for r in listed if r not in signed]
    for receipt_id in missing:
        problems.append(f"{tag}: step {receipt_id} has no row (deleted)")
    for receipt_id in sorted(set(signed) - set(listed)):
        problems.append(
            f"{tag}: row {receipt_id} is not in the envelope (inserted, or a late step "
            "not yet enveloped)"
        )
    if missing:
        return
    verdicts = {row.receipt_id: row.verdict for row in rows}
    allow = sum(1 for r in listed if verdicts.get(r) == "ALLOW")
    deny = sum(1 for r in listed if verdicts.get(r) == "DENY")
    if (allow, deny) != (env.allow_count, env.deny_count):
        problems.append(
            f"{tag}: allow/deny counts {env.allow_count}/{env.deny_count} "
            f"but its steps say {allow}/{deny}"
        )
    if chain_root(signed[r].hash for r in listed) != env.chain_root:
        problems.append(f"{tag}: chain_root does not match its steps")
    envelope = envelope_from_row(env, [signed[r].body for r in listed])
    builder_key = keys.get(envelope.key_id)
    if builder_key is None:
        problems.append(f"{tag}: unknown builder key {envelope.key_id!r}")
    elif not verify_envelope_signature(envelope, builder_key):
        problems.append(f"{tag}: builder signature invalid (the envelope row was altered)")
