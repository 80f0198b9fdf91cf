"""The native core of chio-receipts (Rust): batch Ed25519, signing, canonical JSON, and the Chio
kernel's own receipt verifier (chio-core-types). Pure functions; the non-trivial ones release
the GIL."""

from collections.abc import Sequence
from typing import Any, ClassVar

__version__: str

def verify_batch(items: Sequence[tuple[bytes, bytes, bytes]], chunk: int = 256) -> list[bool]:
    """Ed25519 over ``(public_key, message, signature)`` triples; a failed batch is bisected
    down to single checks, so exactly the items that do not verify are ``False``."""

def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """One Ed25519 check."""

def sign(seed: bytes, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message`` by the key of the 32-byte ``seed``."""

class Signer:
    """An Ed25519 signing key held natively (its secret never prints)."""

    def __init__(self, seed: bytes) -> None: ...
    @property
    def public_key(self) -> bytes: ...
    def sign(self, message: bytes) -> bytes: ...

def canonical_json(json_text: str, strict: bool = False) -> bytes:
    """The kernel's RFC 8785 canonical JSON of ``json_text``; ``ValueError`` when it has none."""

def verify_kernel_receipt(
    json_text: str, trusted_keys: Sequence[str] | None = None
) -> tuple[bool, str | None]:
    """chio-core-types' ``ChioReceipt`` deserialisation and ``verify_signature``, plus the
    trusted-signer check: ``(valid, reason)``."""

class PlainDecoder:
    """Framed Avro events of known plain schemas, decoded in batches (GIL released)."""

    OK: ClassVar[int]
    DEFER: ClassVar[int]
    UNKNOWN_FORMAT: ClassVar[int]
    UNKNOWN_SCHEMA: ClassVar[int]
    MALFORMED: ClassVar[int]

    def __init__(
        self,
        schemas: Sequence[tuple[str, str, Sequence[bytes]]],
        known: Sequence[bytes] | None = None,
    ) -> None:
        """``(name, schema_json, fingerprints)`` in dependency order; ``known``: fingerprints
        left to the library reader (``None``: every one not decoded here)."""

    def decode_batch(self, values: Sequence[bytes]) -> list[tuple[int, Any, Any, Any]]:
        """Per message ``(OK, schema_name, record, body)``, ``(DEFER, None, None, None)`` or
        ``(UNKNOWN_FORMAT | UNKNOWN_SCHEMA | MALFORMED, detail, None, None)``."""
