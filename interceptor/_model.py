"""The worker's view of the sidecar protocol: the contract's wire objects, scopes as configuration.

The objects themselves (capability tokens, evaluation requests, signed receipts, ids, clocks)
live in ``chio_receipts.schemas``, shared with the sidecar; this module re-exports them for the
interceptor and checks scopes the worker is given, raising its own configuration error.
"""

from __future__ import annotations

from collections.abc import Iterable

from chio_receipts.interceptor._errors import ChioTemporalConfigError
from chio_receipts.schemas import (
    CapabilityToken,
    EvaluationRequest,
    ProtocolError,
    Scope,
    SignedReceipt,
    is_subset,
    now_us,
    receipt_from_json,
    uuid7,
)
from chio_receipts.schemas import normalize_scope as _normalize_scope

__all__ = [
    "CapabilityToken",
    "EvaluationRequest",
    "Scope",
    "SignedReceipt",
    "is_subset",
    "normalize_scope",
    "now_us",
    "receipt_from_json",
    "uuid7",
]


def normalize_scope(tools: Iterable[str]) -> Scope:
    """Sorted unique tool names; :class:`ChioTemporalConfigError` for an empty or non-string."""
    try:
        return _normalize_scope(tools)
    except ProtocolError as exc:
        raise ChioTemporalConfigError(str(exc)) from exc
