"""Workflow grants: a capability pinned to a workflow id (and optionally one run)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeAlias

import temporalio.activity
from chio_sdk.models import CapabilityToken as SdkCapabilityToken
from chio_sdk.models import ChioScope

from chio_receipts.interceptor._errors import ChioTemporalConfigError
from chio_receipts.interceptor._model import CapabilityToken, Scope, is_subset, now_us
from chio_receipts.interceptor._scope import (
    AnyToken,
    ScopeLike,
    raw_token,
    token_expires_at_us,
    token_scope,
    tool_names,
)
from chio_receipts.interceptor._sdk import AnyClient, attenuate_token

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

    ``token`` is what ``chio_sdk.ChioClient.create_capability`` returns (a
    ``chio_sdk.models.CapabilityToken``) or the project's own ``CapabilityToken``. Activities of
    the workflow inherit it; :meth:`attenuate_for_activity` mints strictly narrower child
    grants for single activity types. ``raw_token`` is the token's signed kernel-format JSON
    when it can be had (an SDK token whose signature verifies once respelled), else None.
    """

    workflow_id: str
    token: AnyToken
    tool_server: str = ""
    run_id: str | None = None
    raw_token: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.workflow_id:
            raise ChioTemporalConfigError("a WorkflowGrant needs a workflow_id")
        if not isinstance(self.token, CapabilityToken | SdkCapabilityToken):
            raise ChioTemporalConfigError(
                "WorkflowGrant.token must be a chio_sdk.models.CapabilityToken (from "
                "chio.create_capability) or the project's CapabilityToken, got "
                f"{type(self.token).__name__}"
            )
        object.__setattr__(self, "raw_token", raw_token(self.token))

    @property
    def capability_id(self) -> str:
        """Id of the grant's capability."""
        return self.token.id

    @property
    def scope(self) -> Scope:
        """Tools the grant allows (for an SDK token: the ``tool_name`` of its Invoke grants)."""
        return token_scope(self.token)

    @property
    def chio_scope(self) -> ChioScope | None:
        """The token's ``ChioScope`` when it is an SDK token, else None."""
        return self.token.scope if isinstance(self.token, SdkCapabilityToken) else None

    @property
    def expires_at_us(self) -> int:
        """Expiry of the capability, microseconds since the epoch."""
        return token_expires_at_us(self.token)

    def expired(self, at_us: int | None = None) -> bool:
        """True once ``at_us`` (default: now) is at or past the capability's expiry."""
        return (now_us() if at_us is None else at_us) >= self.expires_at_us

    async def attenuate_for_activity(
        self,
        chio: AnyClient | Evaluator,
        *,
        new_scope: ScopeLike,
        tool_server: str | None = None,
        ttl_seconds: float | None = None,
    ) -> WorkflowGrant:
        """A child grant for the same workflow whose scope is a subset of this one's.

        ``chio`` is a ``chio_sdk.ChioClient`` (its ``attenuate_capability``; the grant's token
        must then be an SDK token), the project's ``ChioClient`` or any :class:`Evaluator`.
        ``new_scope`` is ``scope_for(...)`` or tool names. A wider or disjoint ``new_scope``
        raises :class:`ChioTemporalConfigError` before the sidecar is asked; the sidecar checks
        again when it mints the child.
        """
        check_subset(tool_names(new_scope), self.scope, what="attenuate_for_activity")
        token = await attenuate_token(chio, self.token, new_scope, ttl_seconds)
        check_subset(token_scope(token), self.scope, what="the sidecar's attenuated capability")
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
