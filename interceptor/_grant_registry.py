"""The grant registry: which ``WorkflowGrant`` covers an activity attempt.

Lookup order for an attempt: the grant registered for (workflow_id, run_id), then the one for
workflow_id alone, then the ``grant_resolver``. An override registered for the activity type may
then narrow that grant, never widen it: an override outside the workflow grant's scope resolves to
a deny with ``config_error`` set, so the gate can fail the attempt as misconfigured.

Grants are registered per workflow and never flushed, so expired ones are pruned whenever the
table doubles. The registry is thread-safe: grants may be registered from any thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import temporalio.activity

from chio_receipts.interceptor._errors import ChioTemporalConfigError
from chio_receipts.interceptor._grants import ActivityGrantOverride, GrantResolver, WorkflowGrant
from chio_receipts.interceptor._model import is_subset, now_us

__all__ = ["GrantRegistry", "GrantResolution"]

_PRUNE_FLOOR = 1024


@dataclass(frozen=True, slots=True)
class GrantResolution:
    """The grant an attempt runs under, or why it has none.

    ``deny_reason`` set: the attempt must be denied (the sidecar still signs the deny).
    ``config_error`` set: the deny is due to a misconfigured override, not to policy.
    """

    grant: WorkflowGrant | None
    deny_reason: str | None = None
    config_error: bool = False


class GrantRegistry:
    """Workflow grants, per-activity-type overrides and the fallback resolver."""

    def __init__(self, resolver: GrantResolver | None = None) -> None:
        self._resolver = resolver
        self._grants: dict[tuple[str, str | None], WorkflowGrant] = {}
        self._overrides: dict[str, ActivityGrantOverride] = {}
        self._prune_at = _PRUNE_FLOOR
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._grants)

    def register(self, grant: WorkflowGrant) -> None:
        """Register ``grant`` for its workflow_id (and run_id, if pinned), replacing an earlier
        one for the same key; prune expired grants when the table has doubled."""
        with self._lock:
            self._grants[(grant.workflow_id, grant.run_id)] = grant
            if len(self._grants) > self._prune_at:
                self._prune_expired()

    def _prune_expired(self) -> None:
        now = now_us()
        for key in [k for k, g in self._grants.items() if g.expired(now)]:
            del self._grants[key]
        self._prune_at = max(_PRUNE_FLOOR, 2 * len(self._grants))

    def unregister(self, workflow_id: str, run_id: str | None = None) -> None:
        """Forget a registered grant (no error if absent)."""
        with self._lock:
            self._grants.pop((workflow_id, run_id), None)

    def register_override(self, activity_type: str, fn: ActivityGrantOverride) -> None:
        """Register ``fn(activity.Info) -> WorkflowGrant | None`` for ``activity_type``."""
        if not callable(fn):
            raise ChioTemporalConfigError("a grant override must be callable")
        with self._lock:
            self._overrides[activity_type] = fn

    def grant_for(self, workflow_id: str, run_id: str | None) -> WorkflowGrant | None:
        """The registered grant for this run: pinned to the run first, then to the workflow."""
        with self._lock:
            if run_id is not None:
                grant = self._grants.get((workflow_id, run_id))
                if grant is not None:
                    return grant
            return self._grants.get((workflow_id, None))

    def resolve(self, info: temporalio.activity.Info) -> GrantResolution:
        """The grant for one attempt: registered, else resolved, then narrowed by an override."""
        base = self._workflow_grant(info)
        if base is None:
            return GrantResolution(None, _no_grant_reason(info))
        override = self._overrides.get(info.activity_type)
        narrowed = override(info) if override is not None else None
        if narrowed is None:
            return GrantResolution(base)
        if not narrowed.scope or not is_subset(narrowed.scope, base.scope):
            return GrantResolution(
                narrowed, _widening_reason(info, narrowed, base), config_error=True
            )
        return GrantResolution(narrowed)

    def _workflow_grant(self, info: temporalio.activity.Info) -> WorkflowGrant | None:
        grant = self.grant_for(info.workflow_id or "", info.workflow_run_id)
        if grant is None and self._resolver is not None:
            grant = self._resolver(info)
        return grant


def _no_grant_reason(info: temporalio.activity.Info) -> str:
    workflow_id = info.workflow_id or ""
    return (
        f"no WorkflowGrant for workflow {workflow_id!r} run {info.workflow_run_id!r}: "
        "register one with interceptor.register_workflow_grant("
        "WorkflowGrant(workflow_id=..., token=...)) before starting the workflow, or pass "
        "grant_resolver= to ChioActivityInterceptor"
    )


def _widening_reason(
    info: temporalio.activity.Info, narrowed: WorkflowGrant, base: WorkflowGrant
) -> str:
    extra = sorted(set(narrowed.scope) - set(base.scope))
    return (
        f"grant override for activity type {info.activity_type!r} has scope "
        f"{list(narrowed.scope)} which is not a subset of the workflow grant's "
        f"{list(base.scope)} (outside it: {extra})"
    )
