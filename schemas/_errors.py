"""The project's exception root, and the errors of the schemas package.

Every exception the project raises derives from :class:`ChioReceiptsError`; each package draws
its own tree under it (``StreamerError``, ``ConsumerError``, ``ChioTemporalError``, ...). Whether
the same input can succeed on a later attempt is read one way everywhere: the ``retriable``
class attribute (see :func:`is_retriable`).

    ChioReceiptsError            root of every error of the project (``retriable = False``)
    ├── ContractError            the deployment breaks the contract (e.g. steps and runs topics
    │                            are not co-partitioned); a configuration error, not retriable
    ├── ProtocolError            a sidecar-protocol object is invalid (an empty or non-string
    │                            scope entry); also a ``ValueError``
    └── SchemaError              base; every codec failure is one of these
        ├── DecodeError          bytes that are not a valid event (dead-letter them)
        │   ├── UnknownFormat    first byte is neither single-object (C3 01) nor Confluent (00)
        │   ├── UnknownSchema    fingerprint / schema id names no known writer schema
        │   └── MalformedBody    the Avro body does not decode, or has trailing bytes
        ├── EncodeError          a record that does not match its schema (a bug upstream)
        └── RegistryError        the schema registry is unreachable or refused a request
                                 (operational: ``retriable = True``)

All but RegistryError are data errors: retrying the same bytes cannot help (``retriable = False``).
"""

from __future__ import annotations

__all__ = [
    "ChioReceiptsError",
    "ContractError",
    "DecodeError",
    "EncodeError",
    "MalformedBody",
    "ProtocolError",
    "RegistryError",
    "SchemaError",
    "UnknownFormat",
    "UnknownSchema",
    "is_retriable",
]


class ChioReceiptsError(Exception):
    """Root of every error the project raises."""

    retriable: bool = False
    """True when the same input can succeed on a later attempt (an operational failure)."""


def is_retriable(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: the project's ``retriable`` attribute, else False."""
    return bool(getattr(exc, "retriable", False))


class ContractError(ChioReceiptsError):
    """The deployment breaks the pipeline's contract (topics, partitioning)."""


class ProtocolError(ChioReceiptsError, ValueError):
    """A wire object of the sidecar protocol is invalid (each side translates it into its own)."""


class SchemaError(ChioReceiptsError):
    """Base of every error raised by the schemas package."""


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
