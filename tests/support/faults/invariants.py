"""The invariants I1-I6 as reusable checks that say exactly what differs.

Each check takes the oracle and a :class:`Snapshot` of ClickHouse (and the DLQ) taken at
quiescence and returns a list of human-readable differences; empty means the invariant holds.
:func:`check` runs them all and :func:`assert_invariants` fails a test with every difference.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.support.faults.oracle import Oracle

__all__ = [
    "DeadLetterRecord",
    "EnvelopeRow",
    "Liveness",
    "Snapshot",
    "StepRow",
    "assert_invariants",
    "check",
    "i1_no_loss",
    "i2_nothing_invented",
    "i3_no_duplicates",
    "i4_envelopes",
    "i5_dead_letters",
    "i6_liveness",
]

_SHOW = 20  # ids listed per difference; the count is always exact


def _ids(ids: Iterable[str]) -> str:
    items = sorted(ids)
    more = f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


@dataclass(frozen=True, slots=True)
class StepRow:
    """One row of ``step_receipts`` (as stored, without FINAL)."""

    receipt_id: str
    workflow_id: str
    run_id: str
    activity_id: str
    attempt: int
    verdict: str


@dataclass(frozen=True, slots=True)
class EnvelopeRow:
    """The current envelope of a run (``workflow_receipts FINAL``)."""

    workflow_id: str
    run_id: str
    revision: int
    complete: bool
    missing_steps: int
    expected_steps: int | None
    receipt_ids: tuple[str, ...]
    outcome: str
    accounts: tuple[tuple[str, int, str, str], ...] = ()
    """``(activity_id, attempt, account, reason)`` of every attempt Temporal started (empty when
    the completion listed none)."""


# Accounts that explain an attempt without a receipt.
EXPLAINED = frozenset({"GATE_FAILED", "WORKER_LOST"})


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One record of the dead-letter topic: the origin and error headers."""

    origin: tuple[str, int, int]
    error_class: str
    reason: str
    value: bytes | None


@dataclass(slots=True)
class Snapshot:
    """What the pipeline holds at quiescence."""

    steps: list[StepRow] = field(default_factory=list)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    envelopes: list[EnvelopeRow] = field(default_factory=list)
    envelope_revision_dupes: list[tuple[str, str, int, int]] = field(default_factory=list)
    verify_problems: dict[str, list[str]] = field(default_factory=dict)
    dead_letters: list[DeadLetterRecord] = field(default_factory=list)

    @property
    def receipt_ids(self) -> set[str]:
        """Distinct receipt ids stored."""
        return {r.receipt_id for r in self.steps}


@dataclass(slots=True)
class Liveness:
    """Facts for I6, measured by the pipeline."""

    drained: bool = True
    drain_seconds: float = 0.0
    bound_seconds: float = 0.0
    running_workflows: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    rss_growth: dict[str, float] = field(default_factory=dict)
    rss_limit: float = 2.0


def i1_no_loss(oracle: Oracle, snap: Snapshot) -> list[str]:
    """Every accepted oracle receipt id is in ``step_receipts``."""
    missing = oracle.accepted - snap.receipt_ids
    if not missing:
        return []
    where = Counter(f"{oracle.proposed[i].workflow_id}" for i in missing)
    return [
        f"I1: {len(missing)} accepted receipt(s) missing from step_receipts: {_ids(missing)} "
        f"(runs: {_ids(where)})"
    ]


def i2_nothing_invented(oracle: Oracle, snap: Snapshot) -> list[str]:
    """Every stored receipt was handed to a sink, and its signature verifies."""
    out = []
    invented = snap.receipt_ids - set(oracle.proposed)
    if invented:
        out.append(f"I2: {len(invented)} stored receipt(s) no worker produced: {_ids(invented)}")
    bad = [
        p
        for problems in snap.verify_problems.values()
        for p in problems
        if "signature" in p or "changed" in p or "does not decode" in p
    ]
    if bad:
        out.append(f"I2: {len(bad)} signature problem(s): " + "; ".join(bad[:_SHOW]))
    return out


def i3_no_duplicates(snap: Snapshot) -> list[str]:
    """``count() - uniqExact(receipt_id)`` is 0 with and without FINAL."""
    out = []
    for mode, (count, uniq) in sorted(snap.counts.items()):
        if count != uniq:
            out.append(f"I3: step_receipts {mode}: count {count} but {uniq} distinct ids")
    dupes = [i for i, n in Counter(r.receipt_id for r in snap.steps).items() if n > 1]
    if dupes:
        out.append(f"I3: receipt ids stored more than once: {_ids(dupes)}")
    for wf, run, revision, n in snap.envelope_revision_dupes:
        out.append(f"I3: envelope {wf}/{run} revision {revision} stored {n} times")
    return out


