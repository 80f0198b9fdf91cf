"""The sidecar's durable state: the SQLite store, the data directory, the signing key and its
rotation, the hash-chained receipt log."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from chio_receipts.schemas import EvaluationRequest, KeyPair, Verdict, verify_body
from chio_receipts.sidecar import (
    DataDir,
    LocalSidecar,
    SidecarStore,
    StoreError,
    key_id_for,
    rotate_key,
)

pytestmark = pytest.mark.unit


def _request(cap_id: str, tool: str = "read") -> EvaluationRequest:
    return EvaluationRequest(capability_id=cap_id, tool_server="srv", tool=tool)


def _open(path: Path) -> tuple[DataDir, LocalSidecar]:
    directory = DataDir(path)
    return directory, LocalSidecar(directory.signing_key(), store=directory.store)


def test_a_restart_on_the_same_data_dir_keeps_key_capabilities_and_revocations(
    tmp_path: Path,
) -> None:
    directory, side = _open(tmp_path / "sc")
    root = side.mint("agent:a", ["read", "write"], 3600)
    child = side.derive(root.id, scope=["read"])
    other = side.mint("agent:b", ["read"], 3600)
    side.revoke_now(other.id)
    first = side.evaluate_now(_request(child.id))
    key_id = side.key_id
    directory.close()

    directory, side = _open(tmp_path / "sc")
    assert side.key_id == key_id
    assert key_id == key_id_for(side.store.public_keys()[key_id])
    again = side.evaluate_now(_request(child.id))
    assert again.receipt.verdict is Verdict.ALLOW
    assert side.evaluate_now(_request(other.id)).receipt.verdict is Verdict.DENY
    keys = side.store.public_keys()
    assert verify_body(first.body, keys[first.receipt.key_id])
    assert side.store.log_length() == 3
    directory.close()


def test_the_seed_file_is_hex_mode_0600_and_key_ids_never_repeat(tmp_path: Path) -> None:
    directory = DataDir(tmp_path / "sc")
    key = directory.signing_key()
    text = directory.seed_path.read_text()
    assert len(text) == 65
    assert text.endswith("\n")
    assert bytes.fromhex(text.strip())
    assert stat.S_IMODE(directory.seed_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.path.stat().st_mode) == 0o700
    assert key.key_id == key_id_for(key.public_key)
    assert key.key_id != DataDir(tmp_path / "other").signing_key().key_id
    assert not list(directory.path.glob("*.tmp"))
    directory.close()


def test_a_key_id_names_one_public_key(tmp_path: Path) -> None:
    store = SidecarStore(tmp_path / "s.sqlite3")
    LocalSidecar(KeyPair.from_seed("k1", os.urandom(32)), store=store)
    with pytest.raises(StoreError, match="another public key"):
        LocalSidecar(KeyPair.from_seed("k1", os.urandom(32)), store=store)
    store.close()


def test_rotation_keeps_old_public_keys_and_earlier_receipts_verify(tmp_path: Path) -> None:
    directory, side = _open(tmp_path / "sc")
    cap = side.mint("agent:a", ["read"], 3600)
    before = side.evaluate_now(_request(cap.id))
    done = rotate_key(DataDir(tmp_path / "sc"), signal_server=False)
    assert done.old_key_id == side.key_id != done.new_key_id
    assert done.signalled_pid is None
    side.use_key(directory.signing_key())  # what SIGHUP does in the served process
    after = side.evaluate_now(_request(cap.id))
    assert after.receipt.key_id == done.new_key_id
    keys = side.store.keys()
    assert {k.key_id: k.retired_at is None for k in keys} == {
        done.old_key_id: False,
        done.new_key_id: True,
    }
    public = side.store.public_keys()
    assert verify_body(before.body, public[before.receipt.key_id])
    assert verify_body(after.body, public[after.receipt.key_id])
    assert side.store.verify_log().ok
    directory.close()


def test_verify_log_finds_a_deleted_an_altered_and_a_reordered_row(tmp_path: Path) -> None:
    directory, side = _open(tmp_path / "sc")
    cap = side.mint("agent:a", ["read"], 3600)
    for _ in range(5):
        side.evaluate_now(_request(cap.id))
    report = side.store.verify_log()
    assert report.ok
    assert report.rows == 5
    directory.close()

    db = sqlite3.connect(tmp_path / "sc" / "sidecar.sqlite3")
    with db:
        db.execute("DELETE FROM receipt_log WHERE seq = 2")
        body = db.execute("SELECT body FROM receipt_log WHERE seq = 4").fetchone()[0]
        db.execute(
            "UPDATE receipt_log SET body = ? WHERE seq = 4", (body[:-1] + bytes([body[-1] ^ 1]),)
        )
    db.close()
    problems = SidecarStore(tmp_path / "sc" / "sidecar.sqlite3").verify_log().problems
    assert any("row 3" in p and "missing" in p for p in problems)
    assert any("row 3" in p and "prev_hash" in p for p in problems)
    assert any("row 4" in p and "content_hash" in p for p in problems)
    assert any("row 4" in p and "signature" in p for p in problems)


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = DataDir(tmp_path / "sc")
    first.lock()
    assert first.serving_pid() == os.getpid()
    with pytest.raises(StoreError, match="another sidecar"):
        DataDir(tmp_path / "sc").lock()
    first.close()
    assert DataDir(tmp_path / "sc").serving_pid() is None


def test_a_bad_seed_file_is_refused(tmp_path: Path) -> None:
    directory = DataDir(tmp_path / "sc")
    directory.path.mkdir(mode=0o700)
    directory.seed_path.write_text("not hex\n")
    with pytest.raises(StoreError, match="64 hex digits"):
        directory.signing_key()
    directory.close()


def test_expired_capabilities_are_dropped_from_the_store_too(tmp_path: Path) -> None:
    store = SidecarStore(tmp_path / "s.sqlite3")
    side = LocalSidecar(store=store, max_capabilities=2, expired_grace_seconds=0)
    short = side.mint("agent:a", ["read"], 1e-6)
    side.revoke_now(short.id)
    side.mint("agent:a", ["read"], 3600)
    side.mint("agent:a", ["read"], 3600)
    assert short.id not in {c.id for c in store.capabilities()}
    assert store.revocations() == set()
    store.close()


def test_the_default_store_is_in_memory_and_keeps_no_receipt_log() -> None:
    side = LocalSidecar()
    cap = side.mint("agent:a", ["read"], 60)
    side.evaluate_now(_request(cap.id))
    assert side.store.path == ":memory:"
    assert side.store.log_length() == 0
    assert side.key_id == key_id_for(side.store.public_keys()[side.key_id])
