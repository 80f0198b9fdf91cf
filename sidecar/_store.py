"""The sidecar's durable state in SQLite: capabilities, revocations, public keys, receipt log.

One connection per process, in WAL mode, shared under a lock; every method is one short
transaction (tens of microseconds), so the sidecar calls them from its event loop. Writes that
change what the sidecar will allow (a capability, a revocation, a key) are committed with
``synchronous=FULL``; receipt-log appends with ``synchronous=NORMAL``, which survives a killed
process (only a power loss can take the last appends). ``SidecarStore.memory()`` is the same
code on SQLite's ``:memory:`` for tests and benchmarks that need no durability.

Capabilities minted on the Chio kernel's routes also keep their signed token, raw, in
``chio_tokens`` (written in the same transaction as the capability row). The receipt log holds
two formats: the project's signed Avro step bodies (``format = 'step'``) and the Chio kernel's
signed JSON receipts (``format = 'chio'``, the JSON text as returned).

The receipt log is a hash chain: each row keeps the SHA-256 of the signed body it logs
(``content_hash``) and the ``content_hash`` of the row before it (``prev_hash``); a deleted,
inserted or reordered row breaks the chain, a changed body its hash and its signature.
:meth:`SidecarStore.verify_log` walks it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chio_receipts.schemas import (
    CapabilityToken,
    Closeable,
    now_us,
    verify_body,
    verify_kernel_receipt,
)
from chio_receipts.sidecar._errors import StoreError

__all__ = ["ChioTokenRow", "LogFormat", "LogReport", "SidecarStore", "StoredKey"]

_SCHEMA_VERSION = 2
GENESIS = b"\x00" * 32
"""``prev_hash`` of the first row of the receipt log."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS capabilities (
    id            TEXT PRIMARY KEY,
    subject       TEXT NOT NULL,
    scope         TEXT NOT NULL,            -- JSON array
    issued_at     INTEGER NOT NULL,         -- µs since the epoch
    expires_at    INTEGER NOT NULL,
    parent_id     TEXT,
    chain         TEXT NOT NULL,            -- JSON array, root first
    issuer_key_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    capability_id TEXT PRIMARY KEY,
    revoked_at    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    key_id     TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);
CREATE TABLE IF NOT EXISTS receipt_log (
    seq          INTEGER PRIMARY KEY,
    receipt_id   TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    logged_at    INTEGER NOT NULL,
    body         BLOB NOT NULL,             -- the signed wire body, as returned
    content_hash BLOB NOT NULL,             -- SHA-256 of body
    prev_hash    BLOB NOT NULL,             -- content_hash of the row before (GENESIS first)
    format       TEXT NOT NULL DEFAULT 'step'  -- 'step' (Avro body) or 'chio' (kernel JSON)
);
CREATE TABLE IF NOT EXISTS chio_tokens (
    capability_id     TEXT PRIMARY KEY,
    token             TEXT NOT NULL,        -- the signed kernel-format token, raw JSON
    requested_subject TEXT NOT NULL,
    job_uid           TEXT NOT NULL
);
"""

# -- approvals (their own block) -------------------------------------------------------------
# One row per approval request. ``binding`` is the SHA-256 hex of the call it answers
# (capability, tool server, tool, parameter hash, namespace, workflow id); ``record`` the JSON
# of the request, its decision and its receipts (see ``_approvals``). ``state`` moves
# pending -> approved | denied, and approved -> consumed, each move one guarded UPDATE.
_APPROVALS_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    approval_id TEXT PRIMARY KEY,
    binding     TEXT NOT NULL,
    state       TEXT NOT NULL,              -- pending | approved | denied | consumed
    created_at  INTEGER NOT NULL,           -- µs since the epoch
    record      TEXT NOT NULL               -- JSON
);
CREATE INDEX IF NOT EXISTS approvals_binding ON approvals (binding);
CREATE INDEX IF NOT EXISTS approvals_state ON approvals (state, created_at);
"""

