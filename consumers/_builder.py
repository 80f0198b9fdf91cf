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

Written runs are evicted after ``evict_after_us`` of quiet; the I/O layer re-hydrates a run it
does not hold from storage (its steps and last revision) before feeding it new events, so
eviction never produces a second envelope or a duplicate step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from chio_receipts.consumers._envelope import Envelope
from chio_receipts.schemas import CompletionSource, Outcome, RunCompletion, chain_root

__all__ = ["DECLARED_OUTCOME", "OUTCOME_SOURCE", "ReceiptBuilder", "RunState", "StepEntry"]

DECLARED_OUTCOME = "declared_outcome"
"""Envelope metadata key: the outcome a worker declared with ``finalize_workflow`` (lowercase)."""
OUTCOME_SOURCE = "outcome_source"
"""Envelope metadata key: who the envelope's outcome comes from, the completion's source in
lowercase (``watcher``: Temporal; ``finalize``: only a worker's declaration, provisional)."""


def authoritative(event: RunCompletion | None) -> bool:
    """True when ``event`` speaks for Temporal (anything but a worker's declaration)."""
    return event is not None and event.source is not CompletionSource.FINALIZE


class StepEntry:
    """One step of a run, compact: what the envelope and the chain need."""

    __slots__ = ("body", "hash", "receipt_id", "verdict")

    def __init__(self, receipt_id: str, verdict: str, body: bytes, hash_: bytes) -> None:
        self.receipt_id = receipt_id
        self.verdict = verdict
        self.body = body
        self.hash = hash_


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
        "partition",
        "revision",
        "run_id",
        "steps",
        "workflow_id",
        "workflow_type",
        "written_complete",
        "written_meta",
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
        self.completion: RunCompletion | None = None
        self.declared = ""
        self.completion_offset = -1
        self.deadline_us = 0
        self.revision = 0
        self.written_root = b""
        self.written_complete = False
        # (outcome, sorted extra) of the written revision; None when unknown (not compared)
        self.written_meta: tuple[str, tuple[tuple[str, str], ...]] | None = None
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
    ) -> None:
        """Merge what storage already holds for ``run``: its steps and, when an envelope was
        written, its last revision, the completion facts it was built from, the declared
        outcome it carried and its (outcome, extra) to recognize a rewrite of the same facts."""
        for entry in steps:
            run.steps.setdefault(entry.receipt_id, entry)
        if revision > run.revision:
            run.revision = revision
            run.written_root = written_root
            run.written_complete = written_complete
            run.written_meta = written_meta
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
    def missing(run: RunState) -> int:
        """Steps the completion announced that have not arrived (0 when unknown)."""
        done = run.completion
        if done is None or not authoritative(done) or done.expected_steps is None:
            return 0
        return max(0, done.expected_steps - len(run.steps))

    def due(self, now_us: int) -> Iterator[tuple[RunState, Envelope]]:
        """Envelopes to write now (unsigned, revision already incremented in the envelope)."""
        for key in list(self._due):
            run = self.runs.get(key)
            if run is None or run.completion is None:
                self._due.discard(key)
                continue
            missing = self.missing(run)
            waiting = missing or not authoritative(run.completion)
            if waiting and now_us < run.deadline_us:
                continue
            self._due.discard(key)
            envelope = self.envelope(run, missing)
            if (
                run.revision > 0
                and envelope.chain_root == run.written_root
                and envelope.complete == run.written_complete
                and (
                    run.written_meta is None
                    or run.written_meta == (envelope.outcome, tuple(sorted(envelope.extra)))
                )
            ):
                # Already written with these steps (e.g. replay after a crash).
                self._clear_pending(run)
                continue
            yield run, envelope

    def envelope(self, run: RunState, missing: int | None = None) -> Envelope:
        """The next revision of ``run``'s envelope (pure)."""
        done = run.completion
        if done is None:
            raise ValueError(f"run {run.key} has no completion")
        if missing is None:
            missing = self.missing(run)
        ordered = sorted(run.steps.values(), key=lambda e: e.receipt_id)
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
            extra=tuple(extra),
        )

    def mark_written(self, run: RunState, envelope: Envelope, now_us: int) -> None:
        """Record that ``envelope`` was accepted by storage."""
        run.revision = envelope.revision
        run.written_root = envelope.chain_root
        run.written_complete = envelope.complete
        run.written_meta = (envelope.outcome, tuple(sorted(envelope.extra)))
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
