"""The ``chio-temporal/v1`` envelope of one run, its canonical encoding and its signature.

Canonical encoding (what the builder signs): the schemaless Avro body of ``WorkflowReceipt`` whose
``steps`` are the step receipts in receipt-id order, whose ``metadata`` map holds every entry
except ``signature``, in ascending key order, in one map block, followed by the ``outcomes``
(outcome records in order) and the ``attempts`` accounts. Avro is deterministic for a given
record, and the steps' bytes inside it are exactly their current-schema bodies, so the envelope is
encoded by splicing the step bodies (no re-encoding) and a verifier can rebuild the same bytes from
stored rows. The signature (Ed25519, hex) is then added to ``metadata["signature"]``; the
published Avro envelope carries the same sorted map with the signature in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import chio_receipts_native

from chio_receipts.consumers._wire import (
    ENVELOPE_SCHEMA,
    STEP_SCHEMA,
    avro_long,
    avro_string,
    encode_plain,
    read_plain,
)
from chio_receipts.schemas import (
    ENVELOPE_VERSION,
    STEP_OUTCOME_SCHEMA,
    AccountState,
    AttemptAccount,
    KeyPair,
    StepStatus,
    frame,
)

__all__ = ["Envelope", "RunHeader", "verify_envelope_signature"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunHeader:
    """Which run, and how it went: the leading fields of an :class:`Envelope` and, in the same
    order, of its ``workflow_receipts`` row."""

    namespace: str
    workflow_id: str
    run_id: str
    workflow_type: str
    parent_workflow_ids: tuple[str, ...]
    started_at: int
    completed_at: int | None
    outcome: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope(RunHeader):
    """One revision of a run's envelope; ``steps`` are current-schema step bodies in
    receipt-id order, ``receipt_ids`` the matching ids."""

    revision: int
    complete: bool
    missing_steps: int
    expected_steps: int | None
    allow_count: int
    deny_count: int
    receipt_ids: tuple[str, ...]
    steps: tuple[bytes, ...] = field(repr=False)
    chain_root: bytes
    extra: tuple[tuple[str, str], ...] = ()
    outcomes: tuple[bytes, ...] = field(default=(), repr=False)
    """Current-schema ``StepOutcome`` bodies, in (activity_id, attempt, outcome_id) order."""
    outcome_ids: tuple[str, ...] = ()
    """The matching outcome ids (as ``receipt_ids`` for ``steps``; not signed themselves)."""
    attempts: tuple[AttemptAccount, ...] = ()
    """How every attempt Temporal started is accounted for, in (activity_id, attempt) order."""
    key_id: str = ""
    signature: bytes = field(default=b"", repr=False)
    # The signed Avro body, kept by ``signed_by`` so it is encoded once.
    encoded: bytes = field(default=b"", repr=False, compare=False)

    @property
    def step_count(self) -> int:
        """Number of steps in this revision."""
        return len(self.steps)

    def metadata(self, *, signed: bool = True) -> dict[str, str]:
        """The metadata map in ascending key order (with ``signature`` when ``signed``)."""
        meta = self._metadata(self.key_id)
        if signed:
            meta["signature"] = self.signature.hex()
        return dict(sorted(meta.items()))

    def _metadata(self, key_id: str) -> dict[str, str]:
        """The metadata entries but ``signature``, unsorted, ``key_id`` as given."""
        return {
            "namespace": self.namespace,
            "workflow_type": self.workflow_type,
            "revision": str(self.revision),
            "complete": "true" if self.complete else "false",
            "missing_steps": str(self.missing_steps),
            "expected_steps": "" if self.expected_steps is None else str(self.expected_steps),
            "chain_root": self.chain_root.hex(),
            "key_id": key_id,
            **dict(self.extra),
        }

    def _header(self) -> dict[str, Any]:
        return {
            "version": ENVELOPE_VERSION,
            "workflow_id": self.workflow_id,
            "run_id": self.run_id,
            "parent_workflow_ids": list(self.parent_workflow_ids),
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "outcome": self.outcome,
            "step_count": self.step_count,
            "allow_count": self.allow_count,
            "deny_count": self.deny_count,
            "steps": [],
            "metadata": {},
            "outcomes": [],
            "attempts": [],
        }

    def avro_body(self, *, signed: bool = True) -> bytes:
        """Schemaless Avro body; ``signed=False`` gives the canonical bytes that are signed."""
        if signed and self.encoded:
            return self.encoded
        return self._head() + _map_bytes(self.metadata(signed=signed)) + self._tail()

    def _head(self) -> bytes:
        """The body up to the metadata map: the header fields, then the steps spliced in."""
        prefix = _header_bytes(self)
        if prefix is None:
            # Empty steps, metadata, outcomes and attempts end the body with four 0x00
            # terminators: splice the steps in before the last four.
            prefix = encode_plain(ENVELOPE_SCHEMA, self._header())[:-4]
        return prefix + _array(self.steps)

    def _tail(self) -> bytes:
        return _array(self.outcomes) + _array(tuple(_account_bytes(a) for a in self.attempts))

    def signed_by(self, key: KeyPair) -> Envelope:
        """A copy signed by ``key`` (the builder's key), its Avro body encoded once.

        The metadata entries are encoded once: the signed map is the unsigned one with the
        ``signature`` entry in its sorted place (what :meth:`metadata` gives, encoded)."""
        head = self._head()
        tail = self._tail()
        meta = self._metadata(key.key_id)
        entries = {k: avro_string(k) + avro_string(v) for k, v in meta.items()}
        signature = key.sign(head + _entries_bytes(entries) + tail)
        entries["signature"] = _SIGNATURE_KEY + avro_string(signature.hex())
        encoded = head + _entries_bytes(entries) + tail
        return replace(self, key_id=key.key_id, signature=signature, encoded=encoded)

    def framed(self) -> bytes:
        """The envelope in Avro single-object encoding, for the envelopes topic."""
        return frame(ENVELOPE_SCHEMA, self.avro_body())

    def to_json(self) -> dict[str, Any]:
        """The ``chio-temporal/v1`` JSON envelope (steps decoded, bytes as hex)."""
        steps: list[dict[str, Any]] = []
        for body in self.steps:
            record = read_plain(STEP_SCHEMA, body)
            record["prev_hash"] = record["prev_hash"].hex()
            record["signature"] = record["signature"].hex()
            steps.append(record)
        outcomes: list[dict[str, Any]] = []
        for body in self.outcomes:
            record = read_plain(STEP_OUTCOME_SCHEMA, body)
            record["chio_signed"] = record["chio_signed"].hex()
            outcomes.append(record)
        return {
            **self._header(),
            "steps": steps,
            "metadata": self.metadata(),
            "outcomes": outcomes,
            "attempts": [a.to_avro() for a in self.attempts],
        }


_ACCOUNT_INDEX = {state: i for i, state in enumerate(AccountState)}
_STATUS_INDEX = {status: i for i, status in enumerate(StepStatus)}


def _array(items: tuple[bytes, ...]) -> bytes:
    """An Avro array of already encoded items, in one block."""
    if not items:
        return b"\x00"
    return avro_long(len(items)) + b"".join(items) + b"\x00"


def _account_bytes(a: AttemptAccount) -> bytes:
    """Avro body of one ``AttemptAccount`` (enum symbols in schema order)."""
    return (
        avro_string(a.activity_id)
        + avro_string(a.activity_type)
        + avro_long(a.attempt)
        + (b"\x01" if a.is_local else b"\x00")
        + avro_long(_ACCOUNT_INDEX[a.account])
        + avro_string(a.reason)
        + avro_long(_STATUS_INDEX[a.outcome])
    )


_SIGNATURE_KEY = avro_string("signature")
_LONG = range(-(2**63), 2**63)
_INT = range(-(2**31), 2**31)


def _header_bytes(envelope: Envelope) -> bytes | None:
    """The Avro bytes of the envelope's header fields (``version`` through ``deny_count``), as
    fastavro writes them; ``None`` for a value of another type or range than the schema's, which
    is then left to fastavro (its conversions and errors)."""
    e = envelope
    completed = e.completed_at
    strings = (e.workflow_id, e.run_id, e.outcome, *e.parent_workflow_ids)
    longs = (e.started_at,) if completed is None else (e.started_at, completed)
    ints = (len(e.steps), e.allow_count, e.deny_count)
    if (
        any(type(v) is not str for v in strings)
        or any(type(v) is not int or v not in _LONG for v in longs)
        or any(type(v) is not int or v not in _INT for v in ints)
    ):
        return None
    try:
        return b"".join(
            (
                avro_string(ENVELOPE_VERSION),
                avro_string(e.workflow_id),
                avro_string(e.run_id),
                _array(tuple(avro_string(p) for p in e.parent_workflow_ids)),
                avro_long(e.started_at),
                b"\x00" if completed is None else b"\x02" + avro_long(completed),
                avro_string(e.outcome),
                *(avro_long(v) for v in ints),
            )
        )
    except UnicodeEncodeError:
        return None


def _entries_bytes(entries: dict[str, bytes]) -> bytes:
    """An Avro map, in one block, of already encoded entries, in ascending key order."""
    if not entries:
        return b"\x00"
    return avro_long(len(entries)) + b"".join(entries[k] for k in sorted(entries)) + b"\x00"


def _map_bytes(meta: dict[str, str]) -> bytes:
    if not meta:
        return b"\x00"
    encoded = b"".join(avro_string(k) + avro_string(v) for k, v in meta.items())
    return avro_long(len(meta)) + encoded + b"\x00"


def verify_envelope_signature(envelope: Envelope, public_key: bytes) -> bool:
    """True when ``envelope.signature`` is the builder's signature of its canonical bytes."""
    return chio_receipts_native.verify(
        bytes(public_key), envelope.avro_body(signed=False), bytes(envelope.signature)
    )