# Schema 1 had no kernel tokens and only step receipts in the log.
_MIGRATE_FROM_1 = """
ALTER TABLE receipt_log ADD COLUMN format TEXT NOT NULL DEFAULT 'step';
"""


LogFormat = Literal["step", "chio"]
"""How a receipt-log row's body is encoded and signed."""


def _signed_by(fmt: str, body: bytes, public_key: bytes) -> bool:
    if fmt == "chio":
        try:
            receipt = json.loads(body)
        except ValueError:
            return False
        return isinstance(receipt, dict) and bool(
            verify_kernel_receipt(receipt, trusted_keys={public_key.hex()})
        )
    return verify_body(body, public_key)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChioTokenRow:
    """A signed kernel-format token as stored: its raw JSON text and what it was minted for."""

    token: str
    requested_subject: str
    job_uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredKey:
    """A public key the sidecar signed with (``retired_at`` None: not rotated out)."""

    key_id: str
    public_key: bytes
    created_at: int
    retired_at: int | None = None


@dataclass(slots=True, kw_only=True)
class LogReport:
    """What :meth:`SidecarStore.verify_log` found; ``problems`` is empty when the log holds."""

    rows: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the chain, the hashes and the signatures hold."""
        return not self.problems


class SidecarStore(Closeable):
    """SQLite state of one sidecar (``path`` a file, or ``":memory:"``).

    A context manager; :meth:`close` is idempotent. Thread-safe: one connection, one lock.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            # The lock below serializes use; the event loop and a reload thread may share it.
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.executescript(_SCHEMA)
            conn.executescript(_APPROVALS_SCHEMA)
            found = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if found is not None and int(found[0]) == 1:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(receipt_log)")}
                if "format" not in columns:
                    conn.executescript(_MIGRATE_FROM_1)
                conn.execute("UPDATE meta SET value = ? WHERE name = 'schema'", ("2",))
                found = ("2",)
            if found is None:
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('schema', ?)", (str(_SCHEMA_VERSION),)
                )
            elif int(found[0]) != _SCHEMA_VERSION:
                conn.close()
                raise StoreError(
                    f"{self.path} has store schema {found[0]}, this version reads {_SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the sidecar store {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()

    @classmethod
    def memory(cls) -> SidecarStore:
        """A store that lives as long as the object (no file)."""
        return cls(":memory:")

    def __repr__(self) -> str:
        return f"SidecarStore({self.path!r})"

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("the sidecar store is closed")
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"sidecar store {self.path}: {exc}") from exc
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous=FULL")

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            if self._conn is None:
                raise StoreError("the sidecar store is closed")
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"sidecar store {self.path}: {exc}") from exc

    # -- capabilities and revocations --------------------------------------------------------

    def put_capability(
        self, token: CapabilityToken, *, chio_token: ChioTokenRow | None = None
    ) -> None:
        """Store a minted capability (committed before the caller hands it out), with its
        signed kernel-format token when it was minted on a kernel route."""
        with self._tx() as conn:
            if chio_token is not None:
                conn.execute(
                    "INSERT INTO chio_tokens VALUES (?, ?, ?, ?)",
                    (token.id, chio_token.token, chio_token.requested_subject, chio_token.job_uid),
                )
            conn.execute(
                "INSERT INTO capabilities VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    token.id,
                    token.subject,
                    json.dumps(list(token.scope)),
                    token.issued_at,
                    token.expires_at,
                    token.parent_id,
                    json.dumps(list(token.chain)),
                    token.issuer_key_id,
                ),
            )

    def capabilities(self) -> list[CapabilityToken]:
        """Every stored capability."""
        return [
            CapabilityToken(
                id=str(r[0]),
                subject=str(r[1]),
                scope=tuple(json.loads(str(r[2]))),
                issued_at=int(r[3]),
                expires_at=int(r[4]),
                parent_id=None if r[5] is None else str(r[5]),
                chain=tuple(json.loads(str(r[6]))),
                issuer_key_id=str(r[7]),
            )
            for r in self._read(
                "SELECT id, subject, scope, issued_at, expires_at, parent_id, chain, "
                "issuer_key_id FROM capabilities ORDER BY issued_at"
            )
        ]

    def chio_tokens(self) -> dict[str, ChioTokenRow]:
        """Signed kernel-format tokens by capability id."""
        return {
            str(r[0]): ChioTokenRow(token=str(r[1]), requested_subject=str(r[2]), job_uid=str(r[3]))
            for r in self._read(
                "SELECT capability_id, token, requested_subject, job_uid FROM chio_tokens"
            )
        }

    def ping(self) -> None:
        """A trivial read: raises :class:`StoreError` when the store cannot be used."""
        self._read("SELECT 1")

    def check_writable(self) -> None:
        """A small write (the time of the last check): raises :class:`StoreError` when the store
        cannot be written (the readiness probe)."""
        with self._tx(durable=False) as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('checked_at', ?)",
                (str(now_us()),),
            )

    def revoke(self, capability_id: str) -> None:
        """Record a revocation (idempotent)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO revocations VALUES (?, ?)", (capability_id, now_us())
            )

    def revocations(self) -> set[str]:
        """Ids of every revoked capability."""
        return {str(r[0]) for r in self._read("SELECT capability_id FROM revocations")}

    def drop_capabilities(self, ids: list[str]) -> None:
        """Forget capabilities (long expired) and their revocations."""
        with self._tx() as conn:
            conn.executemany("DELETE FROM capabilities WHERE id = ?", [(i,) for i in ids])
            conn.executemany("DELETE FROM revocations WHERE capability_id = ?", [(i,) for i in ids])
            conn.executemany("DELETE FROM chio_tokens WHERE capability_id = ?", [(i,) for i in ids])

    # -- keys --------------------------------------------------------------------------------

    def add_key(self, key_id: str, public_key: bytes) -> None:
        """Record a public key the sidecar signs or will sign with (idempotent)."""
        with self._tx() as conn:
            found = conn.execute(
                "SELECT public_key FROM keys WHERE key_id = ?", (key_id,)
            ).fetchone()
            if found is None:
                conn.execute(
                    "INSERT INTO keys VALUES (?, ?, ?, NULL)", (key_id, public_key, now_us())
                )
            elif bytes(found[0]) != public_key:
                # Key ids name exactly one key: reusing one would make earlier receipts fail.
                raise StoreError(f"key id {key_id!r} is already recorded with another public key")

    def retire_keys(self, *, except_key_id: str) -> None:
        """Mark every key but ``except_key_id`` retired (kept for verification)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE keys SET retired_at = ? WHERE retired_at IS NULL AND key_id != ?",
                (now_us(), except_key_id),
            )
            conn.execute("UPDATE keys SET retired_at = NULL WHERE key_id = ?", (except_key_id,))

    def keys(self) -> list[StoredKey]:
        """Every recorded public key, oldest first."""
        return [
            StoredKey(
                key_id=str(r[0]),
                public_key=bytes(r[1]),
                created_at=int(r[2]),
                retired_at=None if r[3] is None else int(r[3]),
            )
            for r in self._read(
                "SELECT key_id, public_key, created_at, retired_at FROM keys "
                "ORDER BY created_at, key_id"
            )
        ]

    def public_keys(self) -> dict[str, bytes]:
        """Public keys by key id (current and retired)."""
        return {k.key_id: k.public_key for k in self.keys()}

    # -- the receipt log ---------------------------------------------------------------------

    def log_receipt(
        self, receipt_id: str, key_id: str, body: bytes, *, fmt: LogFormat = "step"
    ) -> bytes:
        """Append a signed receipt to the log; returns its ``content_hash``.

        ``fmt`` is ``"step"`` for a signed Avro step body, ``"chio"`` for a kernel-format
        receipt's JSON text."""
        content = hashlib.sha256(body).digest()
        with self._tx(durable=False) as conn:
            last = conn.execute(
                "SELECT content_hash FROM receipt_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            conn.execute(
                "INSERT INTO receipt_log (receipt_id, key_id, logged_at, body, content_hash, "
                "prev_hash, format) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    receipt_id,
                    key_id,
                    now_us(),
                    body,
                    content,
                    GENESIS if last is None else last[0],
                    fmt,
                ),
            )
        return content

    def log_length(self) -> int:
        """Rows in the receipt log."""
        return int(self._read("SELECT count(*) FROM receipt_log")[0][0])

    def verify_log(self, public_keys: Mapping[str, bytes] | None = None) -> LogReport:
        """Walk the receipt log: chain links, content hashes, and signatures (``public_keys``
        defaults to the recorded keys)."""
        keys = dict(public_keys) if public_keys is not None else self.public_keys()
        report = LogReport()
        prev = GENESIS
        last_seq = 0
        with self._lock:
            if self._conn is None:
                raise StoreError("the sidecar store is closed")
            rows = self._conn.execute(
                "SELECT seq, receipt_id, key_id, body, content_hash, prev_hash, format "
                "FROM receipt_log ORDER BY seq"
            )
            for seq, receipt_id, key_id, body, content_hash, prev_hash, fmt in rows:
                report.rows += 1
                label = f"row {seq} (receipt {receipt_id})"
                if seq != last_seq + 1:
                    report.problems.append(f"{label}: rows {last_seq + 1}..{seq - 1} are missing")
                last_seq = seq
                if bytes(prev_hash) != prev:
                    report.problems.append(f"{label}: prev_hash does not match the row before")
                if hashlib.sha256(body).digest() != bytes(content_hash):
                    report.problems.append(f"{label}: content_hash does not match its body")
                public_key = keys.get(key_id)
                if public_key is None:
                    report.problems.append(f"{label}: unknown signing key {key_id!r}")
                elif not _signed_by(fmt, bytes(body), public_key):
                    report.problems.append(f"{label}: signature invalid")
                prev = bytes(content_hash)
        return report

    # -- approvals ---------------------------------------------------------------------------

    def put_approval(self, approval_id: str, binding: str, created_at: int, record: str) -> None:
        """Store a new pending approval request (committed before it is answered)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO approvals VALUES (?, ?, 'pending', ?, ?)",
                (approval_id, binding, created_at, record),
            )

    def approval(self, approval_id: str) -> tuple[str, str] | None:
        """``(state, record)`` of an approval, or ``None``."""
        rows = self._read(
            "SELECT state, record FROM approvals WHERE approval_id = ?", (approval_id,)
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def approvals_for(self, binding: str) -> list[tuple[str, str, str]]:
        """``(approval_id, state, record)`` of every approval of one call, oldest first."""
        rows = self._read(
            "SELECT approval_id, state, record FROM approvals WHERE binding = ? "
            "ORDER BY created_at, approval_id",
            (binding,),
        )
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def approvals(self, state: str | None = None, limit: int = 1000) -> list[tuple[str, str]]:
        """``(state, record)`` of approvals (of one ``state`` when given), oldest first."""
        if state is None:
            rows = self._read(
                "SELECT state, record FROM approvals ORDER BY created_at LIMIT ?", (limit,)
            )
        else:
            rows = self._read(
                "SELECT state, record FROM approvals WHERE state = ? ORDER BY created_at LIMIT ?",
                (state, limit),
            )
        return [(str(r[0]), str(r[1])) for r in rows]

    def move_approval(self, approval_id: str, from_state: str, to_state: str, record: str) -> bool:
        """Move an approval from ``from_state`` to ``to_state`` with its new record, atomically;
        False (nothing written) when it is not in ``from_state``."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE approvals SET state = ?, record = ? WHERE approval_id = ? AND state = ?",
                (to_state, record, approval_id, from_state),
            )
            return cur.rowcount == 1
