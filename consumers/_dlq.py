"""Dead-letter records (pure): the original bytes plus headers that say where they came from
and why they were refused. The original message's headers are kept as they were."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chio_receipts.schemas import DLQ_HEADER_PREFIX

__all__ = [
    "DLQ_HEADER_PREFIX",
    "TRUNCATED_HEADER",
    "DeadLetter",
    "Reason",
    "parse_dead_letter_headers",
]

TRUNCATED_HEADER = DLQ_HEADER_PREFIX + "truncated"
"""Set to ``true`` when the original value was cut to fit the dead-letter topic."""


class Reason:
    """Reason labels (also the ``reason`` label of the dead-letter metric)."""

    UNKNOWN_FORMAT = "unknown_format"
    UNKNOWN_SCHEMA = "unknown_schema"
    MALFORMED = "malformed"
    WRONG_SCHEMA = "wrong_schema"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    OVERSIZED = "oversized"
    INVALID_RECORD = "invalid_record"
    CLICKHOUSE_DATA = "clickhouse_data"
    OUTPUT_REJECTED = "output_rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """One refused message, ready to produce to the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    error_class: str
    reason: str
    detail: str

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        """Original headers, then ``chio.dlq.*`` headers describing the origin and the error."""
        ours = [
            ("topic", self.topic),
            ("partition", str(self.partition)),
            ("offset", str(self.offset)),
            ("error_class", self.error_class),
            ("reason", self.reason),
            ("detail", self.detail[:1000]),
        ]
        return [*self.headers, *((DLQ_HEADER_PREFIX + k, v.encode()) for k, v in ours)]

    @classmethod
    def of(
        cls,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None,
        error: BaseException | str,
        reason: str,
    ) -> DeadLetter:
        """Build from a consumed message and the error (an exception or a class name)."""
        if isinstance(error, BaseException):
            error_class, detail = type(error).__name__, str(error)
        else:
            error_class, detail = error, error
        return cls(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            headers=tuple((k, bytes(v)) for k, v in headers or ()),
            error_class=error_class,
            reason=reason,
            detail=detail,
        )


def parse_dead_letter_headers(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """The ``chio.dlq.*`` headers of a dead-letter message, prefix removed."""
    return {
        k[len(DLQ_HEADER_PREFIX) :]: bytes(v).decode("utf-8", "replace")
        for k, v in headers
        if k.startswith(DLQ_HEADER_PREFIX)
    }
