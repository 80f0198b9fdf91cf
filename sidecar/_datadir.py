"""The sidecar's data directory: its store, its signing key, and the lock of the serving process.

    <data dir>/                   mode 0700
    ├── sidecar.sqlite3           capabilities, revocations, public keys, receipt log (WAL)
    ├── signing-key.seed          the current Ed25519 seed: 64 hex digits and a newline, 0600
    └── sidecar.lock              held (flock) by the serving process; holds its pid

A key id is derived from its public key (:func:`key_id_for`), so two keys never share an id
and a receipt names the one key that verifies it. Rotation (:func:`rotate_key`) records the new
public key in the store *before* the seed file is replaced, so a verifier that refreshes from
``/v1/keys`` on an unknown key id always finds it; the old public keys stay in the store and
keep being served. A running sidecar takes up a rotated key on SIGHUP or on its next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from chio_receipts.schemas import Closeable, KeyPair
from chio_receipts.sidecar._errors import StoreError
from chio_receipts.sidecar._store import SidecarStore

__all__ = [
    "DataDir",
    "Rotation",
    "key_id_for",
    "rotate_key",
]

_log = logging.getLogger(__name__)

STORE_FILE = "sidecar.sqlite3"
SEED_FILE = "signing-key.seed"
LOCK_FILE = "sidecar.lock"
_SEED_SIZE = 32


def key_id_for(public_key: bytes) -> str:
    """The key id of an Ed25519 public key: ``ed25519-`` and 16 hex digits of its SHA-256."""
    return "ed25519-" + hashlib.sha256(public_key).hexdigest()[:16]


def _key_from_seed(seed: bytes) -> KeyPair:
    probe = KeyPair.from_seed("", seed)
    return KeyPair.from_seed(key_id_for(probe.public_key), seed)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_seed(directory: Path, seed: bytes, *, replace: bool) -> None:
    """Write the seed file atomically (temporary file, fsync, rename), mode 0600 from birth."""
    final = directory / SEED_FILE
    tmp = directory / f".{SEED_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(seed.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, final)
        else:
            # link() fails if the file exists: two first starts never both create a key.
            os.link(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(directory)


def _read_seed(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read the signing key seed {path}: {exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning("the signing key seed %s is readable by others; chmod 600 it", path)
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != _SEED_SIZE:
        raise StoreError(f"{path} must hold a 32-byte seed as 64 hex digits")
    return seed


class DataDir(Closeable):
    """A sidecar data directory: opens (creating) the store and the signing key.

    A context manager; :meth:`lock` makes this process the serving one (a second ``serve`` on
    the same directory is refused) and writes its pid for ``keys rotate``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_file: IO[str] | None = None
        self._store: SidecarStore | None = None

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"

    @property
    def seed_path(self) -> Path:
        """The file of the current signing key's seed."""
        return self.path / SEED_FILE

    def _ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the sidecar data directory {self.path}: {exc}"
            ) from exc

    @property
    def store(self) -> SidecarStore:
        """The store (opened on first use)."""
        if self._store is None:
            self._ensure()
            self._store = SidecarStore(self.path / STORE_FILE)
        return self._store

    def signing_key(self) -> KeyPair:
        """The current signing key, created on the first start; its public key is recorded."""
        self._ensure()
        if not self.seed_path.exists():
            if self.store.keys():
                _log.warning(
                    "%s is missing: a new signing key is made (receipts of earlier keys still "
                    "verify with their recorded public keys)",
                    self.seed_path,
                )
            with contextlib.suppress(FileExistsError):
                _write_seed(self.path, os.urandom(_SEED_SIZE), replace=False)
        key = _key_from_seed(_read_seed(self.seed_path))
        self.store.add_key(key.key_id, key.public_key)
        self.store.retire_keys(except_key_id=key.key_id)
        return key

    def lock(self) -> None:
        """Hold the directory's lock for this process (StoreError if another one holds it)."""
        if self._lock_file is not None:
            return
        self._ensure()
        f = (self.path / LOCK_FILE).open("a+", encoding="ascii")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise StoreError(f"another sidecar serves the data directory {self.path}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def serving_pid(self) -> int | None:
        """The pid of the process serving this directory, None when none does."""
        path = self.path / LOCK_FILE
        if not path.exists():
            return None
        with path.open("a+", encoding="ascii") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                text = f.read().strip()
                return int(text) if text.isdigit() else None
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return None

    def close(self) -> None:
        """Close the store and release the lock (idempotent)."""
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotation:
    """What :func:`rotate_key` did."""

    old_key_id: str
    new_key_id: str
    new_public_key: bytes
    signalled_pid: int | None


def rotate_key(data_dir: DataDir, *, signal_server: bool = True) -> Rotation:
    """Make a new signing key, keep the old public keys, and tell the serving process (SIGHUP).

    The new public key is recorded before the seed file is replaced, so it is published before
    anything is signed with it.
    """
    old = data_dir.signing_key()
    seed = os.urandom(_SEED_SIZE)
    new = _key_from_seed(seed)
    data_dir.store.add_key(new.key_id, new.public_key)
    _write_seed(data_dir.path, seed, replace=True)
    data_dir.store.retire_keys(except_key_id=new.key_id)
    pid = data_dir.serving_pid() if signal_server else None
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pid = None
    return Rotation(
        old_key_id=old.key_id,
        new_key_id=new.key_id,
        new_public_key=new.public_key,
        signalled_pid=pid,
    )
