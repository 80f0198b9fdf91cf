"""The oracle: every receipt id the interceptor handed to the sink, fsync'd, before the body.

:class:`OracleSink` wraps the real sink (the streamer). For every step it appends a ``proposed``
line (fsync'd) before delegating and an ``accepted`` line (fsync'd) once the sink accepted the
receipt, which is before the activity body can run; a refusal appends ``refused``. So:

- every ``accepted`` id must reach ClickHouse (I1, no loss);
- every id in ClickHouse must at least be ``proposed`` (I2, nothing invented): a crash between
  the two lines may or may not have left the receipt in the spool, and both are correct.

Failpoints ``sink.before_publish`` and ``sink.after_publish`` sit exactly "after the decision,
before / after the spool write" (fault row F7).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chio_receipts.schemas import (
    ReceiptSink,
    ReceiptSinkError,
    RunCompletion,
    StepOutcome,
    StepReceipt,
)
from tests.support.faults.failpoints import failpoint

__all__ = ["Oracle", "OracleEntry", "OracleSink", "read_oracle"]


class OracleSink:
    """A :class:`schemas.ReceiptSink` that logs receipt ids to an fsync'd file, then delegates."""

    def __init__(self, inner: ReceiptSink, path: str | os.PathLike[str]) -> None:
        self.inner = inner
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def _log(self, event: str, receipt: StepReceipt) -> None:
        line = json.dumps(
            {
                "e": event,
                "id": receipt.receipt_id,
                "ns": receipt.namespace,
                "wf": receipt.workflow_id,
                "run": receipt.run_id,
                "act": receipt.activity_id,
                "attempt": receipt.attempt,
                "verdict": receipt.verdict.value,
                "pid": os.getpid(),
            },
            separators=(",", ":"),
        )
        with self._lock:
            os.write(self._fd, line.encode() + b"\n")
            os.fsync(self._fd)

    async def publish_step(self, receipt: StepReceipt, body: bytes) -> None:
        """Log ``proposed``, delegate, log ``accepted`` (or ``refused``)."""
        self._log("proposed", receipt)
        failpoint("sink.before_publish")
        try:
            await self.inner.publish_step(receipt, body)
        except ReceiptSinkError:
            self._log("refused", receipt)
            raise
        self._log("accepted", receipt)
        failpoint("sink.after_publish")

    async def publish_completion(self, event: RunCompletion) -> None:
        """Delegate."""
        await self.inner.publish_completion(event)

    async def publish_envelope(self, envelope: Mapping[str, Any]) -> None:
        """Delegate."""
        await self.inner.publish_envelope(envelope)

    async def publish_outcome(self, outcome: StepOutcome) -> None:
        """Delegate (outcome records are not receipts the oracle tracks)."""
        await self.inner.publish_outcome(outcome)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close the log."""
        os.close(self._fd)


@dataclass(frozen=True, slots=True)
class OracleEntry:
    """One receipt the oracle saw."""

    receipt_id: str
    namespace: str
    workflow_id: str
    run_id: str
    activity_id: str
    attempt: int
    verdict: str


@dataclass(slots=True)
class Oracle:
    """What the oracle logs say: receipts proposed, accepted and refused by the sinks."""

    proposed: dict[str, OracleEntry] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)

    def steps_of(self, workflow_id: str, run_id: str) -> set[str]:
        """Accepted receipt ids of one run."""
        return {
            i
            for i in self.accepted
            if self.proposed[i].workflow_id == workflow_id and self.proposed[i].run_id == run_id
        }

    def attempts_of(self, workflow_id: str, run_id: str) -> set[tuple[str, int]]:
        """``(activity_id, attempt)`` of every accepted receipt of one run."""
        return {
            (self.proposed[i].activity_id, self.proposed[i].attempt)
            for i in self.steps_of(workflow_id, run_id)
        }

    def runs(self) -> set[tuple[str, str]]:
        """(workflow_id, run_id) of every run with an accepted receipt."""
        return {(self.proposed[i].workflow_id, self.proposed[i].run_id) for i in self.accepted}


def read_oracle(paths: list[Path]) -> Oracle:
    """Merge oracle logs (a torn last line of a killed process is ignored: it was not fsync'd
    completely, so its receipt was never accepted)."""
    oracle = Oracle()
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_bytes().splitlines():
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            rid = item["id"]
            if item["e"] == "proposed":
                oracle.proposed[rid] = OracleEntry(
                    receipt_id=rid,
                    namespace=item["ns"],
                    workflow_id=item["wf"],
                    run_id=item["run"],
                    activity_id=item["act"],
                    attempt=int(item["attempt"]),
                    verdict=item["verdict"],
                )
            elif item["e"] == "accepted":
                oracle.accepted.add(rid)
            elif item["e"] == "refused":
                oracle.refused.add(rid)
    return oracle
