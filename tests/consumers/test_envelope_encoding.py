"""The envelope's signed bytes against the encoding they replaced (fastavro for the header, the
metadata map encoded twice), kept here as the oracle: byte-identical bodies and signatures."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chio_receipts.consumers._envelope import (
    Envelope,
    _array,
    _map_bytes,
    verify_envelope_signature,
)
from chio_receipts.consumers._wire import ENVELOPE_SCHEMA, encode_plain, read_plain
from chio_receipts.schemas import AccountState, AttemptAccount, KeyPair, StepStatus

pytestmark = pytest.mark.unit

KEY = KeyPair.generate("ed25519-00000000000000bb")


def _oracle_head(e: Envelope) -> bytes:
    return encode_plain(ENVELOPE_SCHEMA, e._header())[:-4] + _array(e.steps)


def _oracle_signed(e: Envelope, key: KeyPair) -> Envelope:
    """``signed_by`` as it was written before the header and the map were encoded by hand."""
    unsigned = replace(e, key_id=key.key_id, signature=b"", encoded=b"")
    head = _oracle_head(unsigned)
    meta = unsigned.metadata(signed=False)
    tail = unsigned._tail()
    signature = key.sign(head + _map_bytes(meta) + tail)
    meta["signature"] = signature.hex()
    encoded = head + _map_bytes(dict(sorted(meta.items()))) + tail
    return replace(unsigned, signature=signature, encoded=encoded)


_text = st.text(max_size=12)
_long = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_count = st.integers(min_value=0, max_value=2**31 - 1)
_accounts = st.lists(
    st.builds(
        AttemptAccount,
        activity_id=_text,
        activity_type=_text,
        attempt=st.integers(min_value=1, max_value=50),
        is_local=st.booleans(),
        account=st.sampled_from(list(AccountState)),
        reason=_text,
        outcome=st.sampled_from(list(StepStatus)),
    ),
    max_size=3,
).map(tuple)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    n = draw(st.integers(min_value=0, max_value=4))
    return Envelope(
        namespace=draw(_text),
        workflow_id=draw(_text),
        run_id=draw(_text),
        workflow_type=draw(_text),
        parent_workflow_ids=tuple(draw(st.lists(_text, max_size=3))),
        started_at=draw(_long),
        completed_at=draw(st.none() | _long),
        outcome=draw(_text),
        revision=draw(st.integers(min_value=0, max_value=99)),
        complete=draw(st.booleans()),
        missing_steps=draw(st.integers(min_value=0, max_value=9)),
        expected_steps=draw(st.none() | st.integers(min_value=0, max_value=9)),
        allow_count=draw(_count),
        deny_count=draw(_count),
        receipt_ids=tuple(f"id-{i}" for i in range(n)),
        steps=tuple(draw(st.binary(max_size=40)) for _ in range(n)),
        chain_root=draw(st.binary(min_size=32, max_size=32)),
        # Extra entries may shadow the fixed ones, "signature" too (the signature wins).
        extra=tuple(
            draw(
                st.dictionaries(
                    st.sampled_from(["outcome_source", "parent_run_id", "revision", "signature"])
                    | _text,
                    _text,
                    max_size=3,
                )
            ).items()
        ),
        attempts=draw(_accounts),
    )


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_signed_envelopes_are_byte_identical_to_the_former_encoding(envelope: Envelope) -> None:
    ours = envelope.signed_by(KEY)
    oracle = _oracle_signed(envelope, KEY)
    assert ours.encoded == oracle.encoded
    assert ours.signature == oracle.signature
    assert ours == oracle
    assert ours.avro_body(signed=False) == oracle.avro_body(signed=False)
    assert verify_envelope_signature(ours, KEY.public_key)


def test_the_header_of_other_types_is_left_to_fastavro() -> None:
    base = Envelope(
        namespace="ns",
        workflow_id="wf",
        run_id="r1",
        workflow_type="W",
        parent_workflow_ids=("p\ud800",),  # not UTF-8: fastavro's own error
        started_at=1,
        completed_at=None,
        outcome="COMPLETED",
        revision=1,
        complete=True,
        missing_steps=0,
        expected_steps=None,
        allow_count=0,
        deny_count=0,
        receipt_ids=(),
        steps=(),
        chain_root=bytes(32),
    )
    with pytest.raises(UnicodeEncodeError):
        _oracle_signed(base, KEY)
    with pytest.raises(UnicodeEncodeError):
        base.signed_by(KEY)
    big = replace(base, parent_workflow_ids=(), started_at=2**63)
    with pytest.raises(OverflowError):
        encode_plain(ENVELOPE_SCHEMA, big._header())
    with pytest.raises(OverflowError):
        big.signed_by(KEY)
    ok = replace(base, parent_workflow_ids=("a", "b"), completed_at=-5)
    record = read_plain(ENVELOPE_SCHEMA, ok.signed_by(KEY).encoded)
    assert (record["parent_workflow_ids"], record["completed_at"]) == (["a", "b"], -5)
