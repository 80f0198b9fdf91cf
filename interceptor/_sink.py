"""``InMemoryReceiptSink``: a ``schemas.ReceiptSink`` kept in memory (tests, single process)."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from chio_receipts.schemas import RunCompletion, StepOutcome, StepReceipt

__all__ = ["InMemoryReceiptSink"]


class InMemoryReceiptSink:
    """Keeps every published step, outcome record, completion and envelope in memory, in arrival
    order.

    ``max_items`` bounds each list (oldest dropped first); None keeps everything.
    """

    def __init__(self, *, max_items: int | None = None) -> None:
        self.steps: deque[tuple[StepReceipt, bytes]] = deque(maxlen=max_items)
        self.outcomes: deque[StepOutcome] = deque(maxlen=max_items)
        self.completions: deque[RunCompletion] = deque(maxlen=max_items)
        self.envelopes: deque[Mapping[str, Any]] = deque(maxlen=max_items)

    def __repr__(self) -> str:
        return (
            f"InMemoryReceiptSink(steps={len(self.steps)}, outcomes={len(self.outcomes)}, "
            f"completions={len(self.completions)}, envelopes={len(self.envelopes)})"
        )

    async def publish_step(self, receipt: StepReceipt, body: bytes) -> None:
        """Keep one signed step receipt."""
        self.steps.append((receipt, body))

    async def publish_outcome(self, outcome: StepOutcome) -> None:
        """Keep one outcome record."""
        self.outcomes.append(outcome)

    async def publish_completion(self, event: RunCompletion) -> None:
        """Keep one run-completion event."""
        self.completions.append(event)

    async def publish_envelope(self, envelope: Mapping[str, Any]) -> None:
        """Keep one finalized envelope."""
        self.envelopes.append(envelope)

    def receipts_for(self, workflow_id: str, run_id: str | None = None) -> list[StepReceipt]:
        """Step receipts of one workflow (and run, if given), in arrival order."""
        return [
            r
            for r, _ in self.steps
            if r.workflow_id == workflow_id and (run_id is None or r.run_id == run_id)
        ]
