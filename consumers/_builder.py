"""The receipt builder's per-run state machine (pure: no I/O, time passed in).

A run is created by its first event (step or completion). Steps are kept by receipt id (a second
copy is ignored) as compact ``StepEntry`` objects holding the step's current-schema body and the
hash of its wire body. The envelope is due when the completion has arrived and every expected
step is there, or, once the grace deadline has passed, marked incomplete with the missing count.
After a run was written, a new step makes it due again as revision + 1; a duplicate completion is
ignored. Written runs are evicted after ``evict_after_us`` of quiet; the I/O layer re-hydrates a
run it does not hold from storage (its steps and last revision) before feeding it new events, so
eviction never produces a second envelope or a duplicate step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from chio_receipts.consumers._envelope import Envelope
from chio_receipts.schemas import RunCompletion, chain_root

__all__ = ["ReceiptBuilder", "RunState", "StepEntry"]


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
        self.completion_offset = -1
        self.deadline_us = 0
        self.revision = 0
        self.written_root = b""
        self.written_complete = False
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
    ) -> None:
        """Merge what storage already holds for ``run``: its steps and, when an envelope was
        written, its last revision and the completion facts it was built from."""
        for entry in steps:
            run.steps.setdefault(entry.receipt_id, entry)
        if revision > run.revision:
            run.revision = revision
            run.written_root = written_root
            run.written_complete = written_complete
            if run.completion is None and completion is not None:
                run.completion = completion
                run.workflow_type = completion.workflow_type or run.workflow_type
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
        """Add the completion event; False for a duplicate (the first one wins)."""
        run.last_touch_us = now_us
        if run.completion is not None:
            return False
        run.completion = event
        run.workflow_type = event.workflow_type or run.workflow_type
        if run.revision == 0:
            run.completion_offset = offset
            self._pending.setdefault(run.partition, {})[run.key] = offset
            run.deadline_us = now_us + self._grace_us
            self._due.add(run.key)
        return True

    @staticmethod
    def missing(run: RunState) -> int:
        """Steps the completion announced that have not arrived (0 when unknown)."""
        if run.completion is None or run.completion.expected_steps is None:
            return 0
        return max(0, run.completion.expected_steps - len(run.steps))

    def due(self, now_us: int) -> Iterator[tuple[RunState, Envelope]]:
        """Envelopes to write now (unsigned, revision already incremented in the envelope)."""
        for key in list(self._due):
            run = self.runs.get(key)
            if run is None or run.completion is None:
                self._due.discard(key)
                continue
            missing = self.missing(run)
            if missing and now_us < run.deadline_us and run.revision == 0:
                continue
            self._due.discard(key)
            envelope = self.envelope(run, missing)
            if (
                run.revision > 0
                and envelope.chain_root == run.written_root
                and envelope.complete == run.written_complete
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
        return Envelope(
            namespace=run.namespace,
            workflow_id=run.workflow_id,
            run_id=run.run_id,
            workflow_type=run.workflow_type or done.workflow_type,
            parent_workflow_ids=done.parent_workflow_ids,
            started_at=done.started_at,
            completed_at=done.closed_at,
            outcome=done.outcome.value.lower(),
            revision=run.revision + 1,
            complete=missing == 0,
            missing_steps=missing,
            expected_steps=done.expected_steps,
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
