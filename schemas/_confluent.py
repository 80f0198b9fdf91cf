"""The Confluent wire format and a codec that reads both wire formats.

Confluent frame: ``00`` + the writer schema's registry id (4 bytes, big-endian) + the schemaless
Avro body. Schemas are registered self-contained (named types they refer to are inlined), under
the subject the registry client's strategy names (TopicNameStrategy, ``<topic>-value``, by
default). Any Confluent-compatible API works: Confluent Schema Registry at its root, Apicurio
Registry at ``/apis/ccompat/v7``.

:class:`Codec` picks the format from the first byte: ``C3`` is single-object (no registry
needed, see ``_codec``), ``00`` is Confluent (writer schema by id from the registry, read with
the current schema of the same name). ``Codec.decode`` is synchronous and only uses schema ids
already cached; ``Codec.decode_async`` fetches unknown ids first.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Literal

import fastavro
from fastavro.types import Schema

from chio_receipts.schemas._avro import (
    SCHEMA_FILES,
    encode_body,
    parsed_schema,
    standalone_schema,
)
from chio_receipts.schemas._codec import SINGLE_OBJECT_MAGIC, Decoded, decode, frame, read_body
from chio_receipts.schemas._errors import EncodeError, UnknownFormat, UnknownSchema
from chio_receipts.schemas._registry import SchemaRegistryClient

__all__ = [
    "CONFLUENT_MAGIC",
    "Codec",
    "WireFormat",
    "confluent_frame",
    "confluent_schema_id",
    "standalone_schema",
]

CONFLUENT_MAGIC = b"\x00"
_ID = struct.Struct(">I")
_HEADER = 1 + _ID.size

WireFormat = Literal["single_object", "confluent"]


def confluent_frame(schema_id: int, body: bytes) -> bytes:
    """Wrap a schemaless body in the Confluent frame."""
    return CONFLUENT_MAGIC + _ID.pack(schema_id) + body


def confluent_schema_id(data: bytes) -> int:
    """The schema id of a Confluent-framed message; :class:`UnknownFormat` if not one."""
    if len(data) < _HEADER or data[:1] != CONFLUENT_MAGIC:
        raise UnknownFormat("not a Confluent-framed message")
    value: int = _ID.unpack_from(data, 1)[0]
    return value


@dataclass(frozen=True, slots=True)
class _Writer:
    reader_name: str
    schema: Schema


class Codec:
    """Encodes in one wire format, decodes both. Without a registry it is single-object only.

    Not thread-safe (caches are plain dicts); one per event loop.
    """

    def __init__(
        self,
        registry: SchemaRegistryClient | None = None,
        *,
        wire_format: WireFormat = "single_object",
    ) -> None:
        if wire_format == "confluent" and registry is None:
            raise ValueError("the Confluent wire format needs a schema registry client")
        self.registry = registry
        self.wire_format = wire_format
        self._ids: dict[tuple[str, str], int] = {}
        self._writers: dict[int, _Writer] = {}

    async def schema_id(self, name: str, topic: str) -> int:
        """Register (once) current schema ``name`` for ``topic``; its registry id."""
        if self.registry is None:
            raise UnknownSchema("no schema registry configured")
        key = (name, topic)
        schema_id = self._ids.get(key)
        if schema_id is None:
            subject = self.registry.subject(topic, name)
            schema_id = await self.registry.register(subject, standalone_schema(name))
            self._ids[key] = schema_id
            self._writers[schema_id] = _Writer(name, parsed_schema(name))
        return schema_id

    async def frame(self, name: str, body: bytes, *, topic: str) -> bytes:
        """Frame an already encoded body (e.g. a signed step body) in this codec's format."""
        if self.wire_format == "single_object":
            return frame(name, body)
        return confluent_frame(await self.schema_id(name, topic), body)

    def frame_known(self, name: str, body: bytes, topic: str) -> bytes:
        """Like :meth:`frame` without I/O: the schema must already be registered for ``topic``
        (call :meth:`schema_id` first); :class:`UnknownSchema` otherwise."""
        if self.wire_format == "single_object":
            return frame(name, body)
        schema_id = self._ids.get((name, topic))
        if schema_id is None:
            raise UnknownSchema(f"{name} is not registered for topic {topic}")
        return confluent_frame(schema_id, body)

    async def encode(self, name: str, record: dict[str, Any], *, topic: str) -> bytes:
        """Encode ``record`` with current schema ``name`` in this codec's format."""
        try:
            body = encode_body(name, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise EncodeError(f"{name}: {exc}") from exc
        return await self.frame(name, body, topic=topic)

    def decode(self, data: bytes) -> Decoded:
        """Decode either format; Confluent ids must already be known (see ``decode_async``)."""
        if data[:1] == SINGLE_OBJECT_MAGIC[:1]:
            return decode(data)
        schema_id = confluent_schema_id(data)
        writer = self._writers.get(schema_id)
        if writer is None:
            raise UnknownSchema(f"schema id {schema_id} is not cached; use decode_async")
        return _read(writer, data[_HEADER:])

    def fetch_blocking(self, data: bytes) -> None:
        """Fetch (blocking) the writer schema of a Confluent-framed ``data`` if it is not cached,
        so :meth:`decode` can read it; a no-op for other messages. For synchronous readers of
        stored messages; consumers use :meth:`decode_async`."""
        if data[:1] != CONFLUENT_MAGIC or len(data) < _HEADER:
            return
        schema_id = confluent_schema_id(data)
        if schema_id in self._writers:
            return
        if self.registry is None:
            raise UnknownSchema(f"schema id {schema_id}: no schema registry configured")
        self._writers[schema_id] = _writer_from(self.registry.get_schema_blocking(schema_id))

    async def decode_async(self, data: bytes) -> Decoded:
        """Decode either format, fetching an unknown Confluent writer schema by id."""
        if data[:1] == CONFLUENT_MAGIC and len(data) >= _HEADER:
            schema_id = confluent_schema_id(data)
            if schema_id not in self._writers:
                if self.registry is None:
                    raise UnknownSchema(f"schema id {schema_id}: no schema registry configured")
                self._writers[schema_id] = _writer_from(await self.registry.get_schema(schema_id))
        return self.decode(data)


def _writer_from(schema: dict[str, Any]) -> _Writer:
    name = schema.get("name", "") if isinstance(schema, dict) else ""
    full = name if "." in name else f"{schema.get('namespace', '')}.{name}"
    if full not in SCHEMA_FILES:
        raise UnknownSchema(f"registry schema {full!r} is not a schema this codec reads")
    try:
        parsed = fastavro.parse_schema(schema, named_schemas={})
    except Exception as exc:  # fastavro raises several unrelated types for a bad schema
        raise UnknownSchema(f"registry schema {full!r} does not parse: {exc}") from exc
    return _Writer(full, parsed)


def _read(writer: _Writer, body: bytes) -> Decoded:
    return read_body(writer.reader_name, writer.schema, body)
