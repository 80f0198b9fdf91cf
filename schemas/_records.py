"""Records that travel through the pipeline, mirroring the Avro schemas in ``avro/``.

Timestamps are integer microseconds since the Unix epoch (UTC) so that encoding needs no
``datetime`` conversion on the hot path. Field order equals the Avro field order.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "ENVELOPE_VERSION",
    "AccountState",
    "AttemptAccount",
    "CompletionSource",
    "ExpectedAttempt",
    "Outcome",
    "RunCompletion",
    "StepOutcome",
    "StepReceipt",
    "StepStatus",
    "Verdict",
    "run_key",
]

ENVELOPE_VERSION = "chio-temporal/v1"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


class Verdict(enum.StrEnum):
    """Policy decision carried by a step receipt."""

    UNKNOWN = "UNKNOWN"
    ALLOW = "ALLOW"
    DENY = "DENY"
    PENDING_APPROVAL = "PENDING_APPROVAL"
    """A guard asked for a person's approval: the attempt did not run (schema v4)."""


class Outcome(enum.StrEnum):
    """How a workflow run closed."""

    UNKNOWN = "UNKNOWN"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELLED = "CANCELLED"
    TERMINATED = "TERMINATED"
    TIMED_OUT = "TIMED_OUT"
    CONTINUED_AS_NEW = "CONTINUED_AS_NEW"


class StepStatus(enum.StrEnum):
    """How an activity attempt ended (schema ``StepOutcome.status``)."""

    UNKNOWN = "UNKNOWN"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    GATE_FAILED = "GATE_FAILED"


class AccountState(enum.StrEnum):
    """How an attempt Temporal started is accounted for in its envelope."""

    UNKNOWN = "UNKNOWN"
    RECEIPTED = "RECEIPTED"
    GATE_FAILED = "GATE_FAILED"
    WORKER_LOST = "WORKER_LOST"
    MISSING = "MISSING"


class CompletionSource(enum.StrEnum):
    """Who emitted a run-completion event."""

    UNKNOWN = "UNKNOWN"
    WATCHER = "WATCHER"
    FINALIZE = "FINALIZE"


