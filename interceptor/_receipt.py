"""In-process aggregation: one ``WorkflowReceipt`` per run, folded into the v1 envelope.

Pure logic (no I/O). The envelope is a dict with exactly the seed's keys, shaped like the Avro
``WorkflowReceipt`` record (timestamps in microseconds, steps as ``StepReceipt`` records) so a
sink can encode it with ``schemas.encode`` unchanged; :func:`envelope_to_json` renders it as
JSON text (bytes as hex).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chio_receipts.schemas import (
    ENVELOPE_VERSION,
    Outcome,
    StepReceipt,
    Verdict,
    chain_root,
    receipt_hash,
)

__all__ = [
    "ENVELOPE_KEYS",
    "WorkflowReceipt",
    "WorkflowStepReceipt",
    "envelope_to_json",
    "parse_outcome",
]

ENVELOPE_KEYS = (
    "version",
    "workflow_id",
    "run_id",
    "parent_workflow_ids",
    "started_at",
    "completed_at",
    "outcome",
    "step_count",
    "allow_count",
    "deny_count",
    "steps",
    "metadata",
)
"""The keys of a ``chio-temporal/v1`` envelope, in order."""

_OUTCOMES = {"success": Outcome.SUCCESS, "failure": Outcome.FAILURE, "cancelled": Outcome.CANCELLED}


def parse_outcome(outcome: str | Outcome) -> Outcome:
    """``"success"`` | ``"failure"`` | ``"cancelled"`` (or an :class:`Outcome`) to the enum."""
    if isinstance(outcome, Outcome):
        return outcome
    try:
        return _OUTCOMES[outcome.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"outcome must be 'success', 'failure' or 'cancelled', got {outcome!r}"
        ) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowStepReceipt:
    """One signed step of a run: the receipt and its signed wire body."""

    receipt: StepReceipt
    body: bytes = field(repr=False)

    @property
    def receipt_id(self) -> str:
        """The receipt's UUIDv7."""
        return self.receipt.receipt_id

    @property
    def activity_type(self) -> str:
        """Activity type of the step."""
        return self.receipt.activity_type

    @property
    def verdict(self) -> Verdict:
        """ALLOW or DENY."""
        return self.receipt.verdict

    @property
    def allowed(self) -> bool:
        """True when the step was allowed."""
        return self.receipt.allowed

    @property
    def hash(self) -> bytes:
        """SHA-256 of the wire body (what the next step's ``prev_hash`` refers to)."""
        return receipt_hash(self.body)

    def to_record(self) -> dict[str, Any]:
        """The step as an Avro ``StepReceipt`` record dict."""
        return self.receipt.to_avro()


@dataclass(slots=True, kw_only=True)
class WorkflowReceipt:
    """The in-flight aggregate of one run's steps on this worker.

    Not thread-safe by itself: the interceptor mutates it from the event loop only.
    """

    workflow_id: str
    run_id: str
    namespace: str = ""
    workflow_type: str = ""
    task_queue: str = ""
    parent_workflow_ids: tuple[str, ...] = ()
    started_at: int = 0
    completed_at: int | None = None
    outcome: Outcome = Outcome.UNKNOWN
    steps: list[WorkflowStepReceipt] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        """True once ``finalize`` was called."""
        return self.completed_at is not None

    @property
    def step_count(self) -> int:
        """Number of steps."""
        return len(self.steps)

    @property
    def allow_count(self) -> int:
        """Steps allowed."""
        return sum(1 for s in self.steps if s.allowed)

    @property
    def deny_count(self) -> int:
        """Steps denied."""
        return sum(1 for s in self.steps if s.verdict is Verdict.DENY)

    def add_step(self, step: WorkflowStepReceipt) -> None:
        """Append a step; the first step's identity fills the run's context."""
        r = step.receipt
        if (r.workflow_id, r.run_id) != (self.workflow_id, self.run_id):
            raise ValueError(
                f"step of run {r.workflow_id}/{r.run_id} added to {self.workflow_id}/{self.run_id}"
            )
        if not self.steps:
            self.namespace = self.namespace or r.namespace
            self.workflow_type = self.workflow_type or r.workflow_type
            self.task_queue = self.task_queue or r.task_queue
        if not self.started_at or r.scheduled_at < self.started_at:
            self.started_at = r.scheduled_at
        self.steps.append(step)

    def finalize(self, outcome: str | Outcome, completed_at: int) -> None:
        """Mark the run closed with ``outcome`` at ``completed_at`` (µs)."""
        self.outcome = parse_outcome(outcome)
        self.completed_at = completed_at

    def to_envelope(self) -> dict[str, Any]:
        """The ``chio-temporal/v1`` envelope: exactly :data:`ENVELOPE_KEYS`."""
        steps = sorted(self.steps, key=lambda s: s.receipt_id)
        metadata = {
            "namespace": self.namespace,
            "workflow_type": self.workflow_type,
            "task_queue": self.task_queue,
            "revision": "1",
            "source": "worker",
            "chain_root": chain_root(s.hash for s in steps).hex(),
            "key_ids": ",".join(sorted({s.receipt.key_id for s in steps})),
            **self.metadata,
        }
        return {
            "version": ENVELOPE_VERSION,
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "parent_workflow_ids": list(self.parent_workflow_ids),
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "outcome": self.outcome.value.lower(),
            "step_count": len(steps),
            "allow_count": sum(1 for s in steps if s.allowed),
            "deny_count": sum(1 for s in steps if s.verdict is Verdict.DENY),
            "steps": [s.to_record() for s in steps],
            "metadata": metadata,
        }


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def envelope_to_json(envelope: Mapping[str, Any]) -> str:
    """The envelope as canonical JSON text (sorted keys, bytes as hex)."""
    return json.dumps(envelope, default=_json_default, sort_keys=True, separators=(",", ":"))
