"""Avro schema-resolution compatibility check (pure): can a reader schema read a writer's data?

Backward compatibility of a schema change = the new schema (reader) reads data written with the
previous released one (writer). The rules are the Avro specification's "Schema Resolution":
records match by name, a reader field missing from the writer needs a default, writer fields the
reader lacks are skipped, enum symbols the reader lacks need a reader default, numeric
promotions (int -> long/float/double, long -> float/double, float -> double) and string <-> bytes
are allowed, unions resolve branch by branch. Logical types are ignored (their underlying types
decide). Named types referred to by name are looked up among the schemas passed in ``named``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

__all__ = ["check_backward", "incompatibilities", "released_schemas"]

_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}


def _collect(schema: Any, namespace: str, names: dict[str, Any]) -> None:
    """Register every named type of ``schema`` under its full name."""
    if isinstance(schema, list):
        for branch in schema:
            _collect(branch, namespace, names)
        return
    if not isinstance(schema, dict):
        return
    t = schema.get("type")
    if t in ("record", "error", "enum", "fixed"):
        ns = schema.get("namespace", namespace)
        name = schema["name"]
        full = name if "." in name else (f"{ns}.{name}" if ns else name)
        names.setdefault(full, {**schema, "_full": full, "_ns": full.rpartition(".")[0]})
        if t in ("record", "error"):
            for f in schema.get("fields", []):
                _collect(f["type"], full.rpartition(".")[0], names)
    elif t == "array":
        _collect(schema["items"], namespace, names)
    elif t == "map":
        _collect(schema["values"], namespace, names)
    elif isinstance(t, dict | list):
        _collect(t, namespace, names)


class _Resolver:
    def __init__(self, reader_names: Mapping[str, Any], writer_names: Mapping[str, Any]) -> None:
        self.r_names = reader_names
        self.w_names = writer_names
        self.problems: list[str] = []
        self._active: set[tuple[str, str]] = set()

    def _deref(self, schema: Any, ns: str, names: Mapping[str, Any]) -> Any:
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            full = schema if "." in schema else (f"{ns}.{schema}" if ns else schema)
            if full in names:
                return names[full]
            if schema in names:
                return names[schema]
            self.problems.append(f"unknown named type {schema!r}")
            return "null"
        if isinstance(schema, dict) and schema.get("type") in _PRIMITIVES:
            return schema["type"]
        if isinstance(schema, dict) and isinstance(schema.get("type"), dict | list):
            return self._deref(schema["type"], ns, names)
        if isinstance(schema, dict) and schema.get("type") in ("record", "error", "enum", "fixed"):
            # A named type declared inline (an array's items): the registered copy knows its
            # namespace, which the names its fields refer to are resolved in.
            name = str(schema.get("name", ""))
            full = name if "." in name else f"{schema.get('namespace', ns)}.{name}"
            return names.get(full, schema)
        return schema

    @staticmethod
    def _kind(schema: Any) -> str:
        if isinstance(schema, str):
            return schema
        if isinstance(schema, list):
            return "union"
        kind: str = schema["type"]
        return "record" if kind == "error" else kind

    def matches(self, reader: Any, writer: Any, path: str, r_ns: str, w_ns: str) -> bool:
        """True when reader can read writer; records problems under ``path``."""
        reader = self._deref(reader, r_ns, self.r_names)
        writer = self._deref(writer, w_ns, self.w_names)
        rk, wk = self._kind(reader), self._kind(writer)
        if wk == "union":
            ok = True
            for i, branch in enumerate(writer):
                ok &= self.matches(reader, branch, f"{path}|{i}", r_ns, w_ns)
            return ok
        if rk == "union":
            # Pick the first reader branch that matches (without recording the failed tries).
            for branch in reader:
                trial = _Resolver(self.r_names, self.w_names)
                trial._active = set(self._active)
                if trial.matches(branch, writer, path, r_ns, w_ns) and not trial.problems:
                    return True
            self.problems.append(f"{path}: no branch of the reader union reads writer type {wk}")
            return False
        if rk in _PRIMITIVES or wk in _PRIMITIVES:
            if rk == wk or rk in _PROMOTIONS.get(wk, set()):
                return True
            self.problems.append(f"{path}: reader type {rk} cannot read writer type {wk}")
            return False
        if rk != wk:
            self.problems.append(f"{path}: reader type {rk} cannot read writer type {wk}")
            return False
        if rk == "array":
            return self.matches(reader["items"], writer["items"], f"{path}[]", r_ns, w_ns)
        if rk == "map":
            return self.matches(reader["values"], writer["values"], f"{path}{{}}", r_ns, w_ns)
        r_name = reader.get("_full", reader.get("name", ""))
        w_name = writer.get("_full", writer.get("name", ""))
        if r_name.rpartition(".")[2] != w_name.rpartition(".")[2] and w_name not in (
            reader.get("aliases") or []
        ):
            self.problems.append(f"{path}: reader {r_name} cannot read writer {w_name} (names)")
            return False
        if rk == "fixed":
            if reader["size"] != writer["size"]:
                self.problems.append(f"{path}: fixed size {writer['size']} -> {reader['size']}")
                return False
            return True
        if rk == "enum":
            missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
            if missing and "default" not in reader:
                self.problems.append(
                    f"{path}: writer enum symbols {missing} unknown to the reader, no default"
                )
                return False
            return True
        return self._record(reader, writer, path)

    def _record(self, reader: Any, writer: Any, path: str) -> bool:
        key = (reader.get("_full", ""), writer.get("_full", ""))
        if key in self._active:
            return True  # recursive type: already being checked
        self._active.add(key)
        r_ns, w_ns = reader.get("_ns", ""), writer.get("_ns", "")
        w_fields = {f["name"]: f for f in writer.get("fields", [])}
        ok = True
        for rf in reader.get("fields", []):
            wf = w_fields.get(rf["name"])
            if wf is None:
                wf = next((w_fields[a] for a in rf.get("aliases", []) if a in w_fields), None)
            fpath = f"{path}.{rf['name']}"
            if wf is None:
                if "default" not in rf:
                    self.problems.append(f"{fpath}: new field without a default")
                    ok = False
                continue
            ok &= self.matches(rf["type"], wf["type"], fpath, r_ns, w_ns)
        self._active.discard(key)
        return ok


def incompatibilities(
    reader: Mapping[str, Any],
    writer: Mapping[str, Any],
    *,
    named: Iterable[Mapping[str, Any]] = (),
    writer_named: Iterable[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Problems that stop ``reader`` from reading data written with ``writer`` ([] = compatible).

    ``named`` are further schemas whose named types the reader (and, unless ``writer_named`` is
    given, the writer) may refer to by name.
    """
    named = list(named)
    r_names: dict[str, Any] = {}
    w_names: dict[str, Any] = {}
    _collect(dict(reader), "", r_names)
    _collect(dict(writer), "", w_names)
    for extra in named:
        _collect(dict(extra), "", r_names)
    for extra in named if writer_named is None else list(writer_named):
        _collect(dict(extra), "", w_names)
    resolver = _Resolver(r_names, w_names)
    resolver.matches(
        r_names.get(_full_name(reader), dict(reader)),
        w_names.get(_full_name(writer), dict(writer)),
        str(reader.get("name", "root")),
        str(reader.get("namespace", "")),
        str(writer.get("namespace", "")),
    )
    return resolver.problems


def _full_name(schema: Mapping[str, Any]) -> str:
    name = str(schema.get("name", ""))
    ns = str(schema.get("namespace", ""))
    return name if "." in name or not ns else f"{ns}.{name}"


def check_backward(
    new: Mapping[str, Any], old: Mapping[str, Any], *, named: Iterable[Mapping[str, Any]] = ()
) -> bool:
    """True when ``new`` (reader) reads everything written with ``old`` (writer)."""
    return not incompatibilities(new, old, named=named)


def released_schemas() -> dict[str, dict[str, Any]]:
    """Full name -> JSON of every released schema kept in ``avro/released/`` (newest file wins
    when several versions of one name are kept: files sort by name, ``.v2`` after ``.v1``)."""
    out: dict[str, dict[str, Any]] = {}
    folder = resources.files("chio_receipts.schemas").joinpath("avro", "released")
    if not folder.is_dir():
        return out
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".avsc"):
            raw = json.loads(item.read_text("utf-8"))
            out[f"{raw.get('namespace', '')}.{raw['name']}"] = raw
    return out
