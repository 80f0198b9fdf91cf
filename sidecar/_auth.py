"""Who is calling: the sidecar's named credentials and their roles.

Every authenticated request carries a :class:`Credential` on ``request.state.credential``:
its name (recorded, for example, as the approver of an approval) and its role. Handlers read
it with :func:`credential_of`; they never take a caller's name from the request body.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from starlette.requests import Request

__all__ = ["LOCAL", "Credential", "Role", "credential_of"]


class Role(enum.StrEnum):
    """What a credential may do.

    ``worker`` evaluates and records outcomes; ``operator`` mints, attenuates, revokes and
    answers approvals; ``tool_server`` (the trusted tool-server side) reconciles budgets;
    ``admin`` rotates keys and may do everything.
    """

    WORKER = "worker"
    OPERATOR = "operator"
    TOOL_SERVER = "tool_server"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Credential:
    """A named credential, as authenticated (never the secret)."""

    name: str
    role: Role


LOCAL = Credential(name="local", role=Role.ADMIN)
"""The caller when no credentials are configured (loopback only)."""


def credential_of(request: Request) -> Credential:
    """The credential the request was authenticated with (:data:`LOCAL` without credentials)."""
    found = getattr(request.state, "credential", None)
    return found if isinstance(found, Credential) else LOCAL
