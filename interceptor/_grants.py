"""Workflow grants: a capability pinned to a workflow id (and optionally one run)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeAlias

import temporalio.activity

from chio_receipts.interceptor._errors import ChioTemporalConfigError
from chio_receipts.interceptor._model import CapabilityToken, Scope, is_subset, normalize_scope

if TYPE_CHECKING:
    from chio_receipts.interceptor._evaluator import Evaluator

__all__ = [
    "ActivityGrantOverride",
    "GrantResolver",
    "WorkflowGrant",
    "check_subset",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowGrant:
    """A capability token pinned to a Temporal ``workflow_id`` (and ``run_id`` if given).

    Activities of the workflow inherit it; :meth:`attenuate_for_activity` mints strictly
    narrower child grants for single activity types.
    """

    workflow_id: str
    token: CapabilityToken
    tool_server: str = ""
    run_id: str | None = None

    def __post_init__(self) -> None:
        if not self.workflow_id:
            raise ChioTemporalConfigError("a WorkflowGrant needs a workflow_id")

    @property
    def capability_id(self) -> str:
        """Id of the grant's capability."""
        return self.token.id

    @property
    def scope(self) -> Scope:
        """Tools the grant allows."""
        return self.token.scope

    async def attenuate_for_activity(
        self,
        chio: Evaluator,
        *,
        new_scope: Iterable[str],
        tool_server: str | None = None,
        ttl_seconds: float | None = None,
    ) -> WorkflowGrant:
        """A child grant for the same workflow whose scope is a subset of this one's.

        ``chio`` is any :class:`Evaluator`; a ``ChioClient`` is one.
        A wider or disjoint ``new_scope`` raises :class:`ChioTemporalConfigError` before the
        sidecar is asked; the sidecar checks again when it mints the child.
        """
        scope = normalize_scope(new_scope)
        check_subset(scope, self.scope, what="attenuate_for_activity")
        token = await chio.attenuate(self.token.id, scope=scope, ttl_seconds=ttl_seconds)
        check_subset(token.scope, self.scope, what="the sidecar's attenuated capability")
        return replace(
            self, token=token, tool_server=self.tool_server if tool_server is None else tool_server
        )


def check_subset(child: Iterable[str], parent: Iterable[str], *, what: str) -> None:
    """Raise :class:`ChioTemporalConfigError` unless ``child`` is a non-empty subset."""
    child_set = set(child)
    if not child_set:
        raise ChioTemporalConfigError(f"{what}: the scope is empty")
    if not is_subset(child_set, parent):
        extra = sorted(child_set - set(parent))
        raise ChioTemporalConfigError(
            f"{what}: scope {sorted(child_set)} is not a subset of the workflow grant's "
            f"{sorted(parent)} (outside it: {extra})"
        )


ActivityGrantOverride: TypeAlias = Callable[[temporalio.activity.Info], WorkflowGrant | None]
"""Per-activity-type hook: ``fn(activity.Info)`` returns a narrower grant, or None to fall back
to the workflow grant. Registered with ``register_activity_grant_override``."""

GrantResolver: TypeAlias = Callable[[temporalio.activity.Info], WorkflowGrant | None]
"""Fallback grant lookup for workers adopting the interceptor without registering grants per
workflow id (for example one grant per task queue): ``fn(activity.Info)`` -> grant or None."""
