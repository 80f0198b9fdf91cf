"""Ed25519 signatures over the canonical Avro encoding of a step receipt, and the hash chain.

The signature is the schema's last field. The signed bytes are the Avro body with an empty
signature, so a signed body is ``signed_bytes[:-1] + <avro bytes of the signature>``: signing
encodes once, and a verifier can check the wire body without decoding or re-encoding it.
Signing and verification are the native core's (``chio_receipts_native``, ed25519-dalek; Ed25519
is deterministic, so its signatures are byte for byte PyNaCl's, which the tests check): one call
encodes a receipt and signs it (``sign_step``). Keys load and print as before: a
:class:`KeyPair` is made from PyNaCl's ``SigningKey`` (or a 32-byte seed) and holds a native
``Signer`` of the same seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import chio_receipts_native
import nacl.signing

from chio_receipts.schemas._avro import encode_body
from chio_receipts.schemas._contract import STEP_SCHEMA
from chio_receipts.schemas._records import StepReceipt
from chio_receipts.schemas._stepcodec import encode_step

__all__ = [
    "SIGNATURE_SIZE",
    "STEP_SCHEMA",
    "KeyPair",
    "chain_root",
    "receipt_hash",
    "seal_receipt",
    "sign_receipt",
    "signed_body",
    "step_body",
    "verify_body",
    "verify_receipt",
]

SIGNATURE_SIZE = 64
# Avro encodes a 64-byte ``bytes`` as zig-zag varint 128 (0x80 0x01) followed by the bytes.
_SIG_PREFIX = b"\x80\x01"
_SIG_TAIL = len(_SIG_PREFIX) + SIGNATURE_SIZE


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An Ed25519 signing key with its id. The private half never prints."""

    key_id: str
    _signing_key: nacl.signing.SigningKey = field(repr=False)
    # The same seed held by the native core, which signs (same signatures: Ed25519 is
    # deterministic). Made once per key.
    _signer: chio_receipts_native.Signer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_signer", chio_receipts_native.Signer(bytes(self._signing_key)))

    @classmethod
    def generate(cls, key_id: str) -> KeyPair:
        """A fresh random key."""
        return cls(key_id, nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, key_id: str, seed: bytes) -> KeyPair:
        """A key from its 32-byte seed (configuration)."""
        return cls(key_id, nacl.signing.SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        """The 32-byte raw public key."""
        return bytes(self._signing_key.verify_key)

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte signature of ``message``."""
        return self._signer.sign(message)


def step_body(receipt: StepReceipt) -> bytes:
    """Schemaless Avro body of ``receipt`` exactly as it is sent."""
    fast = encode_step(receipt, receipt.key_id, receipt.signature)
    return fast if fast is not None else encode_body(STEP_SCHEMA, receipt.to_avro())


def sign_receipt(receipt: StepReceipt, key: KeyPair) -> tuple[StepReceipt, bytes]:
    """Sign ``receipt``; returns the signed copy and its wire body (encoded once).

    The signed bytes are the receipt's body with ``key.key_id`` and an empty signature; the wire
    body is the same bytes with the signature in place of the empty one.
    """
    signature, body = _sign_body(receipt, key)
    return receipt.with_signature(key_id=key.key_id, signature=signature), body


def seal_receipt(receipt: StepReceipt, key: KeyPair, **fields: Any) -> bytes:
    """Finish and sign a receipt its caller has just made, in place; returns its wire body.

    For the sidecar's decision, which builds each receipt once: ``fields`` (the values known
    only once the decision is signed, e.g. ``chio_receipt`` and ``latency_us``), then ``key_id``
    and ``signature`` are set on ``receipt`` itself instead of on copies. ``receipt`` must not
    have been handed to anyone yet (nor hashed): it is a frozen record from this call on.
    """
    unknown = set(fields) - _SEALABLE
    if unknown:
        raise TypeError(f"not fields of a step receipt: {sorted(unknown)}")
    for name, value in fields.items():
        object.__setattr__(receipt, name, value)
    signature, body = _sign_body(receipt, key)
    object.__setattr__(receipt, "key_id", key.key_id)
    object.__setattr__(receipt, "signature", signature)
    return body


_SEALABLE = frozenset(f.name for f in dataclasses.fields(StepReceipt)) - {"key_id", "signature"}


def _sign_body(receipt: StepReceipt, key: KeyPair) -> tuple[bytes, bytes]:
    """``(signature, wire body)`` of ``receipt`` signed by ``key``: one native call."""
    signed = chio_receipts_native.sign_step(receipt, key.key_id, key._signer)
    if signed is not None:
        return signed
    # A value the native writer does not take: fastavro decides (encodes or raises).
    record = receipt.to_avro()
    record["key_id"] = key.key_id
    record["signature"] = b""
    to_sign = encode_body(STEP_SCHEMA, record)
    signature = key.sign(to_sign)
    return signature, to_sign[:-1] + _SIG_PREFIX + signature


def signed_body(body: bytes) -> tuple[bytes, bytes] | None:
    """Split a signed wire body into (signed bytes, signature); None if it is not signed."""
    if len(body) < _SIG_TAIL + 1 or body[-_SIG_TAIL:-SIGNATURE_SIZE] != _SIG_PREFIX:
        return None
    return body[:-_SIG_TAIL] + b"\x00", body[-SIGNATURE_SIZE:]


def verify_body(body: bytes, public_key: bytes) -> bool:
    """Check the signature of a step receipt's wire body against ``public_key``."""
    parts = signed_body(body)
    if parts is None:
        return False
    message, signature = parts
    return chio_receipts_native.verify(bytes(public_key), message, signature)


def verify_receipt(receipt: StepReceipt, public_keys: Mapping[str, bytes]) -> bool:
    """True when ``receipt`` carries a valid signature by one of ``public_keys`` (by key id).

    Deterministic: re-encodes the record canonically, so any changed field fails.
    """
    public_key = public_keys.get(receipt.key_id)
    if public_key is None or len(receipt.signature) != SIGNATURE_SIZE:
        return False
    return verify_body(step_body(receipt), public_key)


def receipt_hash(body: bytes) -> bytes:
    """SHA-256 of a signed wire body: what ``prev_hash`` of the next step refers to."""
    return hashlib.sha256(body).digest()


def chain_root(hashes: Iterable[bytes]) -> bytes:
    """Root over a run's receipt hashes, taken in receipt-id order by the caller."""
    h = hashlib.sha256(b"chio-chain-v1")
    for item in hashes:
        h.update(item)
    return h.digest()
