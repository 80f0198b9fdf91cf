"""The receipt builder's per-run state machine (pure: no I/O, time passed in).

A run is created by its first event (step or completion). Steps are kept by receipt id (a second
copy is ignored) as compact ``StepEntry`` objects holding the step's current-schema body and the
hash of its wire body. The envelope is due when the completion has arrived and every expected
step is there, or, once the grace deadline has passed, marked incomplete with the missing count.
After a run was written, a new step makes it due again as revision + 1; a duplicate completion is
ignored.

Temporal is the authority on the run: the outcome, start and close times and the expected attempt
count come from the completion watcher's event (``CompletionSource.WATCHER``; a completion of
unknown source, from producers older than the field, is taken as Temporal's too). A worker's
``finalize_workflow`` event (``CompletionSource.FINALIZE``) only declares an outcome: it is kept
as ``metadata["declared_outcome"]`` and never overrides Temporal's. A run that only has a declared
completion waits up to the grace deadline for the watcher's; then a provisional envelope is
written (outcome ``unknown``, no close time, ``complete`` false,
``metadata["outcome_source"] = "finalize"``), and the watcher's completion, when it arrives,
supersedes it with a new revision.

Outcome records (``StepOutcome``: how an attempt's body ended, or why the gate refused it) are
kept by outcome id like steps, and the envelope carries them all. When Temporal's completion lists
the attempts it started (``expected_attempts``), the envelope accounts for each of them
(:func:`account_attempts`) and is complete when none is a real gap (``MISSING``); otherwise the
count rule (``expected_steps``) decides. A late step or outcome record gives a new revision.

Written runs are evicted after ``evict_after_us`` of quiet; the I/O layer re-hydrates a run it
does not hold from storage (its steps and last revision) before feeding it new events, so
eviction never produces a second envelope or a duplicate step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence

from chio_receipts.consumers._envelope import Envelope
from chio_receipts.schemas import (
    AccountState,
    AttemptAccount,
    CompletionSource,
    ExpectedAttempt,
    Outcome,
    RunCompletion,
    StepStatus,
    chain_root,
)

__all__ = [
    "DECLARED_OUTCOME",
    "DENIED",
    "NO_RECEIPT",
    "OUTCOME_SOURCE",
    "OUTCOME_WITHOUT_RECEIPT",
    "UNSIGNED_OUTCOME",
    "OutcomeEntry",
    "ReceiptBuilder",
    "RunState",
    "StepEntry",
    "account_attempts",
    "outcome_order",
]

DECLARED_OUTCOME = "declared_outcome"
"""Envelope metadata key: the outcome a worker declared with ``finalize_workflow`` (lowercase)."""
OUTCOME_SOURCE = "outcome_source"
"""Envelope metadata key: who the envelope's outcome comes from, the completion's source in
lowercase (``watcher``: Temporal; ``finalize``: only a worker's declaration, provisional)."""


def authoritative(event: RunCompletion | None) -> bool:
    """True when ``event`` speaks for Temporal (anything but a worker's declaration)."""
    return event is not None and event.source is not CompletionSource.FINALIZE


NO_RECEIPT = "no_receipt"
"""Reason of a ``MISSING`` attempt: no receipt, no gate failure, and Temporal does not say the
worker was lost (a real gap)."""
OUTCOME_WITHOUT_RECEIPT = "outcome_without_receipt"
"""Reason of a ``MISSING`` attempt that has an outcome record after a decision, but not that
decision's receipt (a receipt that should exist and does not)."""
DENIED = "denied"
"""Reason of a receipted attempt whose decision was a denial and that has no outcome record: its
body never ran, so its outcome is UNKNOWN for that reason, not because the worker died."""
UNSIGNED_OUTCOME = "unsigned_outcome:"
"""Reason prefix of a receipted attempt whose only outcome record is unsigned (and not a gate
failure): its claimed status follows in lowercase, and the account's ``outcome`` stays UNKNOWN."""


class StepEntry:
    """One step of a run, compact: what the envelope, the chain and the accounting need."""

    __slots__ = ("activity_id", "attempt", "body", "hash", "receipt_id", "verdict")

    def __init__(
        self,
        receipt_id: str,
        verdict: str,
        body: bytes,
        hash_: bytes,
        activity_id: str = "",
        attempt: int = 0,
    ) -> None:
        self.receipt_id = receipt_id
        self.verdict = verdict
        self.body = body
        self.hash = hash_
        self.activity_id = activity_id
        self.attempt = attempt


class OutcomeEntry:
    """One outcome record of a run, compact: its current-schema body and what accounting needs.

    ``signed`` is False for a record without a Chio receipt (accepted, see the README)."""

    __slots__ = ("activity_id", "attempt", "body", "error_type", "outcome_id", "signed", "status")

    def __init__(
        self,
        outcome_id: str,
        activity_id: str,
        attempt: int,
        status: StepStatus,
        error_type: str,
        signed: bool,
        body: bytes,
    ) -> None:
        self.outcome_id = outcome_id
        self.activity_id = activity_id
        self.attempt = attempt
        self.status = status
        self.error_type = error_type
        self.signed = signed
        self.body = body


def outcome_order(entry: OutcomeEntry) -> tuple[str, int, str]:
    """Envelope order of outcome records: (activity_id, attempt, outcome_id)."""
    return (entry.activity_id, entry.attempt, entry.outcome_id)


def account_attempts(
    expected: Sequence[ExpectedAttempt],
    receipted: Collection[tuple[str, int]],
    outcomes: Iterable[OutcomeEntry],
    denied: Collection[tuple[str, int]] = (),
) -> tuple[AttemptAccount, ...]:
    """How each attempt Temporal started is accounted for (pure), in (activity_id, attempt)
    order, one account per distinct (activity_id, attempt) of ``expected``.

    ``receipted`` holds the (activity_id, attempt) of the run's step receipts, ``denied`` those
    whose receipt is a denial; ``outcomes`` are the run's outcome records. An attempt is:

    * ``RECEIPTED`` when a receipt exists; ``outcome`` is the status of its outcome record
      (a signed record first, then by outcome id), ``UNKNOWN`` when none arrived (the worker
      died before writing one; ``reason`` ``denied`` when the decision was a denial: the body
      never ran) or when the only record is unsigned (``reason`` ``unsigned_outcome:<status>``);
    * ``GATE_FAILED`` when no receipt but a gate-failure record exists (``reason`` its
      ``error_type``: sidecar unreachable, sink refused);
    * ``WORKER_LOST`` when there is neither and Temporal ended the attempt ``timed_out:...``
      (the worker was lost before evaluation; ``reason`` Temporal's end);
    * ``MISSING`` otherwise: a real gap (``reason`` ``no_receipt``, or
      ``outcome_without_receipt`` when a post-decision record names a receipt that is not
      there).
    """
    by_attempt: dict[tuple[str, int], list[OutcomeEntry]] = {}
    for entry in outcomes:
        by_attempt.setdefault((entry.activity_id, entry.attempt), []).append(entry)
    accounts: dict[tuple[str, int], AttemptAccount] = {}
    for want in expected:
        key = (want.activity_id, want.attempt)
        if key in accounts:
            continue
        records = sorted(by_attempt.get(key, ()), key=lambda e: (not e.signed, e.outcome_id))
        gate = next((e for e in records if e.status is StepStatus.GATE_FAILED), None)
        state, reason, outcome = AccountState.MISSING, NO_RECEIPT, StepStatus.UNKNOWN
        if key in receipted:
            state, reason = AccountState.RECEIPTED, ""
            if records:
                first = records[0]
                if first.signed:
                    outcome = first.status
                else:
                    reason = UNSIGNED_OUTCOME + first.status.value.lower()
            elif key in denied:
                reason = DENIED
        elif gate is not None:
            state, reason, outcome = AccountState.GATE_FAILED, gate.error_type, gate.status
        elif records:
            reason = OUTCOME_WITHOUT_RECEIPT
        elif want.temporal_end.startswith("timed_out"):
            state, reason = AccountState.WORKER_LOST, want.temporal_end
        accounts[key] = AttemptAccount(
            activity_id=want.activity_id,
            activity_type=want.activity_type,
            attempt=want.attempt,
            is_local=want.is_local,
            account=state,
            reason=reason,
            outcome=outcome,
        )
    return tuple(accounts[k] for k in sorted(accounts))


class RunState:
    """Everything the builder holds about one run."""

    __slots__ = (
        "completion",
        "completion_offset",
        "deadline_us",
        "declared",
        "hydrated",
        "key",
        "last_touch_us",
        "namespace",
        "outcomes",
        "partition",
        "revision",
        "run_id",
        "steps",
        "workflow_id",
        "workflow_type",
        "written_attempts",
        "written_complete",
        "written_meta",
        "written_outcomes",
        "written_root",
    )

    def __init__(
        self, key: str, namespace: str, workflow_id: str, run_id: str, partition: int
    ) -> None:
        self.key = key
        self.namespace = namespace
        self.workflow_id = workflow_id
        self.run_id = run_id
        self.workflow_type = ""
        self.partition = partition
        self.steps: dict[str, StepEntry] = {}
        self.outcomes: dict[str, OutcomeEntry] = {}
        self.completion: RunCompletion | None = None
        self.declared = ""
        self.completion_offset = -1
        self.deadline_us = 0
        self.revision = 0
        self.written_root = b""
        self.written_complete = False
        # (outcome, sorted extra) of the written revision; None when unknown (not compared)
        self.written_meta: tuple[str, tuple[tuple[str, str], ...]] | None = None
        # outcome ids and attempt accounts of the written revision
        self.written_outcomes: tuple[str, ...] = ()
        self.written_attempts: tuple[AttemptAccount, ...] = ()
        self.hydrated = False
        self.last_touch_us = 0

    @property
    def pending(self) -> bool:
        """True while a received completion has not been reflected in a written envelope."""
        return self.completion_offset >= 0


class ReceiptBuilder:
    """Folds step and completion events into envelopes."""

    __slots__ = ("_due", "_evict_after_us", "_grace_us", "_pending", "runs")

    def __init__(self, *, grace_us: int, evict_after_us: int) -> None:
        self._grace_us = grace_us
        self._evict_after_us = evict_after_us
        self.runs: dict[str, RunState] = {}
        self._due: set[str] = set()
        # partition -> run key -> offset of its unwritten completion (small: bounded by grace)
        self._pending: dict[int, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self.runs)

    def get(self, key: str) -> RunState | None:
        """The state of run ``key``, if held."""
        return self.runs.get(key)

    def open_run(
        self, key: str, namespace: str, workflow_id: str, run_id: str, partition: int
    ) -> RunState:
        """The state of run ``key``, created (not hydrated) when absent."""
        run = self.runs.get(key)
        if run is None:
            run = RunState(key, namespace, workflow_id, run_id, partition)
            self.runs[key] = run
        elif partition >= 0:
            run.partition = partition
        return run

    def hydrate(
        self,
        run: RunState,
        steps: Iterable[StepEntry],
        *,
        revision: int = 0,
        written_root: bytes = b"",
        written_complete: bool = False,
        completion: RunCompletion | None = None,
        declared: str = "",
        written_meta: tuple[str, tuple[tuple[str, str], ...]] | None = None,
        outcomes: Iterable[OutcomeEntry] = (),
        written_outcomes: tuple[str, ...] = (),
        written_attempts: tuple[AttemptAccount, ...] = (),
    ) -> None:
        """Merge what storage already holds for ``run``: its steps and outcome records and,
        when an envelope was written, its last revision, the completion facts it was built
        from, the declared outcome it carried, and its (outcome, extra), outcome ids and
        attempt accounts to recognize a rewrite of the same facts."""
        for entry in steps:
            run.steps.setdefault(entry.receipt_id, entry)
        for record in outcomes:
            run.outcomes.setdefault(record.outcome_id, record)
        if revision > run.revision:
            run.revision = revision
            run.written_root = written_root
            run.written_complete = written_complete
            run.written_meta = written_meta
            run.written_outcomes = written_outcomes
            run.written_attempts = written_attempts
            if completion is not None and (
                run.completion is None
                or (authoritative(completion) and not authoritative(run.completion))
            ):
                run.completion = completion
                run.workflow_type = completion.workflow_type or run.workflow_type
            run.declared = run.declared or declared
        run.hydrated = True

    def add_step(self, run: RunState, entry: StepEntry, now_us: int) -> bool:
        """Add a step; False when its receipt id is already known (a duplicate)."""
        if entry.receipt_id in run.steps:
            return False
        run.steps[entry.receipt_id] = entry
        run.last_touch_us = now_us
        if run.completion is not None or run.revision > 0:
            self._due.add(run.key)
        return True

    def add_outcome(self, run: RunState, entry: OutcomeEntry, now_us: int) -> bool:
        """Add an outcome record; False when its outcome id is already known (a duplicate)."""
        if entry.outcome_id in run.outcomes:
            return False
        run.outcomes[entry.outcome_id] = entry
        run.last_touch_us = now_us
        if run.completion is not None or run.revision > 0:
            self._due.add(run.key)
        return True

    @staticmethod
    def drop_step(run: RunState, receipt_id: str) -> None:
        """Forget a step storage refused (it was dead-lettered): no envelope counts it."""
        run.steps.pop(receipt_id, None)

    @staticmethod
    def drop_outcome(run: RunState, outcome_id: str) -> None:
        """Forget an outcome record storage refused (it was dead-lettered)."""
        run.outcomes.pop(outcome_id, None)

    def add_completion(self, run: RunState, event: RunCompletion, offset: int, now_us: int) -> bool:
        """Add a completion event; False when it changes nothing (a duplicate).

        Temporal's completion (the watcher's) replaces a worker's declared one and is kept
        once; a declared completion only records its outcome (the first declaration wins) and
        stands in for Temporal's until it arrives. A completion that changes the run makes it
        due (a new revision when one was written) and holds its offset until that is written."""
        run.last_touch_us = now_us
        current = run.completion
        if authoritative(event):
            if authoritative(current):
                return False
            run.completion = event
            # Wait for the steps Temporal announced (as for a first completion).
            run.deadline_us = now_us + self._grace_us
        else:
            declared = event.outcome.value.lower()
            if run.declared:
                return False
            run.declared = declared
            if current is None:
                run.completion = event
                # Wait for Temporal's completion before writing a provisional envelope.
                run.deadline_us = now_us + self._grace_us
        run.workflow_type = event.workflow_type or run.workflow_type
        if run.completion_offset < 0:
            run.completion_offset = offset
            self._pending.setdefault(run.partition, {})[run.key] = offset
        self._due.add(run.key)
        return True

    @staticmethod
    def accounts(run: RunState) -> tuple[AttemptAccount, ...]:
        """The attempt accounts of ``run``: one per attempt Temporal's completion lists (empty
        when it lists none: an older watcher, or only a worker's declaration)."""
        done = run.completion
        if done is None or not authoritative(done) or not done.expected_attempts:
            return ()
        receipted = {(e.activity_id, e.attempt) for e in run.steps.values()}
        # A held attempt (PENDING_APPROVAL) is refused like a denied one: its body never ran.
        denied = {
            (e.activity_id, e.attempt)
            for e in run.steps.values()
            if e.verdict in ("DENY", "PENDING_APPROVAL")
        }
        return account_attempts(done.expected_attempts, receipted, run.outcomes.values(), denied)

    @classmethod
    def missing(cls, run: RunState, accounts: tuple[AttemptAccount, ...] | None = None) -> int:
        """Real gaps: attempts accounted ``MISSING`` when Temporal listed its attempts, else the
        steps the completion announced that have not arrived (0 when unknown)."""
        done = run.completion
        if done is None or not authoritative(done):
            return 0
        if done.expected_attempts:
            found = cls.accounts(run) if accounts is None else accounts
            return sum(1 for a in found if a.account is AccountState.MISSING)
        if done.expected_steps is None:
            return 0
        return max(0, done.expected_steps - len(run.steps))

    def due(self, now_us: int) -> Iterator[tuple[RunState, Envelope]]:
        """Envelopes to write now (unsigned, revision already incremented in the envelope)."""
        for key in list(self._due):
            run = self.runs.get(key)
            if run is None or run.completion is None:
                self._due.discard(key)
                continue
            accounts = self.accounts(run)
            missing = self.missing(run, accounts)
            waiting = missing or not authoritative(run.completion)
            if waiting and now_us < run.deadline_us:
                continue
            self._due.discard(key)
            envelope = self.envelope(run, missing, accounts)
            if (
                run.revision > 0
                and envelope.chain_root == run.written_root
                and envelope.complete == run.written_complete
                and envelope.outcome_ids == run.written_outcomes
                and envelope.attempts == run.written_attempts
                and (
                    run.written_meta is None
                    or run.written_meta == (envelope.outcome, tuple(sorted(envelope.extra)))
                )
            ):
                # Already written with these steps (e.g. replay after a crash).
                self._clear_pending(run)
                continue
            yield run, envelope

    def envelope(
        self,
        run: RunState,
        missing: int | None = None,
        accounts: tuple[AttemptAccount, ...] | None = None,
    ) -> Envelope:
        """The next revision of ``run``'s envelope (pure)."""
        done = run.completion
        if done is None:
            raise ValueError(f"run {run.key} has no completion")
        if accounts is None:
            accounts = self.accounts(run)
        if missing is None:
            missing = self.missing(run, accounts)
        ordered = sorted(run.steps.values(), key=lambda e: e.receipt_id)
        records = sorted(run.outcomes.values(), key=outcome_order)
        allow = sum(1 for e in ordered if e.verdict == "ALLOW")
        deny = sum(1 for e in ordered if e.verdict == "DENY")
        extra: list[tuple[str, str]] = []
        for name in ("parent_run_id", "continued_from_run_id", "continued_as_new_run_id"):
            value = getattr(done, name)
            if value:
                extra.append((name, value))
        temporal = authoritative(done)
        if run.declared:
            extra.append((DECLARED_OUTCOME, run.declared))
        extra.append((OUTCOME_SOURCE, done.source.value.lower()))
        extra.extend(_counts(records, accounts))
        return Envelope(
            namespace=run.namespace,
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            workflow_type=run.workflow_type or done.workflow_type,
            parent_workflow_ids=done.parent_workflow_ids,
            started_at=done.started_at,
            completed_at=done.closed_at if temporal else None,
            outcome=(done.outcome if temporal else Outcome.UNKNOWN).value.lower(),
            revision=run.revision + 1,
            complete=temporal and missing == 0,
            missing_steps=missing,
            expected_steps=done.expected_steps if temporal else None,
            allow_count=allow,
            deny_count=deny,
            receipt_ids=tuple(e.receipt_id for e in ordered),
            steps=tuple(e.body for e in ordered),
            chain_root=chain_root(e.hash for e in ordered),
            extra=tuple(sorted(extra)),
            outcomes=tuple(e.body for e in records),
            outcome_ids=tuple(e.outcome_id for e in records),
            attempts=accounts,
        )

    def mark_written(self, run: RunState, envelope: Envelope, now_us: int) -> None:
        """Record that ``envelope`` was accepted by storage."""
        run.revision = envelope.revision
        run.written_root = envelope.chain_root
        run.written_complete = envelope.complete
        run.written_meta = (envelope.outcome, tuple(sorted(envelope.extra)))
        run.written_outcomes = envelope.outcome_ids
        run.written_attempts = envelope.attempts
        self._clear_pending(run)
        run.last_touch_us = now_us

    def refused(self, run: RunState, now_us: int) -> None:
        """Storage refused ``envelope`` for good (it was dead-lettered): nothing is marked
        written, the completion no longer holds its offset; the next event of the run makes
        the same revision due again."""
        self._clear_pending(run)
        run.last_touch_us = now_us

    def requeue(self, run: RunState) -> None:
        """Make ``run`` due again (its write failed and will be retried)."""
        self._due.add(run.key)

    def pending_offset(self, partition: int) -> int | None:
        """Lowest offset of a completion on ``partition`` whose envelope is not written yet."""
        offsets = self._pending.get(partition)
        return min(offsets.values()) if offsets else None

    def _clear_pending(self, run: RunState) -> None:
        if run.completion_offset >= 0:
            self._pending.get(run.partition, {}).pop(run.key, None)
        run.completion_offset = -1

    def evict(self, now_us: int, *, max_runs: int | None = None) -> int:
        """Drop quiet runs that hold nothing unwritten; returns how many were dropped."""
        dropped = 0
        horizon = now_us - self._evict_after_us
        for key, run in list(self.runs.items()):
            if run.pending or key in self._due:
                continue
            if run.last_touch_us <= horizon or (max_runs is not None and len(self.runs) > max_runs):
                del self.runs[key]
                dropped += 1
        return dropped

    def drop_partitions(self, partitions: Iterable[int]) -> None:
        """Forget every run of ``partitions`` (they were revoked)."""
        gone = set(partitions)
        for partition in gone:
            self._pending.pop(partition, None)
        for key, run in list(self.runs.items()):
            if run.partition in gone:
                del self.runs[key]
                self._due.discard(key)


def _counts(
    records: Sequence[OutcomeEntry], accounts: Sequence[AttemptAccount]
) -> list[tuple[str, str]]:
    """Envelope metadata counting outcome records and attempt accounts (only when there are
    any, so an envelope of a run without them says what it said before they existed)."""
    out: list[tuple[str, str]] = []
    if records:
        out.append(("outcomes", str(len(records))))
        unsigned = sum(1 for r in records if not r.signed)
        if unsigned:
            out.append(("unsigned_outcomes", str(unsigned)))
    if accounts:
        states = [a.account for a in accounts]
        out.extend(
            (
                ("expected_attempts", str(len(accounts))),
                ("missing_attempts", str(states.count(AccountState.MISSING))),
                ("gate_failed_attempts", str(states.count(AccountState.GATE_FAILED))),
                ("worker_lost_attempts", str(states.count(AccountState.WORKER_LOST))),
            )
        )
    return out