def run_key(namespace: str, workflow_id: str, run_id: str) -> str:
    """The Kafka key of every event of one run: ``namespace/workflow_id/run_id``."""
    return f"{namespace}/{workflow_id}/{run_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StepReceipt:
    """One signed decision for one activity attempt (schema ``StepReceipt``)."""

    receipt_id: str
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    activity_id: str
    activity_type: str
    attempt: int
    is_local: bool
    tool_server: str
    tool: str
    action: str
    resource: str
    subject: str
    capability_id: str
    capability_chain: tuple[str, ...]
    scope: tuple[str, ...]
    verdict: Verdict
    reason: str
    argument_digest: str
    argument_key_id: str
    scheduled_at: int
    started_at: int
    evaluated_at: int
    latency_us: int
    worker_identity: str
    prev_hash: bytes = b""
    chio_receipt: str = field(default="", repr=False)
    """The Chio kernel-format receipt of the decision as compact JSON, exactly as signed."""
    chio_signed: bytes = field(default=b"", repr=False)
    """The exact bytes the signature in ``chio_receipt`` covers: ``JCS({"body", "id"})``."""
    trace_id: str = ""
    """W3C trace id of the OpenTelemetry span the attempt ran in; empty when not traced."""
    span_id: str = ""
    """W3C span id of that span; empty when not traced."""
    key_id: str = ""
    signature: bytes = field(default=b"", repr=False)

    @property
    def run_key(self) -> str:
        """Kafka key of this receipt's run."""
        return run_key(self.namespace, self.workflow_id, self.run_id)

    @property
    def allowed(self) -> bool:
        """True when the verdict is ALLOW."""
        return self.verdict is Verdict.ALLOW

    def to_avro(self) -> dict[str, Any]:
        """The record as the dict fastavro encodes (enums as symbols, sequences as lists)."""
        # Hot path (every receipt): one C-level attrgetter instead of dataclasses.fields().
        d = dict(zip(_STEP_NAMES, _step_values(self), strict=True))
        d["verdict"] = self.verdict.value
        d["capability_chain"] = list(self.capability_chain)
        d["scope"] = list(self.scope)
        return d

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> StepReceipt:
        """Build from a decoded Avro dict (ids as str, timestamps as int microseconds)."""
        kw = {name: d[name] for name in _STEP_NAMES if name in d}
        kw["receipt_id"] = str(d["receipt_id"])
        kw["verdict"] = _enum(Verdict, d["verdict"])
        kw["capability_chain"] = tuple(d["capability_chain"])
        kw["scope"] = tuple(d["scope"])
        for ts in ("scheduled_at", "started_at", "evaluated_at"):
            kw[ts] = _micros(d[ts])
        return cls(**kw)

    def with_signature(self, *, key_id: str, signature: bytes) -> StepReceipt:
        """A copy carrying ``signature`` made with ``key_id``."""
        return dataclasses.replace(self, key_id=key_id, signature=signature)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCompletion:
    """A workflow run closed, or was finalized explicitly (schema ``RunCompletion``)."""

    event_id: str
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    outcome: Outcome
    started_at: int
    closed_at: int
    parent_workflow_ids: tuple[str, ...] = ()
    parent_run_id: str | None = None
    continued_from_run_id: str | None = None
    continued_as_new_run_id: str | None = None
    expected_steps: int | None = None
    source: CompletionSource = CompletionSource.UNKNOWN
    emitted_at: int = 0
    expected_attempts: tuple[ExpectedAttempt, ...] = ()
    """Every attempt the run's history shows as started (watcher only; empty otherwise)."""

    @property
    def run_key(self) -> str:
        """Kafka key of this event's run."""
        return run_key(self.namespace, self.workflow_id, self.run_id)

    def to_avro(self) -> dict[str, Any]:
        """The record as the dict fastavro encodes."""
        d = dict(zip(_RUN_NAMES, _run_values(self), strict=True))
        d["outcome"] = self.outcome.value
        d["source"] = self.source.value
        d["parent_workflow_ids"] = list(self.parent_workflow_ids)
        d["expected_attempts"] = [a.to_avro() for a in self.expected_attempts]
        return d

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> RunCompletion:
        """Build from a decoded Avro dict."""
        kw = {name: d[name] for name in _RUN_NAMES if name in d}
        kw["event_id"] = str(d["event_id"])
        kw["outcome"] = _enum(Outcome, d["outcome"])
        kw["source"] = _enum(CompletionSource, d.get("source", "UNKNOWN"))
        kw["parent_workflow_ids"] = tuple(d["parent_workflow_ids"])
        kw["expected_attempts"] = tuple(
            ExpectedAttempt.from_avro(a) for a in d.get("expected_attempts", ())
        )
        for ts in ("started_at", "closed_at", "emitted_at"):
            if ts in d:
                kw[ts] = _micros(d[ts])
        return cls(**kw)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpectedAttempt:
    """One attempt a run's Temporal history shows as started (``RunCompletion``)."""

    activity_id: str
    activity_type: str
    attempt: int
    is_local: bool
    temporal_end: str = ""
    """completed, failed:<type>, timed_out:<kind>, cancelled; empty when history does not say."""

    @property
    def key(self) -> tuple[str, int]:
        """``(activity_id, attempt)``: what a receipt or outcome of this attempt carries."""
        return (self.activity_id, self.attempt)

    def to_avro(self) -> dict[str, Any]:
        """The record as the dict fastavro encodes."""
        return {
            "activity_id": self.activity_id,
            "activity_type": self.activity_type,
            "attempt": self.attempt,
            "is_local": self.is_local,
            "temporal_end": self.temporal_end,
        }

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> ExpectedAttempt:
        """Build from a decoded Avro dict."""
        return cls(
            activity_id=d["activity_id"],
            activity_type=d["activity_type"],
            attempt=d["attempt"],
            is_local=d["is_local"],
            temporal_end=d.get("temporal_end", ""),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptAccount:
    """How one attempt Temporal started is accounted for in an envelope (``WorkflowReceipt``)."""

    activity_id: str
    activity_type: str
    attempt: int
    is_local: bool
    account: AccountState
    reason: str = ""
    outcome: StepStatus = StepStatus.UNKNOWN

    @property
    def explained(self) -> bool:
        """True unless the attempt is a real gap (:attr:`AccountState.MISSING`)."""
        return self.account is not AccountState.MISSING

    def to_avro(self) -> dict[str, Any]:
        """The record as the dict fastavro encodes."""
        return {
            "activity_id": self.activity_id,
            "activity_type": self.activity_type,
            "attempt": self.attempt,
            "is_local": self.is_local,
            "account": self.account.value,
            "reason": self.reason,
            "outcome": self.outcome.value,
        }

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> AttemptAccount:
        """Build from a decoded Avro dict."""
        return cls(
            activity_id=d["activity_id"],
            activity_type=d["activity_type"],
            attempt=d["attempt"],
            is_local=d["is_local"],
            account=_enum(AccountState, d.get("account", "UNKNOWN")),
            reason=d.get("reason", ""),
            outcome=_enum(StepStatus, d.get("outcome", "UNKNOWN")),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StepOutcome:
    """What happened to one attempt after its decision (schema ``StepOutcome``).

    A gate failure (``status`` GATE_FAILED) has no decision: ``decision_receipt_id`` is empty
    and ``error_type`` says why the gate refused the attempt."""

    outcome_id: str
    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    task_queue: str
    activity_id: str
    activity_type: str
    attempt: int
    is_local: bool
    tool_server: str
    tool: str
    capability_id: str
    decision_receipt_id: str
    decision_chio_id: str = ""
    status: StepStatus = StepStatus.UNKNOWN
    error_type: str = ""
    started_at: int = 0
    ended_at: int = 0
    duration_us: int = 0
    result_digest: str = ""
    result_key_id: str = ""
    worker_identity: str = ""
    trace_id: str = ""
    span_id: str = ""
    chio_receipt: str = field(default="", repr=False)
    """The Chio ``trace_observation`` receipt of this outcome as compact JSON, as signed."""
    chio_signed: bytes = field(default=b"", repr=False)
    """The exact bytes the signature in ``chio_receipt`` covers: ``JCS({"body", "id"})``."""

    @property
    def run_key(self) -> str:
        """Kafka key of this record's run."""
        return run_key(self.namespace, self.workflow_id, self.run_id)

    @property
    def key(self) -> tuple[str, int]:
        """``(activity_id, attempt)`` of the attempt this record is about."""
        return (self.activity_id, self.attempt)

    def to_avro(self) -> dict[str, Any]:
        """The record as the dict fastavro encodes."""
        d = dict(zip(_OUTCOME_NAMES, _outcome_values(self), strict=True))
        d["status"] = self.status.value
        return d

    @classmethod
    def from_avro(cls, d: dict[str, Any]) -> StepOutcome:
        """Build from a decoded Avro dict (ids as str, timestamps as int microseconds)."""
        kw = {name: d[name] for name in _OUTCOME_NAMES if name in d}
        kw["outcome_id"] = str(d["outcome_id"])
        kw["status"] = _enum(StepStatus, d.get("status", "UNKNOWN"))
        for ts in ("started_at", "ended_at"):
            kw[ts] = _micros(d[ts])
        signed = kw.get("chio_signed", b"")
        if isinstance(signed, str):  # a resolved default reads as str for a bytes field
            kw["chio_signed"] = signed.encode("latin-1")
        return cls(**kw)


# Field names in Avro order, computed once (dataclasses.fields() costs microseconds per call).
_STEP_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StepReceipt))
_step_values = operator.attrgetter(*_STEP_NAMES)
_RUN_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunCompletion))
_run_values = operator.attrgetter(*_RUN_NAMES)
_OUTCOME_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StepOutcome))
_outcome_values = operator.attrgetter(*_OUTCOME_NAMES)


def _enum(kind: type[Any], value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        return kind("UNKNOWN")


def _micros(value: Any) -> int:
    """Accept int microseconds or a datetime (fastavro's logical-type reader)."""
    if isinstance(value, int):
        return value
    return int((value - _EPOCH) // _MICRO)
