"""Keyed digest of activity arguments: arguments are never stored, only this HMAC.

The canonical encoding is Temporal's own payload encoding of the arguments (the default JSON
converter sorts keys and uses compact separators), each payload framed as
``len(metadata) metadata len(data) data`` with metadata entries sorted by key, so equal
arguments give equal digests on every worker. The key is a secret from configuration: without it
a digest cannot be brute-forced from guessed arguments.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import temporalio.converter

__all__ = ["ArgumentKey", "argument_digest", "canonical_arguments", "result_digest"]


@dataclass(frozen=True, slots=True)
class ArgumentKey:
    """An HMAC-SHA256 key with its id. The secret never prints."""

    key_id: str
    secret: bytes = field(repr=False)
    # The HMAC state after the key, made once: each digest copies it instead of keying again.
    _keyed: hmac.HMAC = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("an argument key needs at least 16 bytes of secret")
        object.__setattr__(self, "_keyed", hmac.new(self.secret, digestmod="sha256"))

    def hexdigest(self, message: bytes) -> str:
        """Hex HMAC-SHA256 of ``message`` under this key."""
        mac = self._keyed.copy()
        mac.update(message)
        return mac.hexdigest()

    @classmethod
    def generate(cls, key_id: str = "args-ephemeral") -> ArgumentKey:
        """A random key (digests are then comparable only within this process)."""
        return cls(key_id, os.urandom(32))

    @classmethod
    def from_hex(cls, key_id: str, secret_hex: str) -> ArgumentKey:
        """A key from configuration (hex-encoded secret)."""
        return cls(key_id, bytes.fromhex(secret_hex))


def _frame(out: bytearray, part: bytes) -> None:
    out += len(part).to_bytes(4, "big")
    out += part


def canonical_arguments(
    args: Sequence[Any],
    converter: temporalio.converter.PayloadConverter | None = None,
) -> bytes:
    """The canonical byte encoding of ``args`` that the digest covers.

    Each argument is framed as its Temporal payload (metadata, then data) as ``converter`` (or
    Temporal's default converter) makes it. With the default converter, plain JSON arguments are
    framed directly, byte for byte what the converter would produce, at half the cost.
    """
    if converter is None:
        fast = _plain_json_arguments(args)
        if fast is not None:
            return fast
    conv = converter or temporalio.converter.default().payload_converter
    out = bytearray(b"chio-args-v1")
    try:
        payloads = conv.to_payloads(list(args))
    except Exception as exc:  # noqa: BLE001 - any converter failure gives a typed marker
        # Unencodable arguments still get a deterministic digest, by their types only.
        _frame(out, f"unencodable:{type(exc).__name__}".encode())
        for arg in args:
            _frame(out, type(arg).__qualname__.encode())
        return bytes(out)
    _frame(out, len(payloads).to_bytes(4, "big"))
    for payload in payloads:
        for key in sorted(payload.metadata):
            _frame(out, key.encode())
            _frame(out, payload.metadata[key])
        _frame(out, b"")
        _frame(out, payload.data)
    return bytes(out)


_PLAIN_TYPES = (str, int, float, bool, list, dict, tuple)


def _no_default(value: Any) -> Any:
    raise TypeError(type(value).__name__)


# One encoder shared by every call (``json.dumps`` with non-default options builds a new one
# per call), with the default converter's options. A value it refuses, or a circular one
# (``ValueError``), sends the caller to the converter's own path.
_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=_no_default)


# What every plain JSON argument is framed with before its data: the metadata entry
# ``encoding: json/plain``, then the empty end-of-metadata frame.
_JSON_PLAIN_HEAD = b"".join(
    len(part).to_bytes(4, "big") + part for part in (b"encoding", b"json/plain", b"")
)
_MAGIC = b"chio-args-v1" + (4).to_bytes(4, "big")  # then the argument count, 4 bytes


def _plain_json_arguments(args: Sequence[Any]) -> bytes | None:
    """What the default converter frames for plain JSON values; None for anything else.

    Temporal's default converter encodes a plain JSON value (not None, not bytes, no custom
    type) as ``json.dumps(value, separators=(",", ":"), sort_keys=True)`` with the metadata
    ``encoding: json/plain``. A value ``json`` refuses, or any other type at the top, returns None
    so the caller takes the converter's own path. Same bytes as framing each part with
    :func:`_frame` (a unit test compares it with the converter's path).
    """
    data = plain_json_data(args)
    return None if data is None else frame_plain_json(data)


def plain_json_data(args: Sequence[Any]) -> list[bytes] | None:
    """Each argument's payload data as the default converter writes it (JSON, sorted keys,
    compact), or None when one is not a plain JSON value (see :func:`_plain_json_arguments`)."""
    out = []
    for arg in args:
        if type(arg) not in _PLAIN_TYPES:
            return None
        try:
            out.append(_JSON.encode(arg).encode())
        except (TypeError, ValueError, RecursionError):
            return None
    return out


def frame_plain_json(data: Sequence[bytes]) -> bytes:
    """:func:`canonical_arguments` of plain JSON arguments whose payload data is ``data``."""
    parts = [_MAGIC, len(data).to_bytes(4, "big")]
    for item in data:
        parts += (_JSON_PLAIN_HEAD, len(item).to_bytes(4, "big"), item)
    return b"".join(parts)


def argument_digest(
    key: ArgumentKey,
    args: Sequence[Any],
    converter: temporalio.converter.PayloadConverter | None = None,
) -> str:
    """Hex HMAC-SHA256 of the canonical encoding of ``args`` under ``key``."""
    return key.hexdigest(canonical_arguments(args, converter))


def result_digest(
    key: ArgumentKey,
    result: Any,
    converter: temporalio.converter.PayloadConverter | None = None,
) -> str:
    """Hex HMAC-SHA256 of the canonical encoding of an activity's result under ``key`` (the
    argument key): :func:`canonical_arguments` of the one-value list ``[result]``, so a result
    digests as an argument equal to it would. ``""`` for ``None`` (no result to bind)."""
    if result is None:
        return ""
    return key.hexdigest(canonical_arguments((result,), converter))
