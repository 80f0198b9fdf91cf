"""The clients users pass in: ``chio_sdk.ChioClient`` (the seed's) or the project's own.

Everything that depends on which client was passed is here:

- :func:`evaluator_for`: the :class:`Evaluator` the interceptor asks for decisions (the one
  place that chooses it);
- :func:`mint_token` and :func:`attenuate_token`: what ``build_chio_worker`` and
  ``WorkflowGrant.attenuate_for_activity`` call to mint and narrow capabilities.
"""

from __future__ import annotations

from typing import TypeAlias

from chio_sdk import ChioClient as SdkChioClient
from chio_sdk.errors import ChioConnectionError, ChioError, ChioTimeoutError
from chio_sdk.models import CapabilityToken as SdkCapabilityToken
from chio_sdk.models import ChioScope

from chio_receipts.interceptor._client import ChioClient
from chio_receipts.interceptor._errors import ChioSidecarUnavailable, ChioTemporalConfigError
from chio_receipts.interceptor._evaluator import Evaluator
from chio_receipts.interceptor._kernel_http import ChioKernelSidecar
from chio_receipts.interceptor._scope import (
    AnyToken,
    ScopeLike,
    narrow_scope,
    scope_for,
    tool_names,
)
from chio_receipts.schemas import AsyncCloseable

__all__ = ["AnyClient", "attenuate_token", "evaluator_for", "mint_token", "sdk_base_url"]

AnyClient: TypeAlias = ChioClient | SdkChioClient
"""What ``chio_client=`` accepts: chio-sdk-python's client or the project's."""


def sdk_base_url(chio_client: SdkChioClient) -> str | None:
    """The sidecar URL a ``chio_sdk.ChioClient`` was made with (read defensively: the SDK keeps
    it in the private ``_base_url``), or None."""
    url = getattr(chio_client, "_base_url", None)
    return url if isinstance(url, str) and url else None


def evaluator_for(
    chio_client: AnyClient, sidecar_url: str | None
) -> tuple[Evaluator, AsyncCloseable | None]:
    """The evaluator behind ``chio_client``, and what the caller must close (None: nothing).

    The project's :class:`ChioClient` delegates to its own evaluator (the caller's to close).
    A ``chio_sdk.ChioClient`` (0.1.0) cannot evaluate against a kernel: its
    ``evaluate_tool_call`` posts a capability id, which the kernel's mediated ``/v1/evaluate``
    refuses (it wants the whole signed token and a ``request_id``). So the interceptor extends it:
    a :class:`ChioKernelSidecar` at ``sidecar_url`` (the seed passes both), else at the SDK
    client's own base URL, speaks the mediated route with each grant's raw token; the control
    token comes from ``CHIO_SIDECAR_CONTROL_TOKEN``. That evaluator is made here and is the
    caller's to close.
    """
    if isinstance(chio_client, ChioClient):
        return chio_client.evaluator, None
    if isinstance(chio_client, SdkChioClient):
        url = sidecar_url or sdk_base_url(chio_client)
        if url is None:
            raise ChioTemporalConfigError(
                "cannot tell the sidecar URL of this chio_sdk.ChioClient: pass sidecar_url="
            )
        sidecar = ChioKernelSidecar(url)
        return sidecar, sidecar
    raise ChioTemporalConfigError(
        "chio_client must be a chio_sdk.ChioClient or a chio_receipts.interceptor.ChioClient, "
        f"got {type(chio_client).__name__}"
    )


def _sdk_failure(exc: ChioError, what: str) -> Exception:
    if isinstance(exc, ChioConnectionError | ChioTimeoutError):
        return ChioSidecarUnavailable(f"{what}: {exc}")
    return ChioTemporalConfigError(f"{what}: {exc}")


async def mint_token(
    chio_client: AnyClient, subject: str, scope: ScopeLike, ttl_seconds: float
) -> AnyToken:
    """Mint a capability for ``subject`` with ``chio_client`` (``create_capability``).

    A ``chio_sdk.ChioClient`` gets a ``ChioScope`` (tool names become ``scope_for(*names)``)
    and whole seconds, and returns its ``CapabilityToken``; the project's client gets the tool
    names and returns the project's token.
    """
    if isinstance(chio_client, SdkChioClient):
        chio_scope = scope if isinstance(scope, ChioScope) else scope_for(*tool_names(scope))
        seconds = int(ttl_seconds)
        if seconds < 1:
            raise ChioTemporalConfigError(
                f"chio_sdk mints for whole seconds, at least 1: ttl_seconds={ttl_seconds!r}"
            )
        try:
            return await chio_client.create_capability(
                subject=subject, scope=chio_scope, ttl_seconds=seconds
            )
        except ChioError as exc:
            raise _sdk_failure(exc, "chio_sdk create_capability failed") from exc
    if isinstance(chio_client, ChioClient):
        return await chio_client.create_capability(subject, tool_names(scope), ttl_seconds)
    raise ChioTemporalConfigError(
        f"cannot mint with a {type(chio_client).__name__}: pass a chio_sdk.ChioClient or a "
        "chio_receipts.interceptor.ChioClient"
    )


async def attenuate_token(
    chio: AnyClient | Evaluator,
    parent: AnyToken,
    new_scope: ScopeLike,
    ttl_seconds: float | None = None,
) -> AnyToken:
    """A child of ``parent`` narrowed to ``new_scope``.

    With a ``chio_sdk.ChioClient``: its ``attenuate_capability`` (``POST
    /v1/capabilities/attenuate``), which needs the parent as the SDK's token, a strictly
    narrower scope and no ``ttl_seconds`` (the child keeps the parent's expiry). With the
    project's client or any :class:`Evaluator`: ``attenuate`` by capability id and tool names.
    """
    if isinstance(chio, SdkChioClient):
        if not isinstance(parent, SdkCapabilityToken):
            raise ChioTemporalConfigError(
                "attenuating with a chio_sdk.ChioClient needs a grant whose token came from "
                "chio_sdk's create_capability; pass the project's ChioClient instead"
            )
        if ttl_seconds is not None:
            raise ChioTemporalConfigError(
                "chio_sdk's attenuate_capability takes no ttl_seconds: the child keeps the "
                "parent's expiry"
            )
        child_scope = narrow_scope(parent.scope, new_scope)
        if not child_scope.is_subset_of(parent.scope):
            raise ChioTemporalConfigError(
                "attenuate_for_activity: the new scope is not a subset of the grant's ChioScope "
                "(tool names, server ids and operations are all compared)"
            )
        try:
            return await chio.attenuate_capability(parent, new_scope=child_scope)
        except ChioError as exc:
            raise _sdk_failure(exc, "chio_sdk attenuate_capability failed") from exc
    if isinstance(chio, ChioClient | Evaluator):
        return await chio.attenuate(parent.id, scope=tool_names(new_scope), ttl_seconds=ttl_seconds)
    raise ChioTemporalConfigError(
        f"cannot attenuate with a {type(chio).__name__}: pass a chio_sdk.ChioClient, a "
        "chio_receipts.interceptor.ChioClient or an Evaluator"
    )
