"""Dead-letter records (pure): the original bytes plus headers that say where they came from
and why they were refused.

A dead letter is a CloudEvent of its own (binary mode, type ``DEAD_LETTER_EVENT_TYPE``, id
``topic/partition/offset`` of the refused message, or for an envelope row ClickHouse refused,
which was never consumed, ``workflow_receipts/workflow_id/run_id/revision``; subject its key,
content type the original's or ``application/octet-stream``). The original message's other
headers are kept as they were; its own CloudEvents headers are replaced, their values kept as
``chio.dlq.original.<header>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from chio_receipts.schemas import (
    CE_HEADERS,
    DEAD_LETTER_CONTENT_TYPE,
    DEAD_LETTER_EVENT_TYPE,
    DLQ_HEADER_PREFIX,
    cloudevent_headers,
)

__all__ = [
    "DEAD_LETTER_SOURCE",
    "DLQ_HEADER_PREFIX",
    "ORIGINAL_HEADER_PREFIX",
    "TRUNCATED_HEADER",
    "DeadLetter",
    "Reason",
    "parse_dead_letter_headers",
]

TRUNCATED_HEADER = DLQ_HEADER_PREFIX + "truncated"
"""Set to ``true`` when the original value was cut to fit the dead-letter topic."""
ORIGINAL_HEADER_PREFIX = DLQ_HEADER_PREFIX + "original."
"""Prefix of the refused message's own CloudEvents headers (``chio.dlq.original.ce_id`` ...)."""
DEAD_LETTER_SOURCE = "urn:chio-receipts:consumer"
"""CloudEvents source of dead letters when the consumer names none."""
_CE = frozenset(CE_HEADERS)
_CONTENT_TYPE = CE_HEADERS[-1]


class Reason:
    """Reason labels (also the ``reason`` label of the dead-letter metric)."""

    UNKNOWN_FORMAT = "unknown_format"
    UNKNOWN_SCHEMA = "unknown_schema"
    MALFORMED = "malformed"
    WRONG_SCHEMA = "wrong_schema"
    BAD_SIGNATURE = "bad_signature"
    BAD_CHIO_RECEIPT = "bad_chio_receipt"
    """The step's Chio kernel receipt does not check (tampered, moved to another step, not the
    step's capability/tool/verdict)."""
    UNTRUSTED_KERNEL_KEY = "untrusted_kernel_key"
    """The step's Chio receipt is signed by a kernel key that is neither one of the key ring's
    keys nor a configured trusted kernel key (after one refresh of the ring)."""
    UNKNOWN_KEY = "unknown_key"
    UNSIGNED_STEP = "unsigned_step"
    """The step carries neither an Avro signature (``key_id``, ``signature``) nor a Chio receipt:
    nothing vouches for it (a kernel evaluator's deny without a receipt, such as the kernel's
    403 for a revoked capability). Not an unknown key: there is no key to look up."""
    OVERSIZED = "oversized"
    INVALID_RECORD = "invalid_record"
    CLICKHOUSE_DATA = "clickhouse_data"
    OUTPUT_REJECTED = "output_rejected"
    KEY_MISMATCH = "key_mismatch"
    """The message's Kafka key is not its run key (``namespace/workflow_id/run_id``): it may
    sit on another partition than the rest of its run, so it is not folded into any run."""


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
    id: str = ""
    """The CloudEvents id when the refused thing is not a consumed message (an envelope row the
    builder made): derived from what it is, so a replay gives the same id."""

    @property
    def event_id(self) -> str:
        """The dead letter's CloudEvents id: where the refused message was (the same on a
        re-send, so a subscriber can drop duplicates), or the stable ``id`` it was given."""
        return self.id or f"{self.topic}/{self.partition}/{self.offset}"

    def kafka_headers(self, *, source: str = DEAD_LETTER_SOURCE) -> list[tuple[str, bytes]]:
        """The original's non-CloudEvents headers, the dead letter's CloudEvents headers, then
        ``chio.dlq.*`` headers describing the origin, the error and the original's CloudEvents
        attributes. ``source`` is the consumer that refused the message."""
        kept = [(k, v) for k, v in self.headers if k not in _CE]
        original = [(ORIGINAL_HEADER_PREFIX + k, v) for k, v in self.headers if k in _CE]
        content_type = next(
            (v for k, v in self.headers if k == _CONTENT_TYPE), DEAD_LETTER_CONTENT_TYPE
        )
        subject = self.key.decode("utf-8", "replace") if self.key else self.event_id
        ce = cloudevent_headers(
            event_id=self.event_id,
            event_type=DEAD_LETTER_EVENT_TYPE,
            source=source,
            subject=subject,
            content_type=content_type,
        )
        ours = [
            ("topic", self.topic),
            ("partition", str(self.partition)),
            ("offset", str(self.offset)),
            ("error_class", self.error_class),
            ("reason", self.reason),
            ("detail", self.detail[:1000]),
        ]
        return [
            *kept,
            *ce,
            *((DLQ_HEADER_PREFIX + k, v.encode()) for k, v in ours),
            *original,
        ]

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
        id: str = "",
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
            id=id,
        )


def parse_dead_letter_headers(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """The ``chio.dlq.*`` headers of a dead-letter message, prefix removed."""
    return {
        k[len(DLQ_HEADER_PREFIX) :]: bytes(v).decode("utf-8", "replace")
        for k, v in headers
        if k.startswith(DLQ_HEADER_PREFIX)
    }
