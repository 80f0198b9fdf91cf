"""Single-object fingerprints: the Avro spec's Parsing Canonical Form, pinned independently.

The pinned values were printed by Java Avro 1.12.1 (``SchemaNormalization.parsingFingerprint64``,
little-endian as in the single-object header; ``tests/java/AvroDecode.java``, which
``test_java_avro.py`` runs against the broker). This file also rebuilds each canonical form by
hand from the ``.avsc`` files and the spec's transformation rules, with the spec's CRC-64-AVRO,
so neither fastavro nor the package's own inlining is trusted here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

import chio_receipts.schemas as schemas
from chio_receipts.consumers._wire import decode_plain
from tests.support.avro_strategies import sample_envelope, sample_step

pytestmark = pytest.mark.unit

STEP, RUN, ENVELOPE = schemas.STEP_SCHEMA, schemas.RUN_COMPLETION_SCHEMA, schemas.ENVELOPE_SCHEMA
OUTCOME = schemas.STEP_OUTCOME_SCHEMA
AVSC = Path(__file__).resolve().parents[2] / "schemas" / "avro"
FILES = {
    STEP: "step_receipt.avsc",
    OUTCOME: "step_outcome.avsc",
    RUN: "run_completion.avsc",
    ENVELOPE: "workflow_receipt.avsc",
}

# Java Avro 1.12.1, SchemaNormalization.parsingFingerprint64, little-endian.
JAVA_FINGERPRINTS = {
    STEP: "48acd5891234c069",
    OUTCOME: "bf1f0538b35d23d1",
    RUN: "805d9cf57d23e9c1",
    ENVELOPE: "78f2843b056759c5",
}
# Released versions, as Java Avro printed them when each was current.
RELEASED_FINGERPRINTS = {
    "step_receipt.v2": "6468879d1f00e5b2",
    "step_receipt.v3": "dd52140b2d1b51c2",
    "run_completion.v1": "1a1eab650f9f6638",
    "workflow_receipt.v2": "e2da6419c50121d3",
    "workflow_receipt.v3": "f8fcfc5f41602dff",
}
# What WorkflowReceipt envelopes were framed with before (StepReceipt named, not inlined; the
# steps were still StepReceipt v1).
LEGACY_ENVELOPE_FINGERPRINT = "83ee5e1c7642fcd6"

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _crc64_avro(data: bytes) -> bytes:
    """CRC-64-AVRO as the Avro specification gives it (table-driven, little-endian result)."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def _hand_canonical(name: str) -> str:
    """The spec's transformations ([PRIMITIVES], [FULLNAMES], [STRIP], [ORDER], [WHITESPACE]),
    a named type written in full at its first use and by full name after that."""
    definitions: dict[str, dict[str, Any]] = {}
    for file in FILES.values():
        raw = json.loads((AVSC / file).read_text("utf-8"))
        definitions[f"{raw['namespace']}.{raw['name']}"] = raw
    defined: set[str] = set()
    text = json.dumps  # JSON string literals; the schemas are ASCII

    def full_name(node: dict[str, Any], ns: str) -> str:
        nm = str(node["name"])
        return nm if "." in nm else f"{node.get('namespace', ns)}.{nm}"

    def pcf(node: Any, ns: str) -> str:
        if isinstance(node, list):
            return "[" + ",".join(pcf(b, ns) for b in node) + "]"
        if isinstance(node, str):
            if node in _PRIMITIVES:
                return text(node)
            full = node if "." in node else f"{ns}.{node}"
            if full in defined:
                return text(full)
            return pcf(definitions[full], full.rpartition(".")[0])
        kind = node["type"]
        if isinstance(kind, dict | list):
            return pcf(kind, ns)
        if kind in _PRIMITIVES:
            return text(kind)  # logicalType and every other attribute stripped
        if kind == "array":
            return '{"type":"array","items":' + pcf(node["items"], ns) + "}"
        if kind == "map":
            return '{"type":"map","values":' + pcf(node["values"], ns) + "}"
        full = full_name(node, ns)
        if kind not in ("record", "enum", "fixed"):
            return pcf(full, ns)  # a reference written as {"type": "Name"}
        defined.add(full)
        head = '{"name":' + text(full) + ',"type":' + text(kind)
        inner = full.rpartition(".")[0]
        if kind == "record":
            fields = ",".join(
                '{"name":' + text(f["name"]) + ',"type":' + pcf(f["type"], inner) + "}"
                for f in node["fields"]
            )
            return head + ',"fields":[' + fields + "]}"
        if kind == "enum":
            return head + ',"symbols":[' + ",".join(text(s) for s in node["symbols"]) + "]}"
        return head + ',"size":' + str(int(node["size"])) + "}"

    return pcf(name, "")


@pytest.mark.parametrize("name", [STEP, OUTCOME, RUN, ENVELOPE])
def test_canonical_form_and_fingerprint_match_the_spec_and_java(name: str) -> None:
    canonical = _hand_canonical(name)
    assert schemas.parsing_canonical_form(schemas.parsed_schema(name)) == canonical
    assert _crc64_avro(canonical.encode()).hex() == JAVA_FINGERPRINTS[name]
    assert schemas.schema_fingerprint(schemas.parsed_schema(name)).hex() == JAVA_FINGERPRINTS[name]
    framed = schemas.frame(name, b"")
    assert framed[:2] == schemas.SINGLE_OBJECT_MAGIC
    assert framed[2:10].hex() == JAVA_FINGERPRINTS[name]


