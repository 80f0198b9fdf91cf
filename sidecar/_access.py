"""Access roles: the one route → role table, and the middleware that enforces it.

:data:`ROUTE_ROLES` says, for every route of the sidecar (served now or planned), which roles
may call it; ``admin`` may call every route. :class:`AccessControl` (ASGI middleware) looks the
request up in the table *before* routing, so a route is covered the moment it has a row, and a
path with no row at all needs ``admin`` (closed by default). It answers:

- 401 ``unauthorized`` when the route needs a credential and the request has none, or one that
  matches no stored secret (the answer is the same for both, and names no credential);
- 403 ``forbidden`` when the credential is known but its role is not in the route's row;

and otherwise sets ``request.state.credential`` (:func:`~._auth.credential_of`) and runs the
route. Open routes (health, liveness, readiness, metrics, the OpenAPI document, the public keys,
receipt verification) need no credential.

Without credentials (none configured) every loopback caller is :data:`~._auth.LOCAL` (admin),
and a caller from elsewhere gets 401: the served sidecar refuses to bind anything but loopback
without credentials (:func:`check_bind`). A row marked ``local=False`` refuses even a loopback
caller then (403): ``/v1/reconcile`` settles budget holds, and the controlled agent is itself on
loopback, so, as the kernel's reconcile gate, it needs a configured ``tool_server`` credential.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

from chio_receipts.sidecar._auth import LOCAL, Credential, CredentialSet, Role
from chio_receipts.sidecar._errors import SidecarError

__all__ = [
    "OPEN",
    "ROUTE_ROLES",
    "AccessControl",
    "Rule",
    "check_bind",
    "is_loopback_host",
    "roles_for",
    "rule_for",
]

OPEN: Final[frozenset[Role]] = frozenset()
"""The roles of an open route: no credential needed."""

_W, _O, _T, _A = Role.WORKER, Role.OPERATOR, Role.TOOL_SERVER, Role.ADMIN
_ANY: Final = frozenset(Role)
_ADMIN: Final = frozenset({_A})


@dataclass(frozen=True, slots=True)
class Rule:
    """One row: ``method`` (or ``*``) and a path template (``{name}`` is one segment)."""

    method: str
    path: str
    roles: frozenset[Role]
    """Who may call it (admin always may); empty: open to everyone."""
    local: bool = True
    """Whether the loopback caller passes when no credentials are configured."""

    def pattern(self) -> re.Pattern[str]:
        """The template as a regular expression."""
        parts = re.split(r"(\{\w+\})", self.path)
        body = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
        return re.compile(body)


def _rule(method: str, path: str, *roles: Role, local: bool = True) -> Rule:
    # Admin may call every route; an open route is written as Rule(..., OPEN).
    return Rule(method, path, frozenset({*roles, _A}), local)


ROUTE_ROLES: Final[tuple[Rule, ...]] = (
    # Open: probes, metrics, the document, public keys and receipt verification.
    Rule("GET", "/healthz", OPEN),
    Rule("GET", "/livez", OPEN),
    Rule("GET", "/readyz", OPEN),
    Rule("GET", "/chio/live", OPEN),
    Rule("GET", "/chio/health", OPEN),
    Rule("GET", "/metrics", OPEN),
    Rule("GET", "/openapi.json", OPEN),
    Rule("GET", "/v1/keys", OPEN),
    Rule("POST", "/v1/receipts/verify", OPEN),
    # worker: evaluate and record outcomes; every role may read a capability and validate.
    _rule("POST", "/v1/evaluate", _W),
    _rule("POST", "/v1/evaluate/advisory", _W),
    _rule("POST", "/v1/outcomes", _W),
    _rule("GET", "/v1/capabilities/{cap_id}", *_ANY),
    _rule("POST", "/v1/capabilities/validate", *_ANY),
    # operator: mint, attenuate, revoke, approvals.
    _rule("POST", "/v1/capabilities", _O),
    _rule("POST", "/v1/capabilities/mint", _O),
    _rule("POST", "/v1/capabilities/attenuate", _O),
    _rule("POST", "/v1/capabilities/release", _O),
    _rule("POST", "/v1/capabilities/{cap_id}/attenuate", _O),
    _rule("POST", "/v1/capabilities/{cap_id}/revoke", _O),
    _rule("GET", "/approvals/pending", _O),
    _rule("POST", "/approvals/submit", _O),
    _rule("POST", "/approvals/batch/respond", _O),
    _rule("GET", "/approvals/{approval_id}", _O),
    _rule("POST", "/approvals/{approval_id}/respond", _O),
    _rule("POST", "/approvals/{approval_id}/operator-respond", _O),
    # tool_server: settle a budget hold at the realized cost.
    _rule("POST", "/v1/reconcile", _T, local=False),
    # worker (its own run's charges only) and operator: refund a decision's budget charge.
    _rule("POST", "/v1/budgets/reverse", _W, _O),
    # admin: key rotation (and, by default, any path without a row).
    _rule("POST", "/v1/keys/rotate"),
)
"""Every route and who may call it; the first row that matches decides."""

_COMPILED: Final = tuple((rule, rule.pattern()) for rule in ROUTE_ROLES)
_EXACT: Final = {(rule.method, rule.path): rule for rule in ROUTE_ROLES if "{" not in rule.path}
_NO_ROW: Final = Rule("*", "*", _ADMIN)


def rule_for(method: str, path: str) -> Rule:
    """The row that decides ``method path``; a path without a row needs admin. HEAD is GET."""
    method = "GET" if method == "HEAD" else method
    found = _EXACT.get((method, path))
    if found is not None:
        return found
    for rule, pattern in _COMPILED:
        if rule.method in (method, "*") and pattern.fullmatch(path):
            return rule
    return _NO_ROW


def roles_for(method: str, path: str) -> frozenset[Role]:
    """The roles that may call ``method path`` (:data:`OPEN` for an open route)."""
    return rule_for(method, path).roles


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, credentials: CredentialSet | None) -> None:
    """Refuse (:class:`SidecarError`, one line) to serve ``host`` without credentials unless it is
    loopback."""
    if is_loopback_host(host) or (credentials is not None and len(credentials) > 0):
        return
    raise SidecarError(
        f"refusing to serve on {host} without credentials: give --credentials FILE "
        "(see 'chio-receipts sidecar credential add') or bind to 127.0.0.1"
    )


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _refuse(send: Send, status: int, error: str, reason: str) -> None:
    body = json.dumps({"error": error, "reason": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *([(b"www-authenticate", b'Bearer realm="chio-sidecar"')] if status == 401 else []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AccessControl:
    """ASGI middleware enforcing :data:`ROUTE_ROLES` before any route runs.

    ``credentials`` None: no credentials configured (loopback callers are admin).
    ``on_refused(status)`` is called for every 401 and 403 (the metrics count them).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        credentials: CredentialSet | None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self.app = app
        self.credentials = credentials
        self._on_refused = on_refused

    def _refused(self, status: int) -> None:
        if self._on_refused is not None:
            self._on_refused(status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rule = rule_for(scope["method"], scope["path"])
        roles = rule.roles
        credential = self._credential(scope)
        if credential is LOCAL and roles and not rule.local:
            self._refused(403)
            await _refuse(
                send,
                403,
                "forbidden",
                f"{scope['method']} {scope['path']} needs a credential: the sidecar has none "
                "configured (--credentials)",
            )
            return
        if credential is None and roles:
            self._refused(401)
            await _refuse(send, 401, "unauthorized", "missing or wrong credential")
            return
        if credential is not None and roles and credential.role not in roles:
            self._refused(403)
            await _refuse(
                send,
                403,
                "forbidden",
                f"role {credential.role.value} may not call {scope['method']} {scope['path']}",
            )
            return
        # None on an open route called without a credential: credential_of then refuses.
        scope.setdefault("state", {})["credential"] = credential
        await self.app(scope, receive, send)

    def _credential(self, scope: Scope) -> Credential | None:
        if self.credentials is None:
            client = scope.get("client")
            return LOCAL if client and is_loopback_host(str(client[0])) else None
        authorization = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        return self.credentials.authenticate(authorization)
