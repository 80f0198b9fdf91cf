"""``ChioClient``: the seed's sidecar client, over HTTP or around any evaluator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chio_receipts.interceptor._errors import ChioTemporalConfigError
from chio_receipts.interceptor._evaluator import Evaluator
from chio_receipts.interceptor._model import (
    CapabilityToken,
    EvaluationRequest,
    SignedReceipt,
    now_us,
)
from chio_receipts.interceptor._scope import ScopeLike, tool_names
from chio_receipts.interceptor._sidecar_http import HttpSidecar
from chio_receipts.schemas import AsyncCloseable, StepOutcome

__all__ = ["ChioClient"]


class ChioClient(AsyncCloseable):
    """Client of the chio policy sidecar.

    ``ChioClient("http://127.0.0.1:9090")`` talks to a served sidecar through
    :class:`HttpSidecar`; ``ChioClient(LocalSidecar())`` (or any :class:`Evaluator`) keeps it in
    process. An idempotent async context manager: closing it closes an HTTP sidecar it created.
    """

    def __init__(self, sidecar: str | Evaluator, **http_options: Any) -> None:
        if isinstance(sidecar, str):
            self._evaluator: Evaluator = HttpSidecar(sidecar, **http_options)
            self._owned = True
        elif isinstance(sidecar, Evaluator):
            if http_options:
                raise ChioTemporalConfigError("HTTP options need a sidecar URL")
            self._evaluator = sidecar
            self._owned = False
        else:
            raise ChioTemporalConfigError(
                f"ChioClient needs a sidecar URL or an Evaluator, got {type(sidecar).__name__}"
            )

    def __repr__(self) -> str:
        return f"ChioClient({self._evaluator!r})"

    @property
    def evaluator(self) -> Evaluator:
        """The evaluator this client delegates to."""
        return self._evaluator

    async def aclose(self) -> None:
        """Close the HTTP sidecar this client created (idempotent)."""
        if self._owned and isinstance(self._evaluator, HttpSidecar):
            await self._evaluator.aclose()

    async def create_capability(
        self,
        subject: str,
        scope: ScopeLike,
        ttl_seconds: float,
        *,
        parent_id: str | None = None,
    ) -> CapabilityToken:
        """:meth:`Evaluator.create_capability` of this client's evaluator.

        ``scope`` is a ``ChioScope`` (``scope_for(...)``) or tool names; the project's
        capabilities are tool names, so a ``ChioScope`` is reduced to its tools.
        """
        return await self._evaluator.create_capability(
            subject, tool_names(scope), ttl_seconds, parent_id=parent_id
        )

    async def attenuate(
        self,
        capability_id: str,
        *,
        scope: ScopeLike,
        ttl_seconds: float | None = None,
    ) -> CapabilityToken:
        """:meth:`Evaluator.attenuate` of this client's evaluator (``scope`` as above)."""
        return await self._evaluator.attenuate(
            capability_id, scope=tool_names(scope), ttl_seconds=ttl_seconds
        )

    async def get_capability(self, capability_id: str) -> CapabilityToken:
        """:meth:`Evaluator.get_capability` of this client's evaluator."""
        return await self._evaluator.get_capability(capability_id)

    async def revoke(self, capability_id: str) -> None:
        """:meth:`Evaluator.revoke` of this client's evaluator."""
        await self._evaluator.revoke(capability_id)

    async def public_keys(self) -> Mapping[str, bytes]:
        """:meth:`Evaluator.public_keys` of this client's evaluator."""
        return await self._evaluator.public_keys()

    async def evaluate(self, request: EvaluationRequest) -> SignedReceipt:
        """:meth:`Evaluator.evaluate` of this client's evaluator (what the interceptor sends)."""
        return await self._evaluator.evaluate(request)

    async def record_outcome(self, outcome: StepOutcome) -> StepOutcome:
        """:meth:`Evaluator.record_outcome` of this client's evaluator."""
        return await self._evaluator.record_outcome(outcome)

    async def evaluate_tool_call(
        self,
        capability_id: str,
        tool_server: str,
        tool: str,
        *,
        argument_digest: str = "",
        argument_key_id: str = "",
        **context: Any,
    ) -> SignedReceipt:
        """Evaluate one tool call directly, outside the interceptor (e.g. inside an activity).

        ``context`` may carry any other :class:`EvaluationRequest` field (``workflow_id``,
        ``run_id``, ``activity_id``...). Pass a digest, never the arguments themselves.
        """
        now = now_us()
        context.setdefault("scheduled_at", now)
        context.setdefault("started_at", now)
        try:
            request = EvaluationRequest(
                capability_id=capability_id,
                tool_server=tool_server,
                tool=tool,
                argument_digest=argument_digest,
                argument_key_id=argument_key_id,
                **context,
            )
        except TypeError as exc:
            raise ChioTemporalConfigError(f"evaluate_tool_call: {exc}") from exc
        return await self._evaluator.evaluate(request)
