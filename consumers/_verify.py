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
  bodies, so each embedded step's Chio receipt is the one the steps check verified;
* **outcome records** (``step_outcomes``): duplicates; every column against the stored message;
  the record's Chio receipt (``schemas.check_chio_outcome``) under the trusted keys; a record
  after a decision (any status but GATE_FAILED) names a decision receipt of the same run and
  attempt, and that decision's Chio receipt id. An unsigned record is reported as a note, not a
  failure (a gate failure the sidecar could not sign);
* **attempts**: the envelope lists exactly the run's outcome records (in envelope order, embedded
  in the signed bytes), its attempt accounts are what the rows give, and every attempt accounted
  ``MISSING`` (a receipt that should exist and does not) is named as a failure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.exceptions import ClickHouseError

from chio_receipts.consumers._approvals import ApprovalFinding, ApprovalStep, check_approvals
from chio_receipts.consumers._builder import OutcomeEntry, account_attempts, outcome_order
from chio_receipts.consumers._chio import (
    KERNEL_SIGNED,
    UNSIGNED,
    chio_refusal,
    outcome_refusal,
    signed_by,
)
from chio_receipts.consumers._clickhouse import (
    select_envelopes,
    select_outcomes,
    select_steps,
    translate,
)
from chio_receipts.consumers._envelope import verify_envelope_signature
from chio_receipts.consumers._rows import (
    OUTCOME_FIELDS,
    STEP_FIELDS,
    EnvelopeRow,
    OutcomeRow,
    StepRow,
    chio_columns,
    envelope_from_row,
    expected_from_accounts,
    outcome_body,
    outcome_columns,
    outcome_plain_from_row,
    plain_from_row,
    receipt_from_row,
)
from chio_receipts.consumers._wire import (
    STEP_OUTCOME_SCHEMA,
    STEP_SCHEMA,
    Plain,
    decode_plain,
    encode_plain,
    envelope_step_body,
)
from chio_receipts.schemas import (
    AccountState,
    Codec,
    DecodeError,
    RegistryError,
    StepStatus,
    chain_root,
    receipt_hash,
    verify_body,
    verify_receipt,
)

__all__ = ["VerifyReport", "verify_run"]


