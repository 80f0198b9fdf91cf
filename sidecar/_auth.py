"""Who is calling: the sidecar's named credentials and their roles.

Every authenticated request carries a :class:`Credential` on ``request.state.credential``:
its name (recorded, for example, as the approver of an approval) and its role. Handlers read
it with :func:`credential_of`; they never take a caller's name from the request body.

Credentials are named and stored hashed, in a credentials file (JSON, mode 0600)::

    {
      "version": 1,
      "credentials": [
        {"name": "worker-1", "role": "worker", "hash": "sha256:<64 hex>", "created_at": "..."}
      ]
    }

A secret is made by :func:`new_secret` (``chio_`` and 43 characters of URL-safe base64: 256
random bits) and shown once, to whoever made it; the file keeps only its SHA-256. A fast,
unsalted hash is sound here because the secrets are uniformly random with 256 bits of entropy:
nothing can be guessed from the hash faster than the secret itself, so a slow KDF would only
add latency to every request. A secret is presented as ``Authorization: Bearer <secret>`` and
compared with every stored hash in constant time (:meth:`CredentialSet.authenticate`).
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from chio_receipts.sidecar._errors import SidecarError

__all__ = [
    "LOCAL",
    "TOKEN_CREDENTIAL",
    "Credential",
    "CredentialError",
    "CredentialSet",
    "Role",
    "StoredCredential",
    "add_credential",
    "credential_of",
    "hash_secret",
    "load_credentials",
    "new_secret",
    "remove_credential",
    "token_credential",
    "with_token",
]

_log = logging.getLogger(__name__)

FILE_VERSION = 1
_HASH_PREFIX = "sha256:"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


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

TOKEN_CREDENTIAL = "token"  # noqa: S105 - a credential's name, not a secret
"""Name of the credential the deprecated ``--token`` option stands for (role admin)."""


_UNSET = object()


def credential_of(request: Request) -> Credential:
    """The credential the request was authenticated with (:data:`LOCAL` without credentials).

    Every route that needs a role has one. On an open route called without a credential there
    is none: that is a :class:`PermissionError`, never a default caller. An app served without
    the access middleware (a handler under test) gets :data:`LOCAL`.
    """
    found = getattr(request.state, "credential", _UNSET)
    if isinstance(found, Credential):
        return found
    if found is None:
        raise PermissionError("the request carries no credential")
    return LOCAL


class CredentialError(SidecarError):
    """A credentials file that cannot be read, or a credential that cannot be added."""


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """One row of a credentials file: a name, a role, the hash of the secret."""

    name: str
    role: Role
    hash: str
    created_at: str = ""

    def to_json(self) -> dict[str, str]:
        """The row as written to the file."""
        return {
            "name": self.name,
            "role": self.role.value,
            "hash": self.hash,
            "created_at": self.created_at,
        }


def new_secret() -> str:
    """A fresh secret: 256 random bits, URL-safe, prefixed ``chio_`` (easy to spot in a leak)."""
    return "chio_" + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """``sha256:<hex>`` of the secret's UTF-8 bytes (what the file stores)."""
    return _HASH_PREFIX + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def token_credential(token: str) -> StoredCredential:
    """The row the deprecated shared ``--token`` stands for: ``token``, role admin."""
    return StoredCredential(TOKEN_CREDENTIAL, Role.ADMIN, hash_secret(token))


def with_token(credentials: CredentialSet | None, token: str | None) -> CredentialSet | None:
    """``credentials`` plus the deprecated shared ``token`` (the admin credential ``token``)."""
    if not token:
        return credentials
    if credentials is None:
        return CredentialSet.from_token(token)
    credentials.add_token(token)
    return credentials


def _bearer(header: str) -> str | None:
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value


