"""Codec properties, schema evolution, the released-schema compatibility gate, and the
Confluent wire format with its registry client (HTTP contract against an httpx MockTransport)."""

from __future__ import annotations

import copy
import io
import json
import struct
from typing import Any

import fastavro
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chio_receipts.schemas as schemas
from tests.support.avro_strategies import normalize, sample_run, sample_step, strategy
from tests.support.registry import FakeRegistry

pytestmark = pytest.mark.unit

STEP = schemas.STEP_SCHEMA
RUN = "dev.chio.receipts.v1.RunCompletion"
ENVELOPE = "dev.chio.receipts.v1.WorkflowReceipt"
ALL = list(schemas.SCHEMA_FILES)


def _raw_all() -> list[dict[str, Any]]:
    return [schemas.raw_schema(n) for n in ALL]


# -- properties of the single-object codec ----------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_decode_encode_round_trip_of_every_schema(name: str) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy(schemas.raw_schema(name)))
    def check(record: dict[str, Any]) -> None:
        data = schemas.encode(name, record)
        decoded = schemas.decode(data)
        assert decoded.schema_name == name
        assert normalize(decoded.record) == normalize(record)
        assert schemas.frame(name, decoded.body) == data

    check()


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: schemas.frame(STEP, b)),
        st.binary(max_size=200).map(lambda b: schemas.frame(RUN, b)),
        st.binary(max_size=200).map(lambda b: schemas.frame(ENVELOPE, b)),
    )
)
def test_arbitrary_bytes_decode_or_raise_the_codecs_own_error(data: bytes) -> None:
    codec = schemas.Codec()
    for decode in (schemas.decode, codec.decode):
        try:
            decoded = decode(data)
        except schemas.DecodeError:
            continue
        assert decoded.schema_name in schemas.SCHEMA_FILES
        assert isinstance(decoded.record, dict)


def test_absurd_lengths_and_truncation_are_typed_errors() -> None:
    record = {
        "version": "chio-temporal/v1",
        "workflow_id": "w",
        "run_id": "r",
        "parent_workflow_ids": [],
        "started_at": 1,
        "completed_at": None,
        "outcome": "success",
        "step_count": 0,
        "allow_count": 0,
        "deny_count": 0,
        "steps": [],
        "metadata": {},
    }
    data = schemas.encode(ENVELOPE, record)
    for bad in (
        data[:-1],
        data[:11],
        data + b"\x00",
        schemas.frame(ENVELOPE, b"\xfe\xff\xff\xff\x0f"),
    ):
        with pytest.raises(schemas.DecodeError):
            schemas.decode(bad)


# -- evolution ---------------------------------------------------------------------------------


def _v2_step() -> dict[str, Any]:
    v2 = copy.deepcopy(schemas.raw_schema(STEP))
    v2["fields"].insert(-1, {"name": "tenant", "type": "string", "default": "", "doc": "v2 field"})
    return v2


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy(schemas.raw_schema(STEP)), st.text(max_size=10))
def test_v1_reader_reads_v2_writer_and_v2_reader_reads_v1_writer(
    record: dict[str, Any], tenant: str
) -> None:
    v1 = schemas.parsed_schema(STEP)
    v2 = fastavro.parse_schema(_v2_step(), named_schemas={})
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, v2, {**record, "tenant": tenant}, strict=True)
    old = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), v2, v1)
    assert normalize(old) == normalize(record)

    new = fastavro.schemaless_reader(io.BytesIO(schemas.encode(STEP, record)[10:]), v1, v2)
    assert new["tenant"] == ""
    assert normalize({k: v for k, v in new.items() if k != "tenant"}) == normalize(record)


def test_compatibility_checker_accepts_defaults_and_rejects_breaking_changes() -> None:
    v1 = schemas.raw_schema(STEP)
    v2 = _v2_step()
    assert schemas.check_backward(v2, v1)  # new reader, old data
    assert schemas.check_backward(v1, v2)  # old reader skips the new field
    v3 = copy.deepcopy(v1)
    v3["fields"].insert(-1, {"name": "tenant", "type": "string"})
    assert schemas.incompatibilities(v3, v1) == ["StepReceipt.tenant: new field without a default"]
    v4 = copy.deepcopy(schemas.raw_schema(RUN))
    next(f for f in v4["fields"] if f["name"] == "closed_at")["type"] = "int"
    assert any("closed_at" in p for p in schemas.incompatibilities(v4, schemas.raw_schema(RUN)))
    v5 = copy.deepcopy(v1)
    verdict = next(f for f in v5["fields"] if f["name"] == "verdict")["type"]
    del verdict["default"]
    widened = copy.deepcopy(v1)
    next(f for f in widened["fields"] if f["name"] == "verdict")["type"]["symbols"].append("HOLD")
    assert schemas.incompatibilities(v5, widened)  # unknown symbol, no default to fall back on
    assert schemas.check_backward(v1, widened)  # default UNKNOWN absorbs it


def test_every_current_schema_is_backward_compatible_with_its_released_version() -> None:
    """The CI gate: a change to an .avsc that old data cannot be read through fails here."""
    released = schemas.released_schemas()
    assert set(released) == set(schemas.SCHEMA_FILES)
    for name in schemas.SCHEMA_FILES:
        problems = schemas.incompatibilities(
            schemas.raw_schema(name),
            released[name],
            named=_raw_all(),
            writer_named=list(released.values()),
        )
        assert problems == [], f"{name} breaks backward compatibility: {problems}"


