"""Scopes and tokens in either form: chio-sdk-python's objects or the project's own.

The seed's users build scopes with :func:`scope_for` (a ``chio_sdk.models.ChioScope``) and get
tokens from ``chio_sdk.ChioClient.create_capability`` (a ``chio_sdk.models.CapabilityToken``);
the project's own client mints :class:`~chio_receipts.schemas.CapabilityToken` from tool names.
The worker decides on tool names, so everything here reduces a scope or a token to them, and
rebuilds the signed kernel-format JSON of an SDK token when it still verifies
(:func:`raw_token`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias

from chio_sdk.models import CapabilityToken as SdkCapabilityToken
from chio_sdk.models import ChioScope, Operation, ToolGrant

from chio_receipts.interceptor._errors import ChioTemporalConfigError
from chio_receipts.interceptor._model import CapabilityToken, Scope, normalize_scope
from chio_receipts.schemas import SDK_OPERATION_SPELLING, verify_capability_token

__all__ = [
    "ANY_SERVER",
    "CAPABILITY_SCHEMA",
    "AnyToken",
    "ScopeLike",
    "narrow_scope",
    "raw_token",
    "scope_for",
    "token_expires_at_us",
    "token_scope",
    "tool_names",
]

ANY_SERVER: Final = "*"
"""``server_id`` of the grants :func:`scope_for` makes: any tool server (the kernel's wildcard,
also the SDK's in ``ToolGrant.is_subset_of``). Which server an activity calls is the worker's
``activity_tool_server_map``; the scope names the tools."""

CAPABILITY_SCHEMA: Final = "chio.capability.v1"

AnyToken: TypeAlias = CapabilityToken | SdkCapabilityToken
"""A capability token as a ``WorkflowGrant`` holds it: the SDK's model or the project's own."""

ScopeLike: TypeAlias = ChioScope | Iterable[str]
"""A scope as callers pass it: a ``ChioScope`` (what :func:`scope_for` returns) or tool names."""

# chio-sdk-python spells operations "Invoke"; the kernel's serde (and its signatures) "invoke".
_KERNEL_OPERATION: Final = SDK_OPERATION_SPELLING


def scope_for(*tools: str, server: str = ANY_SERVER) -> ChioScope:
    """The ``ChioScope`` allowing exactly ``tools`` (activity types) to be invoked.

    One ``ToolGrant`` per tool (sorted, de-duplicated) on ``server`` (default ``"*"``, any tool
    server), operation ``Invoke``. Raises :class:`ChioTemporalConfigError` for no tool, an empty
    or non-string tool name, or an empty server id.
    """
    names = normalize_scope(tools)
    if not names:
        raise ChioTemporalConfigError("scope_for needs at least one tool name")
    if not isinstance(server, str) or not server.strip():
        raise ChioTemporalConfigError(f"scope_for: server must be a non-empty string: {server!r}")
    return ChioScope(
        grants=[
            ToolGrant(server_id=server, tool_name=name, operations=[Operation.INVOKE])
            for name in names
        ]
    )


def tool_names(scope: ScopeLike) -> Scope:
    """The tools ``scope`` lets its holder invoke, sorted and unique.

    For a ``ChioScope``: the ``tool_name`` of each grant with the ``Invoke`` operation (resource
    and prompt grants name no tool). For tool names: the names, checked.
    """
    if isinstance(scope, ChioScope):
        invoked = (g.tool_name for g in scope.grants if Operation.INVOKE in g.operations)
        return normalize_scope(invoked)
    if isinstance(scope, str | bytes | Mapping):
        raise ChioTemporalConfigError(
            f"a scope is a ChioScope (scope_for(...)) or tool names, not {type(scope).__name__}"
        )
    return normalize_scope(scope)


def narrow_scope(parent: ChioScope, scope: ScopeLike) -> ChioScope:
    """``scope`` as a ``ChioScope`` under ``parent``: a ``ChioScope`` as given; tool names as the
    parent's grants for those tools (so their server ids and constraints are kept)."""
    if isinstance(scope, ChioScope):
        return scope
    names = set(tool_names(scope))
    return ChioScope(grants=[g for g in parent.grants if g.tool_name in names])


def token_scope(token: AnyToken) -> Scope:
    """The tool names a token's scope allows."""
    if isinstance(token, SdkCapabilityToken):
        return tool_names(token.scope)
    return token.scope


def token_expires_at_us(token: AnyToken) -> int:
    """Expiry in microseconds since the epoch (SDK tokens count seconds, the project's µs)."""
    if isinstance(token, SdkCapabilityToken):
        return token.expires_at * 1_000_000
    return token.expires_at


def _respell(value: Any) -> Any:
    # Operations appear in scope grants and in delegation links' attenuations.
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "operations" and isinstance(item, list):
                out[key] = [_KERNEL_OPERATION.get(op, op) for op in item]
            elif key == "operation" and isinstance(item, str):
                out[key] = _KERNEL_OPERATION.get(item, item)
            else:
                out[key] = _respell(item)
        return out
    if isinstance(value, list):
        return [_respell(item) for item in value]
    return value


def _kernel_scope(scope: Mapping[str, Any]) -> dict[str, Any]:
    # serde skips empty lists and absent options: so does the token the sidecar signed.
    out: dict[str, Any] = {}
    for field, entries in scope.items():
        if isinstance(entries, list):
            kept = [
                {k: v for k, v in e.items() if v != []} if isinstance(e, dict) else e
                for e in entries
            ]
            if kept:
                out[field] = kept
        elif entries is not None:
            out[field] = entries
    return out


def raw_token(token: AnyToken) -> dict[str, Any] | None:
    """The signed kernel-format JSON of ``token``, or None when it cannot be had.

    chio-sdk-python's ``CapabilityToken`` drops the token's ``schema`` and respells operations
    (``"Invoke"`` for the kernel's ``"invoke"``), which the issuer's signature covers. This
    rebuilds the kernel spelling (``model_dump(exclude_none=True)``, operations respelled,
    empty lists left out, ``"schema": "chio.capability.v1"`` put back) and returns it only if
    the token's own signatures verify (``verify_capability_token``; issuer trust, revocation
    and time are the sidecar's checks). The project's own tokens carry no signature: None.
    """
    if not isinstance(token, SdkCapabilityToken):
        return None
    dumped = _respell(token.model_dump(mode="json", exclude_none=True))
    raw: dict[str, Any] = {"schema": CAPABILITY_SCHEMA}
    for key, value in dumped.items():
        if key == "scope" and isinstance(value, Mapping):
            raw[key] = _kernel_scope(value)
        elif value != []:
            raw[key] = value
    return raw if verify_capability_token(raw).valid else None
