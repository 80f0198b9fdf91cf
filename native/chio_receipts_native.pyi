"""The native core of chio-receipts (Rust): batch Ed25519, signing, canonical JSON, and the Chio
kernel's own receipt verifier (chio-core-types). Pure functions; the non-trivial ones release
the GIL."""

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
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

def check_steps(
    items: Iterable[tuple[object, tuple[bytes, bytes, bytes] | bool | None]],
    trusted_keys: Iterable[str] | None = None,
    defer: bool = False,
) -> list[Any]:
    """The Chio check of each step (``schemas.check_chio_step``) and its Avro signature, every
    Ed25519 signature in one batch. ``items``: ``(record, avro)``, ``record`` a plain step dict
    or a ``StepReceipt``, ``avro`` ``None`` (none to check), ``False`` (unsigned body) or
    ``(public_key, message, signature)``. Per item: ``None`` (holds), ``False`` (bad Avro
    signature) or ``(detail, untrusted_key | None)``. ``defer=True``: no signature is verified;
    each item is ``(verdict, (key, message, signature) | None)``."""

def check_outcomes(
    records: Iterable[object],
    statuses: AbstractSet[str],
    trusted_keys: Iterable[str] | None = None,
    defer: bool = False,
) -> list[Any]:
    """The Chio check of each outcome record (``schemas.check_chio_outcome``); ``None`` for a
    record without a receipt. Results and ``defer`` as for :func:`check_steps`."""

def check_signed(
    chio_receipt: str,
    signed: bytes,
    trusted_keys: Iterable[str] | None = None,
    defer: bool = False,
) -> Any:
    """``schemas.check_signed_receipt``'s checks: ``None`` or ``(detail, untrusted_key)``."""

def step_request_id(step: object) -> str:
    """``schemas.request_id_for`` of a ``StepReceipt`` or a plain step record."""

def outcome_request_id(outcome: object, statuses: AbstractSet[str]) -> str:
    """``schemas.outcome_request_id`` of a ``StepOutcome`` or a plain outcome record."""

def chio_columns(texts: Iterable[object]) -> list[tuple[str, ...] | None]:
    """The Chio analytics columns (``consumers._rows.CHIO_COLUMNS`` order) of each receipt
    text, one parse each, the GIL released; ``None`` where the text must be read with Python's
    ``json`` (a number or a non-empty array/object in a column, not a JSON object, unreadable)."""

def encode_step(receipt: object, key_id: str, signature: bytes) -> bytes | None:
    """The schemaless Avro body of a ``StepReceipt`` (read by attribute) with ``key_id`` and
    ``signature`` in place of its own, byte for byte fastavro's; ``None`` when a value is not of a
    type the schema takes as is."""

def sign_step(receipt: object, key_id: str, signer: Signer) -> tuple[bytes, bytes] | None:
    """``(signature, wire_body)``: the body with ``key_id`` and an empty signature, signed by
    ``signer``, and the same bytes with the signature in place; ``None`` as for
    :func:`encode_step`."""

def canonical_json_of(value: object, safe_integers: bool = False) -> bytes:
    """The kernel's RFC 8785 canonical JSON of a Python value (dicts and other mappings with
    ``str`` keys, lists, tuples, str, 64-bit int, finite float, bool, None); ``ValueError`` when
    it has none."""

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

def chio_header_values(text: str) -> tuple[str, str] | None:
    """``(receipt id, verdict)`` of a Chio receipt's JSON text (top-level ``id``,
    ``decision.verdict``; ``""`` where absent or null), read in one validating pass without
    building the document; ``None`` when only ``json.loads`` can settle it."""
