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

import dataclasses
import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
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

__all__ = [
    "BudgetAccount",
    "BudgetCharge",
    "BudgetRefusal",
    "BudgetReversal",
    "BudgetSettlement",
    "ChioTokenRow",
    "LogFormat",
    "LogReport",
    "SidecarStore",
    "StoredKey",
]

_SCHEMA_VERSION = 3
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
CREATE TABLE IF NOT EXISTS budget_usage (
    capability_id   TEXT NOT NULL,
    grant_index     INTEGER NOT NULL,
    invocations     INTEGER NOT NULL DEFAULT 0,  -- charges counted (held, settled)
    committed_units INTEGER NOT NULL DEFAULT 0,  -- held exposure plus settled spend
    PRIMARY KEY (capability_id, grant_index)
);
CREATE TABLE IF NOT EXISTS budget_charges (
    hold_id            TEXT PRIMARY KEY,     -- budget-hold:{request}:{capability}:{grant}
    capability_id      TEXT NOT NULL,
    grant_index        INTEGER NOT NULL,
    accounts           TEXT NOT NULL,        -- JSON [[capability_id, grant_index], ...]
    units              INTEGER NOT NULL,     -- the hold's exposure (worst case)
    currency           TEXT NOT NULL,
    state              TEXT NOT NULL,        -- 'held', 'settled', 'reversed'
    realized_units     INTEGER,              -- set when settled
    receipt_id         TEXT NOT NULL DEFAULT '',  -- the decision's receipt id
    chio_receipt_id    TEXT NOT NULL DEFAULT '',  -- the decision's Chio receipt id
    workflow_id        TEXT NOT NULL DEFAULT '',
    run_id             TEXT NOT NULL DEFAULT '',
    tool_server        TEXT NOT NULL,
    tool_name          TEXT NOT NULL,
    parameter_hash     TEXT NOT NULL,
    request_id         TEXT NOT NULL DEFAULT '',
    created_at         INTEGER NOT NULL,
    closed_at          INTEGER,
    closing_receipt_id TEXT NOT NULL DEFAULT ''  -- the settlement's or the refund's receipt
);
CREATE INDEX IF NOT EXISTS budget_charges_receipt ON budget_charges (receipt_id);
CREATE INDEX IF NOT EXISTS budget_charges_chio ON budget_charges (chio_receipt_id);
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


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetAccount:
    """One grant a charge counts against: the call's own grant or an ancestor's grant that
    covers the same call. ``None`` limits are not enforced (but still counted)."""

    capability_id: str
    grant_index: int
    max_invocations: int | None = None
    max_total_units: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRefusal:
    """Why a charge was refused: the account and the constraint that has no room left."""

    capability_id: str
    grant_index: int
    constraint: str
    """``max_invocations`` or ``max_total_cost`` (``request_id`` when the hold's id, made of
    the request id, is taken already)."""
    limit: int
    used: int
    requested: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetCharge:
    """A budget charge as stored (``state``: ``held``, ``settled`` or ``reversed``)."""

    hold_id: str
    capability_id: str
    grant_index: int
    accounts: tuple[tuple[str, int], ...]
    units: int
    currency: str
    tool_server: str
    tool_name: str
    parameter_hash: str
    state: str = "held"
    realized_units: int | None = None
    receipt_id: str = ""
    chio_receipt_id: str = ""
    workflow_id: str = ""
    run_id: str = ""
    request_id: str = ""
    created_at: int = 0
    closed_at: int | None = None
    closing_receipt_id: str = ""

    @property
    def spent_units(self) -> int:
        """What the charge holds against its accounts now (0 once reversed)."""
        if self.state == "held":
            return self.units
        if self.state == "settled":
            return self.realized_units or 0
        return 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetSettlement:
    """A hold settled at its realized cost (or why it was not: ``refusal`` set)."""

    charge: BudgetCharge | None
    refusal: str = ""
    committed_after: int = 0
    """``committed_units`` of the charge's first account (its own grant, when it has a budget)
    after the settlement."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetReversal:
    """A charge refunded, or found already refunded (``refunded`` False)."""

    charge: BudgetCharge | None
    refunded: bool = False
    refusal: str = ""
    refunded_units: int = 0
    committed_after: int = 0


_SELECT_CHARGE = (
    "SELECT hold_id, capability_id, grant_index, accounts, units, currency, state, "
    "realized_units, receipt_id, chio_receipt_id, workflow_id, run_id, tool_server, tool_name, "
    "parameter_hash, request_id, created_at, closed_at, closing_receipt_id FROM budget_charges "
)
_SELECT_CHARGE_BY_KEY = (
    _SELECT_CHARGE + "WHERE hold_id = ? OR receipt_id = ? OR chio_receipt_id = ? LIMIT 1"
)
_INSERT_CHARGE = (
    "INSERT INTO budget_charges (hold_id, capability_id, grant_index, accounts, units, "
    "currency, state, realized_units, receipt_id, chio_receipt_id, workflow_id, run_id, "
    "tool_server, tool_name, parameter_hash, request_id, created_at, closed_at, "
    "closing_receipt_id) VALUES (?, ?, ?, ?, ?, ?, 'held', NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "NULL, '')"
)


def _charge_of(row: tuple[Any, ...]) -> BudgetCharge:
    return BudgetCharge(
        hold_id=str(row[0]),
        capability_id=str(row[1]),
        grant_index=int(row[2]),
        accounts=tuple((str(a), int(i)) for a, i in json.loads(str(row[3]))),
        units=int(row[4]),
        currency=str(row[5]),
        state=str(row[6]),
        realized_units=None if row[7] is None else int(row[7]),
        receipt_id=str(row[8]),
        chio_receipt_id=str(row[9]),
        workflow_id=str(row[10]),
        run_id=str(row[11]),
        tool_server=str(row[12]),
        tool_name=str(row[13]),
        parameter_hash=str(row[14]),
        request_id=str(row[15]),
        created_at=int(row[16]),
        closed_at=None if row[17] is None else int(row[17]),
        closing_receipt_id=str(row[18]),
    )


def _move(conn: sqlite3.Connection, accounts: Any, invocations: int, units: int) -> None:
    conn.executemany(
        "UPDATE budget_usage SET invocations = invocations + ?, "
        "committed_units = committed_units + ? WHERE capability_id = ? AND grant_index = ?",
        [(invocations, units, cap, index) for cap, index in accounts],
    )


def _committed(conn: sqlite3.Connection, capability_id: str, grant_index: int) -> int:
    row = conn.execute(
        "SELECT committed_units FROM budget_usage WHERE capability_id = ? AND grant_index = ?",
        (capability_id, grant_index),
    ).fetchone()
    return 0 if row is None else int(row[0])


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
            if found is not None and int(found[0]) == 2:
                # Schema 3 adds the budget and approval tables (created above), nothing else.
                conn.execute("UPDATE meta SET value = ? WHERE name = 'schema'", ("3",))
                found = ("3",)
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

    # -- budgets -----------------------------------------------------------------------------

    def charge_budget(
        self, charge: BudgetCharge, accounts: Sequence[BudgetAccount]
    ) -> BudgetRefusal | None:
        """Hold ``charge`` (one invocation, ``charge.units`` of cost) against every account, in
        one transaction: either every account has room and all are charged, or nothing is
        written and the first account without room is returned. Concurrent charges on the
        same accounts serialize on the write lock, so none overspends."""
        with self._tx() as conn:
            taken = conn.execute(
                "SELECT 1 FROM budget_charges WHERE hold_id = ?", (charge.hold_id,)
            ).fetchone()
            if taken is not None:
                # The kernel's 409 chio_request_id_reused: one request id, one reservation.
                return BudgetRefusal(
                    capability_id=charge.capability_id,
                    grant_index=charge.grant_index,
                    constraint="request_id",
                    limit=1,
                    used=1,
                    requested=1,
                )
            for account in accounts:
                row = conn.execute(
                    "SELECT invocations, committed_units FROM budget_usage "
                    "WHERE capability_id = ? AND grant_index = ?",
                    (account.capability_id, account.grant_index),
                ).fetchone()
                invocations, committed = (0, 0) if row is None else (int(row[0]), int(row[1]))
                cap = account.max_invocations
                if cap is not None and invocations + 1 > cap:
                    return BudgetRefusal(
                        capability_id=account.capability_id,
                        grant_index=account.grant_index,
                        constraint="max_invocations",
                        limit=cap,
                        used=invocations,
                        requested=1,
                    )
                if (
                    account.max_total_units is not None
                    and committed + charge.units > account.max_total_units
                ):
                    return BudgetRefusal(
                        capability_id=account.capability_id,
                        grant_index=account.grant_index,
                        constraint="max_total_cost",
                        limit=account.max_total_units,
                        used=committed,
                        requested=charge.units,
                    )
            conn.executemany(
                "INSERT OR IGNORE INTO budget_usage (capability_id, grant_index) VALUES (?, ?)",
                [(a.capability_id, a.grant_index) for a in accounts],
            )
            _move(conn, charge.accounts, 1, charge.units)
            conn.execute(
                _INSERT_CHARGE,
                (
                    charge.hold_id,
                    charge.capability_id,
                    charge.grant_index,
                    json.dumps([list(a) for a in charge.accounts]),
                    charge.units,
                    charge.currency,
                    charge.receipt_id,
                    charge.chio_receipt_id,
                    charge.workflow_id,
                    charge.run_id,
                    charge.tool_server,
                    charge.tool_name,
                    charge.parameter_hash,
                    charge.request_id,
                    charge.created_at or now_us(),
                ),
            )
        return None

    def bind_budget_charge(self, hold_id: str, receipt_id: str, chio_receipt_id: str) -> None:
        """Record the receipt ids of the decision that made the hold (after it is signed).

        Committed like a receipt-log append (``synchronous=NORMAL``): it only indexes a hold
        that is already durable, which stays reachable by its hold id."""
        with self._tx(durable=False) as conn:
            conn.execute(
                "UPDATE budget_charges SET receipt_id = ?, chio_receipt_id = ? WHERE hold_id = ?",
                (receipt_id, chio_receipt_id, hold_id),
            )

    def release_budget_charge(self, hold_id: str) -> None:
        """Undo a hold whose decision did not end in an allow (a later guard denied, or the
        receipt could not be signed): the charge is forgotten and its accounts refunded."""
        with self._tx() as conn:
            row = conn.execute(_SELECT_CHARGE + "WHERE hold_id = ?", (hold_id,)).fetchone()
            if row is None:
                return
            charge = _charge_of(row)
            if charge.state == "held":
                _move(conn, charge.accounts, -1, -charge.units)
            conn.execute("DELETE FROM budget_charges WHERE hold_id = ?", (hold_id,))

    def budget_charge(self, key: str) -> BudgetCharge | None:
        """The charge with this hold id, decision receipt id or decision Chio receipt id."""
        rows = self._read(
            _SELECT_CHARGE_BY_KEY,
            (key, key, key),
        )
        return _charge_of(rows[0]) if rows else None

    def budget_usage(self, capability_id: str, grant_index: int) -> tuple[int, int]:
        """``(invocations, committed_units)`` counted against one grant."""
        rows = self._read(
            "SELECT invocations, committed_units FROM budget_usage "
            "WHERE capability_id = ? AND grant_index = ?",
            (capability_id, grant_index),
        )
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    def settle_budget_charge(self, hold_id: str, realized_units: int) -> BudgetSettlement:
        """Settle an open hold at ``realized_units`` (at most the hold): the difference goes
        back to every account. A closed hold or a cost over the hold is refused."""
        with self._tx() as conn:
            row = conn.execute(_SELECT_CHARGE + "WHERE hold_id = ?", (hold_id,)).fetchone()
            if row is None:
                return BudgetSettlement(charge=None, refusal=f"no budget hold {hold_id}")
            charge = _charge_of(row)
            if charge.state != "held":
                return BudgetSettlement(
                    charge=charge,
                    refusal=f"budget hold {hold_id} is {charge.state} and cannot be reconciled",
                )
            if realized_units > charge.units:
                return BudgetSettlement(
                    charge=charge,
                    refusal=f"realized cost {realized_units} is over the hold of {charge.units} "
                    f"{charge.currency} units",
                )
            at = now_us()
            _move(conn, charge.accounts, 0, realized_units - charge.units)
            conn.execute(
                "UPDATE budget_charges SET state = 'settled', realized_units = ?, closed_at = ? "
                "WHERE hold_id = ?",
                (realized_units, at, hold_id),
            )
            after = _committed(conn, *charge.accounts[0])
        settled = dataclasses.replace(
            charge, state="settled", realized_units=realized_units, closed_at=at
        )
        return BudgetSettlement(charge=settled, committed_after=after)

    def reverse_budget_charge(
        self, key: str, *, run: tuple[str, str] | None = None
    ) -> BudgetReversal:
        """Refund the charge of a decision (by receipt id, Chio receipt id or hold id) exactly
        once: its invocation and what it holds go back to every account. A charge already
        refunded is returned with ``refunded`` False. With ``run`` (workflow id, run id), a
        charge made for another run is refused."""
        with self._tx() as conn:
            row = conn.execute(
                _SELECT_CHARGE_BY_KEY,
                (key, key, key),
            ).fetchone()
            if row is None:
                return BudgetReversal(charge=None, refusal=f"no budget charge for receipt {key}")
            charge = _charge_of(row)
            if run is not None and (charge.workflow_id, charge.run_id) != run:
                return BudgetReversal(
                    charge=None,
                    refusal=f"the budget charge of receipt {key} belongs to another run",
                )
            if charge.state == "reversed":
                after = _committed(conn, *charge.accounts[0])
                return BudgetReversal(charge=charge, committed_after=after)
            refund = charge.spent_units
            at = now_us()
            _move(conn, charge.accounts, -1, -refund)
            conn.execute(
                "UPDATE budget_charges SET state = 'reversed', closed_at = ? WHERE hold_id = ?",
                (at, charge.hold_id),
            )
            after = _committed(conn, *charge.accounts[0])
        reversed_ = dataclasses.replace(charge, state="reversed", closed_at=at)
        return BudgetReversal(
            charge=reversed_, refunded=True, refunded_units=refund, committed_after=after
        )

    def close_budget_charge(self, hold_id: str, closing_receipt_id: str) -> None:
        """Record the receipt that settled or refunded a charge."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE budget_charges SET closing_receipt_id = ? WHERE hold_id = ?",
                (closing_receipt_id, hold_id),
            )
