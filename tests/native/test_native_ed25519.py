"""The native Ed25519 (ed25519-dalek) against PyNaCl (libsodium), the independent oracle."""

from __future__ import annotations

import chio_receipts_native as native
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

seeds = st.binary(min_size=32, max_size=32)
messages = st.binary(min_size=0, max_size=600)


def _nacl_ok(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


def _triple(seed: bytes, message: bytes) -> tuple[bytes, bytes, bytes]:
    key = nacl.signing.SigningKey(seed)
    return bytes(key.verify_key), message, key.sign(message).signature


@st.composite
def items(draw: st.DrawFn) -> tuple[tuple[bytes, bytes, bytes], str]:
    """A (public key, message, signature) triple: valid, or spoiled in one of several ways."""
    public_key, message, signature = _triple(draw(seeds), draw(messages))
    how = draw(
        st.sampled_from(["valid", "message", "signature", "wrong key", "r", "unreduced", "sizes"])
    )
    if how == "message":
        message = message + b"x" if not message else bytes([message[0] ^ 1]) + message[1:]
    elif how == "signature":
        i = draw(st.integers(0, 63))
        signature = (
            signature[:i]
            + bytes([signature[i] ^ (1 << draw(st.integers(0, 7)))])
            + signature[i + 1 :]
        )
    elif how == "wrong key":
        other = draw(seeds)
        public_key = bytes(nacl.signing.SigningKey(other).verify_key)
    elif how == "r":
        signature = bytes(32) + signature[32:]  # R of small order
    elif how == "unreduced":  # an R or a key with y >= p
        point = bytes([0xED + draw(st.integers(0, 18))]) + b"\xff" * 30 + b"\x7f"
        if draw(st.booleans()):
            signature = point + signature[32:]
        else:
            public_key = point
    elif how == "sizes":
        signature = signature[: draw(st.integers(0, 63))]
    return (public_key, message, signature), how


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(items(), min_size=1, max_size=40), st.integers(1, 64))
def test_verify_batch_agrees_with_pynacl_on_every_item(
    drawn: list[tuple[tuple[bytes, bytes, bytes], str]], chunk: int
) -> None:
    triples = [t for t, _ in drawn]
    expected = [_nacl_ok(*t) for t in triples]
    assert native.verify_batch(triples, chunk=chunk) == expected
    assert [native.verify(*t) for t in triples] == expected
    # Only the valid ones verify (the oracle itself is checked against how they were made).
    assert expected == [how == "valid" or (how == "wrong key" and _nacl_ok(*t)) for t, how in drawn]


@settings(max_examples=15, deadline=None)
@given(seeds, st.integers(0, 511), st.sampled_from(["message", "signature", "wrong key"]))
def test_one_bad_item_in_a_large_batch_is_named_exactly(seed: bytes, bad: int, how: str) -> None:
    key = nacl.signing.SigningKey(seed)
    public_key = bytes(key.verify_key)
    triples = []
    for i in range(512):
        message = f"step {i} ".encode() * 20
        triples.append((public_key, message, key.sign(message).signature))
    public_key, message, signature = triples[bad]
    if how == "message":
        triples[bad] = (public_key, message + b"!", signature)
    elif how == "signature":
        triples[bad] = (
            public_key,
            message,
            signature[:40] + bytes([signature[40] ^ 4]) + signature[41:],
        )
    else:
        other = bytes(nacl.signing.SigningKey(bytes(31) + b"\x07").verify_key)
        triples[bad] = (other, message, signature)
    for chunk in (64, 256, 512):
        verdicts = native.verify_batch(triples, chunk=chunk)
        assert [i for i, ok in enumerate(verdicts) if not ok] == [bad]
    assert not _nacl_ok(*triples[bad])


def test_empty_and_all_bad_batches() -> None:
    assert native.verify_batch([]) == []
    public_key, message, signature = _triple(bytes(32), b"m")
    bad = [(public_key, message + i.to_bytes(2, "big"), signature) for i in range(300)]
    assert native.verify_batch(bad) == [False] * 300
    assert native.verify_batch([(public_key, message, signature)] * 3) == [True] * 3


def test_bytes_like_inputs_are_accepted() -> None:
    public_key, message, signature = _triple(bytes(range(32)), b"bytes-like")
    assert native.verify_batch([(bytearray(public_key), bytearray(message), signature)]) == [True]


@settings(max_examples=60, deadline=None)
@given(seeds, messages)
def test_signatures_verify_both_ways(seed: bytes, message: bytes) -> None:
    nacl_key = nacl.signing.SigningKey(seed)
    signer = native.Signer(seed)
    assert signer.public_key == bytes(nacl_key.verify_key)
    ours = native.sign(seed, message)
    # Ed25519 is deterministic: the same bytes as libsodium's.
    assert ours == signer.sign(message) == nacl_key.sign(message).signature
    assert _nacl_ok(signer.public_key, message, ours)
    assert native.verify(signer.public_key, message, nacl_key.sign(message).signature)
    assert not native.verify(signer.public_key, message + b"\x00", ours)


def test_a_seed_must_be_32_bytes_and_never_prints() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        native.sign(b"short", b"m")
    with pytest.raises(ValueError, match="32 bytes"):
        native.Signer(bytes(33))
    seed = bytes(range(100, 132))
    shown = repr(native.Signer(seed))
    assert seed.hex() not in shown
    assert bytes(nacl.signing.SigningKey(seed).verify_key).hex() in shown
