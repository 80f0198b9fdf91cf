"""Errors of the sidecar package.

    ChioReceiptsError                the project's root (``chio_receipts.schemas``)
    └── SidecarError                 base of every error raised by this package (also: the
        │                            embedded server stopped while starting)
        ├── InvalidCapability        a capability request the sidecar refuses: an empty subject
        │   │                        or scope, a ttl out of range, a revoked parent, a changed
        │   │                        subject, a full store (HTTP 422 ``invalid_capability``)
        │   └── ScopeWidening        an attenuation asked for tools its parent does not allow
        │                            (HTTP 409 ``scope_widening``)
        └── UnknownCapability        no capability with that id (HTTP 404 ``unknown_capability``)

None is retriable: the same request gets the same answer. The HTTP app answers each with the
status and error code shown, which the worker's ``HttpSidecar`` translates back into the
interceptor's own errors.
"""

from __future__ import annotations

from chio_receipts.schemas import ChioReceiptsError

__all__ = ["InvalidCapability", "ScopeWidening", "SidecarError", "UnknownCapability"]


class SidecarError(ChioReceiptsError):
    """Base of every error raised by the sidecar package."""


class InvalidCapability(SidecarError):
    """The sidecar refuses to mint, attenuate or revoke this capability as asked."""


class ScopeWidening(InvalidCapability):
    """An attenuation would widen (or leave) its parent's scope."""


class UnknownCapability(SidecarError):
    """The sidecar has no capability with this id."""