class CredentialSet:
    """The credentials a sidecar accepts, by the hash of their secret.

    ``path`` (a credentials file) is read now and again when it changes (checked at most once
    a second), so ``credential add`` and ``remove`` take effect on a running sidecar; a file
    that became unreadable or invalid keeps the last good set and logs why. ``extra`` rows
    (the deprecated ``--token``) are kept across reloads.
    """

    def __init__(
        self,
        rows: Iterable[StoredCredential] = (),
        *,
        path: Path | None = None,
        extra: Iterable[StoredCredential] = (),
    ) -> None:
        self._path = path
        self._extra = tuple(extra)
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        file_rows = tuple(rows)
        if path is not None:
            self._stamp = _stamp(path)
            file_rows = load_credentials(path)
        self._file_rows = file_rows
        self._rows = self._merge(file_rows)

    @classmethod
    def from_token(cls, token: str) -> CredentialSet:
        """The deprecated single shared token: one admin credential named ``token``."""
        return cls(extra=[token_credential(token)])

    def add_token(self, token: str) -> None:
        """Accept the deprecated shared ``token`` too, as the admin credential ``token``."""
        before = self._extra
        self._extra = (*before, token_credential(token))
        try:
            self._rows = self._merge(self._file_rows)
        except CredentialError:
            self._extra = before
            raise

    def _merge(self, rows: Iterable[StoredCredential]) -> tuple[tuple[bytes, Credential], ...]:
        merged: dict[str, StoredCredential] = {}
        hashes: dict[str, str] = {}
        for row in (*self._extra, *rows):
            if row.name in merged:
                raise CredentialError(f"credential name {row.name!r} is given twice")
            if row.hash in hashes:
                # One secret, two roles: which one a caller gets would be ambiguous (and the
                # deprecated admin token must never be a worker's secret).
                raise CredentialError(
                    f"credentials {hashes[row.hash]!r} and {row.name!r} have the same secret"
                )
            merged[row.name] = row
            hashes[row.hash] = row.name
        return tuple(
            (row.hash.encode("ascii"), Credential(row.name, row.role)) for row in merged.values()
        )

    def __len__(self) -> int:
        self._refresh()
        return len(self._rows)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"CredentialSet({len(self._rows)} credential(s))"

    @property
    def names(self) -> list[str]:
        """The credential names (no secret, no hash)."""
        self._refresh()
        return [cred.name for _, cred in self._rows]

    def _refresh(self) -> None:
        path = self._path
        if path is None:
            return
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        stamp = _stamp(path)
        if stamp == self._stamp:
            return
        try:
            file_rows = load_credentials(path)
            rows = self._merge(file_rows)
        except CredentialError as exc:
            _log.error("credentials file not reloaded, the previous set stays in use: %s", exc)
            self._stamp = stamp
            return
        self._file_rows, self._rows, self._stamp = file_rows, rows, stamp
        _log.info("credentials reloaded from %s: %d credential(s)", path, len(rows))

    def authenticate(self, authorization: str | None) -> Credential | None:
        """The credential whose secret the ``Authorization`` header carries, or None.

        The presented secret's hash is compared with every stored hash (``hmac.compare_digest``,
        no early exit), so the time taken says nothing about which names exist.
        """
        self._refresh()
        secret = _bearer(authorization or "")
        if secret is None:
            return None
        presented = hash_secret(secret).encode("ascii")
        found: Credential | None = None
        for digest, cred in self._rows:
            if hmac.compare_digest(digest, presented):
                found = cred
        return found


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _row(item: object, where: str) -> StoredCredential:
    if not isinstance(item, Mapping):
        raise CredentialError(f"{where}: each credential must be an object")
    name, role, digest = item.get("name"), item.get("role"), item.get("hash")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise CredentialError(f"{where}: a credential name must match {_NAME.pattern}")
    try:
        parsed = Role(str(role))
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise CredentialError(
            f"{where}: credential {name!r}: role must be one of {roles}"
        ) from None
    if not isinstance(digest, str) or not _HASH.fullmatch(digest):
        raise CredentialError(f"{where}: credential {name!r}: hash must be sha256:<64 hex>")
    created = item.get("created_at")
    return StoredCredential(name, parsed, digest, created if isinstance(created, str) else "")


def load_credentials(path: Path) -> tuple[StoredCredential, ...]:
    """The rows of a credentials file (:class:`CredentialError` if unreadable or invalid)."""
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise CredentialError(f"no credentials file at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialError(f"cannot read the credentials file {path}: {exc}") from None
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise CredentialError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, Mapping) or data.get("version") != FILE_VERSION:
        raise CredentialError(f"{path}: expected an object with version {FILE_VERSION}")
    items = data.get("credentials")
    if not isinstance(items, list):
        raise CredentialError(f"{path}: 'credentials' must be a list")
    rows = tuple(_row(item, str(path)) for item in items)
    seen: set[str] = set()
    for row in rows:
        if row.name in seen:
            raise CredentialError(f"{path}: credential name {row.name!r} is given twice")
        seen.add(row.name)
    return rows


def _write(path: Path, rows: Iterable[StoredCredential]) -> None:
    """Write the file atomically (temporary file, fsync, rename), mode 0600 from birth."""
    document = {"version": FILE_VERSION, "credentials": [row.to_json() for row in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(document, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def add_credential(path: Path, name: str, role: Role) -> str:
    """Add a credential to the file (created if absent) and return its secret.

    The secret is returned once and never stored: the file keeps its hash only.
    """
    if not _NAME.fullmatch(name):
        raise CredentialError(f"a credential name must match {_NAME.pattern}")
    rows = load_credentials(path) if path.exists() else ()
    if any(row.name == name for row in rows):
        raise CredentialError(f"a credential named {name!r} exists; remove it first")
    secret = new_secret()
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    _write(path, (*rows, StoredCredential(name, role, hash_secret(secret), created)))
    return secret


def remove_credential(path: Path, name: str) -> bool:
    """Remove the credential ``name`` from the file; False when there was none."""
    rows = load_credentials(path)
    kept = tuple(row for row in rows if row.name != name)
    if len(kept) == len(rows):
        return False
    _write(path, kept)
    return True
