"""Errors of the sidecar package.

    ChioReceiptsError                the project's root (``chio_receipts.schemas``)
    └── SidecarError                 base of every error raised by this package (also: the
        │                            embedded server stopped while starting)
        ├── InvalidCapability        a capability request the sidecar refuses: an empty subject
        │   │                        or scope, a ttl out of range, a revoked parent, a changed
        │   │                        subject, a full store (HTTP 422 ``invalid_capability``)
        │   └── ScopeWidening        an attenuation asked for tools its parent does not allow
        │                            (HTTP 409 ``scope_widening``)
        ├── UnknownCapability        no capability with that id (HTTP 404 ``unknown_capability``)
        └── StoreError               the data directory or its SQLite store cannot be used (a
                                     locked or unreadable directory, a bad seed file, a store
                                     of another schema); HTTP 503 ``store_unavailable``
                                     when it happens mid-request

No capability error is retriable: the same request gets the same answer. The HTTP app
answers each with the status and error code shown, which the worker's ``HttpSidecar``
translates back into the interceptor's own errors; a 503 is retried like an unreachable sidecar.
"""

from __future__ import annotations

from chio_receipts.schemas import ChioReceiptsError

__all__ = [
    "InvalidCapability",
    "ScopeWidening",
    "SidecarError",
    "StoreError",
    "UnknownCapability",
]


class SidecarError(ChioReceiptsError):
    """Base of every error raised by the sidecar package."""


class InvalidCapability(SidecarError):
    """The sidecar refuses to mint, attenuate or revoke this capability as asked."""


class ScopeWidening(InvalidCapability):
    """An attenuation would widen (or leave) its parent's scope."""


class UnknownCapability(SidecarError):
    """The sidecar has no capability with this id."""


class StoreError(SidecarError):
    """The sidecar's data directory or store cannot be read or written."""
