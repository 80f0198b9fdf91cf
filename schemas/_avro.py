"""The Avro schemas of ``avro/``, parsed once, and the schemaless body encoding.

Wire formats (single-object encoding, Confluent framing) build on :func:`encode_body`.
"""

from __future__ import annotations

import io
import json
from functools import cache
from importlib import resources
from typing import Any

import fastavro
from fastavro.types import Schema

__all__ = ["SCHEMA_FILES", "encode_body", "parsed_schema", "raw_schema"]

# Parse order matters: later schemas refer to named types of earlier ones.
SCHEMA_FILES: dict[str, str] = {
    "dev.chio.receipts.v1.StepReceipt": "step_receipt.avsc",
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
    """Schemaless Avro encoding of ``record`` with schema ``name``; strict (no extra fields).

    Records of plain values (ids as ``str``, timestamps as ``int`` microseconds, as the records
    of this package hold them) are written with the schema stripped of logical types: the bytes
    are identical and the per-field conversion is skipped. A value the plain writer refuses (a
    ``datetime`` or ``UUID``) is written by the logical-type schema, which also raises for a
    record that is wrong.
    """
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, _plain_schemas()[name], record, strict=True)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed_schema(name), record, strict=True)
    return buf.getvalue()
