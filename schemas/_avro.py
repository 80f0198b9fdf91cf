"""The Avro schemas of ``avro/``, parsed once, their Parsing Canonical Form, and the schemaless
body encoding.

Wire formats (single-object encoding, Confluent framing) build on :func:`encode_body`.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form
from fastavro.types import Schema

__all__ = [
    "SCHEMA_FILES",
    "encode_body",
    "parsed_schema",
    "parsing_canonical_form",
    "raw_schema",
    "standalone_schema",
]

# Parse order matters: later schemas refer to named types of earlier ones.
SCHEMA_FILES: dict[str, str] = {
    "dev.chio.receipts.v1.StepReceipt": "step_receipt.avsc",
    "dev.chio.receipts.v1.StepOutcome": "step_outcome.avsc",
    "dev.chio.receipts.v1.RunCompletion": "run_completion.avsc",
    "dev.chio.receipts.v1.WorkflowReceipt": "workflow_receipt.avsc",
}


@cache
def raw_schema(name: str) -> dict[str, Any]:
    """The JSON of schema ``name`` (full name) as shipped in ``schemas/avro``."""
    text = (
        resources.files("chio_receipts.schemas")
        .joinpath("avro", SCHEMA_FILES[name])
        .read_text("utf-8")
    )
    parsed: dict[str, Any] = json.loads(text)
    return parsed


@cache
def _named() -> dict[str, Any]:
    named: dict[str, Any] = {}
    for name in SCHEMA_FILES:
        fastavro.parse_schema(raw_schema(name), named_schemas=named)
    return named


@cache
def parsed_schema(name: str) -> Schema:
    """Schema ``name`` parsed once by fastavro, with every named type it refers to."""
    named = dict(_named())
    parsed: Schema = fastavro.parse_schema(raw_schema(name), named_schemas=named)
    return parsed


def standalone_schema(name: str) -> dict[str, Any]:
    """Schema ``name`` with every named type of another schema file inlined at first use."""
    defined: set[str] = set()
    others = {n: raw_schema(n) for n in SCHEMA_FILES if n != name}

    def walk(node: Any, ns: str) -> Any:
        if isinstance(node, str):
            full = node if "." in node else f"{ns}.{node}"
            if full in others and full not in defined:
                defined.add(full)
                return walk(copy.deepcopy(others[full]), full.rpartition(".")[0])
            return node
        if isinstance(node, list):
            return [walk(b, ns) for b in node]
        if isinstance(node, dict):
            t = node.get("type")
            if t in ("record", "enum", "fixed"):
                nm = node["name"]
                full = nm if "." in nm else f"{node.get('namespace', ns)}.{nm}"
                defined.add(full)
                ns = full.rpartition(".")[0]
            out = dict(node)
            if t == "record":
                out["fields"] = [{**f, "type": walk(f["type"], ns)} for f in node["fields"]]
            elif t == "array":
                out["items"] = walk(node["items"], ns)
            elif t == "map":
                out["values"] = walk(node["values"], ns)
            elif isinstance(t, dict | list):
                out["type"] = walk(t, ns)
            return out
        return node

    result: dict[str, Any] = walk(copy.deepcopy(raw_schema(name)), "")
    return result


def parsing_canonical_form(schema: Schema) -> str:
    """The Avro spec's Parsing Canonical Form of a schema parsed by fastavro.

    As the spec (and Java's ``SchemaNormalization``) defines it: a named type is written in full
    at its first use and by its full name after that. fastavro's ``to_parsing_canonical_form``
    writes a named type that the schema only refers to (defined by an earlier schema of the same
    ``named_schemas``) as its bare name, so the definitions fastavro kept with the parsed schema
    are inlined first.
    """
    if isinstance(schema, dict):
        named: Mapping[str, Any] = schema.get("__named_schemas") or {}
        schema = _inline_named(schema, named, set())
    return str(to_parsing_canonical_form(schema))


def _inline_named(node: Any, named: Mapping[str, Any], defined: set[str]) -> Any:
    """``node`` (parsed: full names) with each named type written out at its first use."""
    if isinstance(node, str):
        if node in named and node not in defined:
            return _inline_named(named[node], named, defined)
        return node
    if isinstance(node, list):
        return [_inline_named(b, named, defined) for b in node]
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("__")}
    kind = node.get("type")
    if kind in ("record", "error", "enum", "fixed"):
        defined.add(node["name"])  # before the fields: a recursive reference stays a name
    if kind in ("record", "error"):
        out["fields"] = [
            {**f, "type": _inline_named(f["type"], named, defined)} for f in node["fields"]
        ]
    elif kind == "array":
        out["items"] = _inline_named(node["items"], named, defined)
    elif kind == "map":
        out["values"] = _inline_named(node["values"], named, defined)
    elif isinstance(kind, dict | list):
        out["type"] = _inline_named(kind, named, defined)
    return out


def _strip_logical(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_logical(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [_strip_logical(v) for v in node]
    return node


@cache
def _plain_schemas() -> dict[str, Schema]:
    """The schemas without logical types, parsed once: same bytes, no conversion per field."""
    named: dict[str, Any] = {}
    return {
        name: fastavro.parse_schema(_strip_logical(raw_schema(name)), named_schemas=named)
        for name in SCHEMA_FILES
    }


def encode_body(name: str, record: dict[str, Any]) -> bytes:
    """Schemaless Avro encoding of ``record`` with schema ``name``; strict (no extra fields; a
    missing field must have a default).

    Records of plain values (ids as ``str``, timestamps as ``int`` microseconds, as the records
    of this package hold them) are written with the schema stripped of logical types: the bytes
    are identical and the per-field conversion is skipped. A value the plain writer refuses (a
    ``datetime`` or ``UUID``) is written by the logical-type schema, which also raises for a
    record that is wrong.
    """
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, _plain_schemas()[name], record, strict_allow_default=True)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed_schema(name), record, strict_allow_default=True)
    return buf.getvalue()
