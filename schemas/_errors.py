"""Errors of the schemas package.

    SchemaError                  base; every codec failure is one of these
    ├── DecodeError              bytes that are not a valid event (dead-letter them)
    │   ├── UnknownFormat        first byte is neither single-object (C3 01) nor Confluent (00)
    │   ├── UnknownSchema        fingerprint / schema id names no known writer schema
    │   └── MalformedBody        the Avro body does not decode, or has trailing bytes
    ├── EncodeError              a record that does not match its schema (a bug upstream)
    └── RegistryError            the schema registry is unreachable or refused a request
                                 (operational: ``retriable = True``)

All but RegistryError are data errors: retrying the same bytes cannot help (``retriable = False``).
"""

from __future__ import annotations

__all__ = [
    "DecodeError",
    "EncodeError",
    "MalformedBody",
    "RegistryError",
    "SchemaError",
    "UnknownFormat",
    "UnknownSchema",
]


class SchemaError(Exception):
    """Base of every error raised by the schemas package."""

    retriable = False


class DecodeError(SchemaError):
    """Bytes that cannot be decoded into a known event."""


class UnknownFormat(DecodeError):
    """The message's framing is neither Avro single-object nor Confluent."""


class UnknownSchema(DecodeError):
    """The message names a writer schema this process does not know."""


class MalformedBody(DecodeError):
    """The Avro body is truncated, corrupt, or has bytes left over."""


class EncodeError(SchemaError):
    """A record does not match its schema."""


class RegistryError(SchemaError):
    """The schema registry could not be reached or answered with an error (retry later)."""

    retriable = True

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
