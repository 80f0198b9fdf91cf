"""Guards: the checks that decide inside a capability's grants, after scope and expiry pass.

A guard sees one call (:class:`CallContext`: the capability, the grant that matched, the
call's parameters and its Temporal context) and answers with a :class:`GuardResult`: allow,
deny, or "approval required". The sidecar runs its guards in order; the first answer that is
not an allow decides, and every guard that ran leaves its result as the receipt's
``evidence`` (the kernel's ``GuardEvidence``: ``guard_name``, ``verdict``, ``details``).

Guards are pure functions of the call and of state they own (a policy set, a budget store);
they never see the network. Parameters never appear in a result's reason or details: a
reason names the guard, the constraint and the parameter's *name*, never its value.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "CallContext",
    "Guard",
    "GuardResult",
    "GuardVerdict",
    "evidence_json",
    "run_guards",
]


class GuardVerdict(enum.StrEnum):
    """What one guard says of one call."""

    ALLOW = "allow"
    DENY = "deny"
    APPROVAL_REQUIRED = "pending_approval"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallContext:
    """One call as the guards see it.

    ``grant`` is the kernel-format grant that matched (``None`` for a capability with no
    kernel-format token); ``token`` the kernel-format capability token. ``temporal`` holds the
    attempt's Temporal context (``namespace``, ``workflow_id``, ``run_id``, ``workflow_type``,
    ``task_queue``, ``activity_id``, ``activity_type``, ``attempt``, ``is_local``) where the
    caller gave it, empty on the kernel's own routes.
    """

    capability_id: str
    tool_server: str
    tool: str
    parameters: Any = field(default=None, repr=False)
    grant: Mapping[str, Any] | None = None
    grant_index: int | None = None
    token: Mapping[str, Any] | None = None
    temporal: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = ""
    at_us: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardResult:
    """One guard's answer. ``constraint`` names the constraint or policy that decided (empty
    for an allow); ``details`` is JSON-ready evidence (never parameter values)."""

    guard: str
    verdict: GuardVerdict
    reason: str = ""
    constraint: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.verdict is GuardVerdict.ALLOW


class Guard(Protocol):
    """A check run on every call that scope and expiry allowed."""

    @property
    def name(self) -> str: ...

    def check(self, call: CallContext) -> GuardResult: ...


def run_guards(
    guards: Iterable[Guard], call: CallContext
) -> tuple[GuardResult | None, tuple[GuardResult, ...]]:
    """Run ``guards`` in order: the first result that is not an allow (or ``None``), and the
    results of every guard that ran (the evidence)."""
    ran: list[GuardResult] = []
    for guard in guards:
        result = guard.check(call)
        ran.append(result)
        if not result.allowed:
            return result, tuple(ran)
    return None, tuple(ran)


def evidence_json(results: Sequence[GuardResult]) -> list[dict[str, Any]]:
    """The kernel's ``GuardEvidence`` list for a receipt body."""
    out: list[dict[str, Any]] = []
    for r in results:
        item: dict[str, Any] = {"guard_name": r.guard, "verdict": r.allowed}
        details: dict[str, Any] = {"outcome": r.verdict.value}
        if r.constraint:
            details["constraint"] = r.constraint
        if r.reason:
            details["reason"] = r.reason
        details.update(r.details)
        item["details"] = json.dumps(details, sort_keys=True, separators=(",", ":"))
        out.append(item)
    return out