def test_envelope_canonical_form_inlines_step_receipt_once_at_first_use() -> None:
    canonical = schemas.parsing_canonical_form(schemas.parsed_schema(ENVELOPE))
    assert canonical.count('"name":"dev.chio.receipts.v1.StepReceipt","type":"record"') == 1
    assert canonical.count('"name":"dev.chio.receipts.v1.Verdict","type":"enum"') == 1
    assert '"items":"dev.chio.receipts.v1.StepReceipt"' not in canonical
    # The standalone schema (what the Confluent registry gets) has the same canonical form.
    alone = fastavro.parse_schema(schemas.standalone_schema(ENVELOPE), named_schemas={})
    assert schemas.parsing_canonical_form(alone) == canonical


def _envelope_body() -> bytes:
    step, _ = schemas.sign_receipt(sample_step(), schemas.KeyPair.generate("k"))
    record = sample_envelope(step)
    return schemas.encode_body(ENVELOPE, record)


def _released_schema(envelope: str, step: str) -> Any:
    named: dict[str, Any] = {}
    for file in (step, envelope):
        raw = json.loads((AVSC / "released" / f"{file}.avsc").read_text("utf-8"))
        parsed = fastavro.parse_schema(raw, named_schemas=named)
    return parsed


def _released_envelope(envelope: str, step: str, *, drop: tuple[str, ...]) -> tuple[Any, bytes]:
    """A body written with a released envelope and step schema, and its schema."""
    schema = _released_schema(envelope, step)
    record = sample_envelope(sample_step(chio_receipt="{}", chio_signed=b"x"))
    record["steps"] = [{k: v for k, v in s.items() if k not in drop} for s in record["steps"]]
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return schema, buf.getvalue()


@pytest.mark.parametrize(
    ("release", "step", "drop"),
    [
        ("workflow_receipt.v2", "step_receipt.v2", ("trace_id", "span_id")),
        ("run_completion.v1", None, ()),
        ("step_receipt.v2", None, ("trace_id", "span_id")),
    ],
)
def test_released_versions_keep_their_java_fingerprints_and_still_decode(
    release: str, step: str | None, drop: tuple[str, ...]
) -> None:
    if step is not None:
        schema, body = _released_envelope(release, step, drop=drop)
    else:
        raw = json.loads((AVSC / "released" / f"{release}.avsc").read_text("utf-8"))
        schema = fastavro.parse_schema(raw, named_schemas={})
        sample: dict[str, Any] = (
            {k: v for k, v in sample_step().to_avro().items() if k not in drop}
            if release.startswith("step")
            else _sample_run()
        )
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, sample)
        body = buf.getvalue()
    fp = RELEASED_FINGERPRINTS[release]
    assert schemas.schema_fingerprint(schema).hex() == fp
    decoded = schemas.decode(schemas.SINGLE_OBJECT_MAGIC + bytes.fromhex(fp) + body)
    if release.startswith("workflow"):
        assert decoded.record["outcomes"] == []
        assert decoded.record["attempts"] == []
        assert decoded.record["steps"][0]["chio_receipt"] == "{}"
        assert decoded.record["steps"][0]["trace_id"] == ""
    elif release.startswith("run"):
        assert decoded.record["expected_attempts"] == []
    else:
        assert decoded.record["trace_id"] == ""
        assert decoded.record["span_id"] == ""


def _sample_run() -> dict[str, Any]:
    return {
        "event_id": "0b7c1d9e-4f44-4b8e-a0a3-4c1e4c7a2d11",
        "namespace": "default",
        "workflow_id": "w",
        "run_id": "r",
        "workflow_type": "t",
        "task_queue": "q",
        "outcome": "SUCCESS",
        "started_at": 1,
        "closed_at": 2,
        "parent_workflow_ids": [],
        "source": "WATCHER",
        "emitted_at": 3,
    }


def test_an_envelope_framed_with_the_legacy_fingerprint_still_decodes() -> None:
    # Legacy framing was in use while steps were StepReceipt v1.
    drop = ("chio_receipt", "chio_signed", "trace_id", "span_id")
    _, body = _released_envelope("workflow_receipt.v1", "step_receipt.v1", drop=drop)
    legacy = schemas.SINGLE_OBJECT_MAGIC + bytes.fromhex(LEGACY_ENVELOPE_FINGERPRINT) + body
    old = schemas.decode(legacy)
    assert old.schema_name == ENVELOPE
    assert old.record["steps"][0]["workflow_id"] == old.record["workflow_id"]
    assert old.record["steps"][0]["chio_receipt"] == ""  # v1 steps: resolved to the default
    assert old.record["outcomes"] == []
    plain = decode_plain(legacy)
    assert (plain.schema_name, plain.current) == (ENVELOPE, False)
    current = schemas.frame(ENVELOPE, _envelope_body())
    assert current[2:10].hex() == JAVA_FINGERPRINTS[ENVELOPE]  # new messages: canonical


def test_an_unknown_fingerprint_is_still_refused() -> None:
    with pytest.raises(schemas.UnknownSchema):
        schemas.decode(schemas.SINGLE_OBJECT_MAGIC + b"\x11" * 8 + _envelope_body())