@dataclass(slots=True, kw_only=True)
class VerifyReport:
    """What ``verify`` found: ``problems`` is empty when everything checks out."""

    workflow_id: str
    run_id: str | None
    runs: int = 0
    steps: int = 0
    outcomes: int = 0
    attempts: int = 0
    envelopes: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What is worth knowing but not wrong: unsigned outcome records."""
    missing: list[tuple[str, str, str, int]] = field(default_factory=list)
    """Every attempt accounted MISSING: (workflow id, run id, activity id, attempt)."""
    approvals: list[ApprovalFinding] = field(default_factory=list)
    """Every approval the runs' steps carry: the request, and the signed answer once used."""

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (and there was something to check)."""
        return not self.problems and self.runs > 0

    def summary(self) -> str:
        """One line for OK, else one line per problem; then one line per note."""
        notes = [f"NOTE: {n}" for n in self.notes]
        if self.ok:
            attempts = f", {self.attempts} attempt(s) accounted" if self.attempts else ""
            if self.approvals:
                answered = sum(1 for a in self.approvals if a.outcome)
                attempts += f", {answered}/{len(self.approvals)} approval(s) answered"
            return "\n".join(
                [
                    f"OK: {self.runs} run(s), {self.steps} step(s), {self.outcomes} outcome "
                    f"record(s), {self.envelopes} envelope(s){attempts} of workflow "
                    f"{self.workflow_id} verified",
                    *notes,
                ]
            )
        if self.runs == 0:
            return f"NOT FOUND: no receipts for workflow {self.workflow_id}"
        return "\n".join([*(f"FAIL: {p}" for p in self.problems), *notes])


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
    codec: Codec | None = None,
) -> VerifyReport:
    """Verify the receipts of ``workflow_id`` (one run when ``run_id`` is given).

    ``client`` is a clickhouse-connect client; ``keys`` maps key id to Ed25519 public key for
    the workers' receipt keys and the builder's envelope key. ``trusted_kernel_keys`` (lowercase
    hex) are the signers of Chio receipts to trust; by default every key of ``keys``.
    ``codec`` (with a schema registry) reads stored Confluent-framed messages whose writer schema
    is not the current one: their writer schema is fetched by id."""
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
        outcome_rows = select_outcomes(client, where, params)
        env_rows = select_envelopes(client, where, params)
    except (ClickHouseError, OSError, ValueError, KeyError) as exc:
        raise translate(exc, "verify") from exc
    by_run: dict[str, list[StepRow]] = {}
    for row in step_rows:
        by_run.setdefault(row.run_id, []).append(row)
    outcomes_by_run: dict[str, list[OutcomeRow]] = {}
    for outcome in outcome_rows:
        outcomes_by_run.setdefault(outcome.run_id, []).append(outcome)
    envelopes = {env.run_id: env for env in env_rows}
    for rid in sorted(set(by_run) | set(envelopes) | set(outcomes_by_run)):
        report.runs += 1
        rows = by_run.get(rid, [])
        records = outcomes_by_run.get(rid, [])
        signed = _check_steps(report, rid, rows, keys, trusted, codec)
        _check_approvals(report, rid, rows, trusted)
        _check_chain(report, rid, rows, signed)
        signed_outcomes = _check_outcomes(report, rid, records, rows, trusted, codec)
        env = envelopes.get(rid)
        if env is None:
            if rows or records:
                report.problems.append(
                    f"run {rid}: no envelope ({len(rows)} step rows, {len(records)} outcome "
                    "rows, run still open?)"
                )
            continue
        report.envelopes += 1
        _check_envelope(report, rid, env, rows, signed, keys, signed_outcomes)
    return report


def _decode_stored(wire: bytes, codec: Codec | None) -> Plain:
    """Decode a stored message; a Confluent frame's writer schema comes from ``codec``'s
    registry (an unreachable registry is reported as the message not decoding, with why)."""
    if codec is not None:
        try:
            codec.fetch_blocking(wire)
        except RegistryError as exc:
            raise DecodeError(f"writer schema not available: {exc}") from exc
    return decode_plain(wire, codec)


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
    codec: Codec | None = None,
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
                plain = _decode_stored(row.wire, codec)
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


def _check_approvals(
    report: VerifyReport, rid: str, rows: list[StepRow], trusted: frozenset[str]
) -> None:
    """Each signed approval decision a step carries holds (see ``_approvals``); a request
    never answered in the run is a note."""
    steps = [
        ApprovalStep(
            receipt_id=r.receipt_id,
            activity_id=r.activity_id,
            attempt=r.attempt,
            verdict=r.verdict,
            chio_receipt=r.chio_receipt,
        )
        for r in rows
    ]
    found, problems = check_approvals(steps, trusted)
    report.approvals.extend(found)
    report.problems.extend(f"run {rid}: {p}" for p in problems)
    for approval in found:
        if not approval.outcome:
            report.notes.append(
                f"run {rid}: approval {approval.approval_id} (activity {approval.activity_id}) "
                "was not answered in this run"
            )


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


def _check_outcomes(
    report: VerifyReport,
    rid: str,
    records: list[OutcomeRow],
    steps: list[StepRow],
    trusted: frozenset[str],
    codec: Codec | None = None,
) -> dict[str, OutcomeEntry]:
    """Duplicates, then each outcome record's columns, Chio receipt and decision binding;
    returns the entries (current-schema bodies) of the rows that decode, by outcome id."""
    problems = report.problems
    entries: dict[str, OutcomeEntry] = {}
    counts = Counter(row.outcome_id for row in records)
    for outcome_id, n in sorted(counts.items()):
        if n > 1:
            problems.append(f"run {rid}: outcome record {outcome_id} has {n} rows (duplicate)")
    decisions = {row.receipt_id: row for row in steps}
    for row in records:
        report.outcomes += 1
        label = (
            f"run {rid}: outcome record {row.outcome_id} "
            f"(activity {row.activity_id} attempt {row.attempt}, {row.status})"
        )
        columns = outcome_plain_from_row(row)
        record = columns
        body = b""
        if row.wire:
            try:
                plain = _decode_stored(row.wire, codec)
            except DecodeError as exc:
                problems.append(f"{label}: stored message does not decode ({exc})")
                continue
            if plain.schema_name != STEP_OUTCOME_SCHEMA:
                problems.append(f"{label}: stored message is a {plain.schema_name}")
                continue
            record, body = plain.record, outcome_body(plain)
            for name in OUTCOME_FIELDS:
                if record[name] != columns[name]:
                    problems.append(
                        f"{label}: field {name} changed: signed value {_fmt(record[name])}, "
                        f"row has {_fmt(columns[name])}"
                    )
        else:
            body = encode_plain(STEP_OUTCOME_SCHEMA, columns)
        for name, value in outcome_columns(record).items():
            if getattr(row, name) != value:
                problems.append(
                    f"{label}: column {name} changed: the record says {value!r}, "
                    f"row has {getattr(row, name)!r}"
                )
        if not record["chio_receipt"]:
            report.notes.append(f"{label}: unsigned (no Chio receipt)")
        else:
            refusal = outcome_refusal(record, trusted)
            if refusal is not None:
                problems.append(
                    f"{label}: Chio receipt refused ({refusal.reason}): {refusal.detail}"
                )
        if record["status"] != StepStatus.GATE_FAILED.value:
            _check_decision(problems, label, record, decisions)
        status = str(record["status"])
        entries[row.outcome_id] = OutcomeEntry(
            row.outcome_id,
            str(record["activity_id"]),
            int(record["attempt"]),
            StepStatus(status) if status in StepStatus.__members__ else StepStatus.UNKNOWN,
            str(record["error_type"]),
            bool(record["chio_receipt"]),
            body,
        )
    return entries


def _check_decision(
    problems: list[str], label: str, record: Mapping[str, Any], decisions: Mapping[str, StepRow]
) -> None:
    """An outcome after a decision names a decision receipt of the same run and attempt (and
    that decision's Chio receipt id, when it gives one)."""
    decision = decisions.get(str(record["decision_receipt_id"]))
    if decision is None:
        problems.append(
            f"{label}: its decision receipt {record['decision_receipt_id'] or '(none)'} is not "
            "among the run's step rows"
        )
        return
    if (decision.activity_id, decision.attempt) != (record["activity_id"], record["attempt"]):
        problems.append(
            f"{label}: its decision receipt {decision.receipt_id} is of activity "
            f"{decision.activity_id} attempt {decision.attempt}"
        )
    chio_id = record["decision_chio_id"]
    if chio_id and chio_id != decision.chio_receipt_id:
        problems.append(
            f"{label}: decision_chio_id {chio_id} is not the decision's Chio receipt id "
            f"{decision.chio_receipt_id or '(none)'}"
        )


def _check_envelope(
    report: VerifyReport,
    rid: str,
    env: EnvelopeRow,
    rows: list[StepRow],
    signed: Mapping[str, _Signed],
    keys: Mapping[str, bytes],
    outcomes: Mapping[str, OutcomeEntry],
) -> None:
    """The envelope's steps and outcome records equal the run's rows, its attempt accounts are
    what they give, and its builder signature holds; every MISSING attempt is named."""
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
    listed_outcomes = list(env.outcome_ids)
    absent = [o for o in listed_outcomes if o not in outcomes]
    for outcome_id in absent:
        problems.append(f"{tag}: outcome record {outcome_id} has no row (deleted)")
    for outcome_id in sorted(set(outcomes) - set(listed_outcomes)):
        problems.append(
            f"{tag}: outcome row {outcome_id} is not in the envelope (inserted, or a late "
            "record not yet enveloped)"
        )
    _check_attempts(report, rid, env, rows, listed, outcomes, listed_outcomes)
    if missing or absent:
        return
    ordered = sorted((outcomes[o] for o in listed_outcomes), key=outcome_order)
    if [o.outcome_id for o in ordered] != listed_outcomes:
        problems.append(f"{tag}: outcome records are not in (activity, attempt, id) order")
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
    envelope = envelope_from_row(
        env, [signed[r].body for r in listed], [outcomes[o].body for o in listed_outcomes]
    )
    builder_key = keys.get(envelope.key_id)
    if builder_key is None:
        problems.append(f"{tag}: unknown builder key {envelope.key_id!r}")
    elif not verify_envelope_signature(envelope, builder_key):
        problems.append(f"{tag}: builder signature invalid (the envelope row was altered)")


def _check_attempts(
    report: VerifyReport,
    rid: str,
    env: EnvelopeRow,
    rows: list[StepRow],
    listed: list[str],
    outcomes: Mapping[str, OutcomeEntry],
    listed_outcomes: list[str],
) -> None:
    """The envelope's accounts are what its listed steps and outcome records give for the
    attempts they name; every MISSING attempt is a failure, named."""
    problems = report.problems
    tag = f"run {rid}: envelope revision {env.revision}"
    report.attempts += len(env.attempts)
    in_envelope = set(listed)
    receipted = {(r.activity_id, r.attempt) for r in rows if r.receipt_id in in_envelope}
    denied = {
        (r.activity_id, r.attempt)
        for r in rows
        if r.receipt_id in in_envelope and r.verdict in ("DENY", "PENDING_APPROVAL")
    }
    records = [outcomes[o] for o in listed_outcomes if o in outcomes]
    expected = account_attempts(expected_from_accounts(env.attempts), receipted, records, denied)
    stored = {(a.activity_id, a.attempt): a for a in env.attempts}
    for account in expected:
        have = stored.get((account.activity_id, account.attempt))
        if have is not None and have != account:
            problems.append(
                f"{tag}: activity {account.activity_id} attempt {account.attempt} is accounted "
                f"{have.account.value} ({have.reason or 'no reason'}, outcome "
                f"{have.outcome.value}) but its rows give {account.account.value} "
                f"({account.reason or 'no reason'}, outcome {account.outcome.value})"
            )
    for account in env.attempts:
        if account.account is AccountState.MISSING:
            report.missing.append((env.workflow_id, rid, account.activity_id, account.attempt))
            problems.append(
                f"MISSING attempt: workflow {env.workflow_id} run {rid} activity "
                f"{account.activity_id} attempt {account.attempt}"
                f"{' (local)' if account.is_local else ''}: Temporal started it and no receipt "
                f"or gate failure accounts for it ({account.reason})"
            )
