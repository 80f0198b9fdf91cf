"""The evaluator protocol: what the interceptor needs from a policy sidecar."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

from chio_receipts.interceptor._model import CapabilityToken, EvaluationRequest, SignedReceipt
from chio_receipts.schemas import StepOutcome

__all__ = ["Evaluator"]


@runtime_checkable
class Evaluator(Protocol):
    """A policy sidecar: mints and attenuates capabilities, decides and signs receipts.

    Implementations: :class:`chio_receipts.sidecar.LocalSidecar` (in-process),
    :class:`~interceptor.HttpSidecar` (a remote sidecar over HTTP) and
    :class:`~interceptor.ChioKernelSidecar` (a Chio kernel's mediated routes). Transport
    failures raise :class:`~interceptor.ChioSidecarUnavailable`; they never become an allow.
    """

    async def create_capability(
        self,
        subject: str,
        scope: Iterable[str],
        ttl_seconds: float,
        *,
        parent_id: str | None = None,
    ) -> CapabilityToken:
        """Mint a capability for ``subject`` allowing ``scope`` for ``ttl_seconds``."""
        ...

    async def attenuate(
        self,
        capability_id: str,
        *,
        scope: Iterable[str],
        ttl_seconds: float | None = None,
    ) -> CapabilityToken:
        """Mint a child whose scope is a subset of the parent's and that expires no later."""
        ...

    async def get_capability(self, capability_id: str) -> CapabilityToken:
        """The capability with this id."""
        ...

    async def revoke(self, capability_id: str) -> None:
        """Revoke a capability and, through the chain, every descendant."""
        ...

    async def evaluate(self, request: EvaluationRequest) -> SignedReceipt:
        """Decide one attempt and return the signed receipt with its wire body."""
        ...

    async def public_keys(self) -> Mapping[str, bytes]:
        """Ed25519 public keys by key id, for ``verify_receipt``."""
        ...

    async def record_outcome(self, outcome: StepOutcome) -> StepOutcome:
        """``outcome`` signed as a Chio ``trace_observation`` receipt by the key that signs the
        decisions (``schemas.sign_chio_outcome``), or returned unsigned by an evaluator that
        cannot sign outcomes (a Chio kernel has no such route). Called off the activity's path;
        a failure leaves the record unsigned."""
        ...