def i4_envelopes(
    oracle: Oracle, snap: Snapshot, closed_runs: Iterable[tuple[str, str]]
) -> list[str]:
    """One current envelope per closed run; its steps are the run's stored (= oracle) steps; it
    verifies; a run whose steps did not all arrive is marked incomplete."""
    out = []
    by_run: dict[tuple[str, str], list[EnvelopeRow]] = {}
    for env in snap.envelopes:
        by_run.setdefault((env.workflow_id, env.run_id), []).append(env)
    stored: dict[tuple[str, str], set[str]] = {}
    stored_attempts: dict[tuple[str, str], set[tuple[str, int]]] = {}
    for row in snap.steps:
        stored.setdefault((row.workflow_id, row.run_id), set()).add(row.receipt_id)
        stored_attempts.setdefault((row.workflow_id, row.run_id), set()).add(
            (row.activity_id, row.attempt)
        )
    for run in sorted(set(closed_runs)):
        envs = by_run.get(run, [])
        tag = f"I4: run {run[0]}/{run[1]}"
        if len(envs) != 1:
            out.append(f"{tag}: {len(envs)} current envelopes (expected exactly 1)")
            continue
        env = envs[0]
        listed = set(env.receipt_ids)
        expected = oracle.steps_of(*run) | stored.get(run, set())
        if listed != expected:
            out.append(
                f"{tag}: envelope revision {env.revision} lists {len(listed)} steps, the oracle "
                f"and step_receipts have {len(expected)}; missing from it: "
                f"{_ids(expected - listed) or '-'}; "
                f"not in the oracle: {_ids(listed - expected) or '-'}"
            )
        if env.accounts:
            # A receipt exists when the oracle accepted it or storage holds it (a worker killed
            # between the sink's acceptance and the oracle's log line leaves only the latter).
            receipted = oracle.attempts_of(*run) | stored_attempts.get(run, set())
            out += _account_problems(tag, env, receipted)
        elif env.expected_steps is not None and len(listed) < env.expected_steps and env.complete:
            out.append(
                f"{tag}: marked complete with {len(listed)} of {env.expected_steps} expected steps"
            )
        if env.complete and env.missing_steps:
            out.append(f"{tag}: complete but missing_steps={env.missing_steps}")
    for wf, problems in sorted(snap.verify_problems.items()):
        for p in problems:
            out.append(f"I4: verify {wf}: {p}")
    return out


def _account_problems(tag: str, env: EnvelopeRow, receipted: set[tuple[str, int]]) -> list[str]:
    """With attempt accounts: complete iff no attempt is MISSING; an attempt is RECEIPTED iff
    the oracle accepted a receipt for it; every other attempt is explained or MISSING."""
    out = []
    missing = [(a, n) for a, n, account, _ in env.accounts if account == "MISSING"]
    if env.complete and missing:
        out.append(f"{tag}: marked complete with MISSING attempts {missing[:5]}")
    if not env.complete and not missing:
        out.append(f"{tag}: every attempt is accounted for, yet the envelope is incomplete")
    for activity, attempt, account, reason in env.accounts:
        has_receipt = (activity, attempt) in receipted
        if account == "RECEIPTED" and not has_receipt:
            out.append(f"{tag}: attempt {activity}#{attempt} RECEIPTED without a receipt")
        elif account in EXPLAINED and has_receipt:
            out.append(f"{tag}: attempt {activity}#{attempt} {account} ({reason}) has a receipt")
        elif account == "MISSING" and has_receipt:
            out.append(f"{tag}: attempt {activity}#{attempt} MISSING but its receipt exists")
    return out


def i5_dead_letters(
    snap: Snapshot, injected: Mapping[tuple[str, int, int], str] | None = None
) -> list[str]:
    """The DLQ holds exactly the injected records (origin -> expected reason), with headers."""
    injected = dict(injected or {})
    out = []
    seen = Counter(d.origin for d in snap.dead_letters)
    for origin, n in seen.items():
        if n > 1:
            out.append(f"I5: {origin} dead-lettered {n} times")
    for d in snap.dead_letters:
        if d.origin not in injected:
            out.append(
                f"I5: unexpected dead letter from {d.origin}: {d.error_class} / {d.reason} "
                "(a good record, or an injection the test did not declare)"
            )
            continue
        if not d.error_class or not d.reason:
            out.append(f"I5: dead letter {d.origin} lacks error class or reason headers")
        want = injected[d.origin]
        if want and want != d.reason:
            out.append(f"I5: dead letter {d.origin} has reason {d.reason!r}, expected {want!r}")
    missing = set(injected) - set(seen)
    if missing:
        out.append(f"I5: {len(missing)} injected record(s) not dead-lettered: {sorted(missing)}")
    return out


def i6_liveness(live: Liveness) -> list[str]:
    """Drained within the bound, nothing running, no crash, memory flat."""
    out = []
    if not live.drained:
        out.append(f"I6: lag/spool did not drain within {live.bound_seconds:.0f}s")
    if live.running_workflows:
        out.append(f"I6: {live.running_workflows} workflow(s) still running")
    out += [f"I6: {what}" for what in live.unexpected_exits]
    for name, growth in live.rss_growth.items():
        if growth > live.rss_limit:
            out.append(f"I6: {name} RSS grew {growth:.1f}x (limit {live.rss_limit:.1f}x)")
    return out


def check(
    oracle: Oracle,
    snap: Snapshot,
    *,
    closed_runs: Iterable[tuple[str, str]],
    injected: Mapping[tuple[str, int, int], str] | None = None,
    liveness: Liveness | None = None,
) -> dict[str, list[str]]:
    """Every invariant: name -> differences."""
    return {
        "I1": i1_no_loss(oracle, snap),
        "I2": i2_nothing_invented(oracle, snap),
        "I3": i3_no_duplicates(snap),
        "I4": i4_envelopes(oracle, snap, closed_runs),
        "I5": i5_dead_letters(snap, injected),
        "I6": i6_liveness(liveness or Liveness()),
    }


def assert_invariants(results: Mapping[str, list[str]], *, context: str = "") -> None:
    """Fail with every difference, grouped by invariant."""
    failed = {k: v for k, v in results.items() if v}
    if failed:
        lines = [f"invariants violated{f' ({context})' if context else ''}:"]
        for _name, diffs in sorted(failed.items()):
            lines += [f"  {d}" for d in diffs]
        raise AssertionError("\n".join(lines))


def summarize(results: Mapping[str, list[str]]) -> dict[str, Any]:
    """name -> 'ok' or the number of differences (for the summary table)."""
    return {k: ("ok" if not v else len(v)) for k, v in results.items()}