def test_released_writer_decodes_through_the_single_object_codec() -> None:
    released = schemas.released_schemas()[RUN]
    parsed = fastavro.parse_schema(released, named_schemas={})
    record = {
        "event_id": "0190a0a0-0000-7000-8000-000000000001",
        "namespace": "n",
        "workflow_id": "w",
        "run_id": "r",
        "workflow_type": "T",
        "task_queue": "q",
        "outcome": "TERMINATED",
        "started_at": 1,
        "closed_at": 2,
        "parent_workflow_ids": [],
        "source": "WATCHER",
        "emitted_at": 3,
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    data = schemas.SINGLE_OBJECT_MAGIC + schemas.schema_fingerprint(parsed) + buf.getvalue()
    assert schemas.decode(data).record["outcome"] == "TERMINATED"


# -- Confluent wire format and the registry client --------------------------------------------


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def _client(fake: FakeRegistry, **kw: Any) -> schemas.SchemaRegistryClient:
    return schemas.SchemaRegistryClient(
        "http://registry.test", transport=httpx.MockTransport(fake.handler), **kw
    )


def test_subject_strategies() -> None:
    s = schemas.SubjectStrategy
    assert schemas.subject_name(s.TOPIC, "t", "a.B") == "t-value"
    assert schemas.subject_name(s.RECORD, "t", "a.B") == "a.B"
    assert schemas.subject_name(s.TOPIC_RECORD, "t", "a.B") == "t-a.B"


def test_standalone_schema_inlines_referenced_types_and_parses_alone() -> None:
    env = schemas.standalone_schema(ENVELOPE)
    text = json.dumps(env)
    assert '"name": "StepReceipt"' in text
    fastavro.parse_schema(env, named_schemas={})


async def test_registry_register_lookup_compatibility_and_caching(fake: FakeRegistry) -> None:
    async with _client(fake) as registry:
        subject = registry.subject("steps", STEP)
        assert subject == "steps-value"  # TopicNameStrategy by default
        sid = await registry.register(subject, schemas.standalone_schema(STEP))
        assert await registry.register(subject, schemas.standalone_schema(STEP)) == sid
        assert fake.requests.count(f"POST /subjects/{subject}/versions") == 1
        assert (await registry.get_schema(sid))["name"] == "StepReceipt"
        assert await registry.is_compatible(subject, _v2_step())
        broken = copy.deepcopy(schemas.raw_schema(STEP))
        broken["fields"].append({"name": "x", "type": "int"})
        assert not await registry.is_compatible(subject, broken)
        assert await registry.is_compatible("no-such-subject", broken)
        with pytest.raises(schemas.UnknownSchema):
            await registry.get_schema(999)
        fake.fail_next = 500
        with pytest.raises(schemas.RegistryError) as err:
            await registry.register("other", schemas.standalone_schema(RUN))
        assert err.value.status == 500
        assert err.value.retriable


async def test_registry_unreachable_is_a_registry_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with schemas.SchemaRegistryClient(
        "http://registry.test", transport=httpx.MockTransport(refuse)
    ) as registry:
        with pytest.raises(schemas.RegistryError):
            await registry.get_schema(1)


async def test_codec_reads_both_formats_and_resolves_a_v2_writer_by_id(
    fake: FakeRegistry,
) -> None:
    record = sample_run().to_avro()
    async with _client(fake) as registry:
        confluent = schemas.Codec(registry, wire_format="confluent")
        data = await confluent.encode(RUN, record, topic="runs")
        assert data[0] == 0
        sid = schemas.confluent_schema_id(data)
        assert normalize(confluent.decode(data).record) == normalize(record)

        reader = schemas.Codec(_client(fake))  # fresh: ids unknown until fetched
        with pytest.raises(schemas.UnknownSchema):
            reader.decode(data)
        assert normalize((await reader.decode_async(data)).record) == normalize(record)
        single = schemas.encode(RUN, record)
        assert normalize(reader.decode(single).record) == normalize(record)

        # A v2 writer registered by someone else is read with the current (v1) schema.
        v2 = copy.deepcopy(schemas.standalone_schema(STEP))
        v2["fields"].insert(-1, {"name": "tenant", "type": "string", "default": ""})
        v2_id = await registry.register("steps-v2", v2)
        step = sample_step().to_avro()
        buf = io.BytesIO()
        fastavro.schemaless_writer(
            buf, fastavro.parse_schema(v2, named_schemas={}), {**step, "tenant": "acme"}
        )
        framed = schemas.confluent_frame(v2_id, buf.getvalue())
        decoded = await reader.decode_async(framed)
        assert decoded.schema_name == STEP
        assert normalize(decoded.record) == normalize(step)
        assert sid != v2_id

        with pytest.raises(schemas.UnknownSchema):
            await reader.decode_async(schemas.confluent_frame(4242, b"\x00"))
        with pytest.raises(schemas.MalformedBody):
            await reader.decode_async(schemas.confluent_frame(sid, b"\xff"))
        with pytest.raises(schemas.UnknownFormat):
            await reader.decode_async(b"\x07junk")
        assert struct.unpack(">I", data[1:5])[0] == sid


def test_confluent_codec_needs_a_registry() -> None:
    with pytest.raises(ValueError, match="registry"):
        schemas.Codec(wire_format="confluent")
