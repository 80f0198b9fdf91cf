"""Validation of OCSF events against the official OCSF JSON Schema of the version they claim.

The schema comes from the ``ocsf-json-schema`` package, which ships the OCSF project's own schema
exports (one per released version, as the OCSF schema server exports them) and turns a class and
a set of profiles into a JSON Schema (draft 2020-12): required attributes, types, enums, type
ranges and patterns, the ``at_least_one``/``just_one`` constraints, and no attributes beyond the
class's own and those of the declared profiles (``additionalProperties: false``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema


@functools.cache
def _ocsf(version: str) -> OcsfJsonSchemaEmbedded:
    return OcsfJsonSchemaEmbedded(get_ocsf_schema(version=version))


@functools.cache
def class_validator(
    version: str, class_uid: int, profiles: tuple[str, ...]
) -> Draft202012Validator:
    """The JSON Schema validator of ``class_uid`` at OCSF ``version`` with ``profiles``."""
    ocsf = _ocsf(version)
    schema = ocsf.get_class_schema(ocsf.lookup_class_name_from_uid(class_uid), list(profiles))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def ocsf_errors(event: Mapping[str, Any]) -> list[str]:
    """Why ``event`` is not valid OCSF (empty when it is): validated against the JSON Schema of
    the class it names, at the version and with the profiles its ``metadata`` declares."""
    metadata = event.get("metadata") or {}
    version = metadata.get("version")
    if not isinstance(version, str):
        return ["metadata.version is missing"]
    profiles = tuple(sorted(metadata.get("profiles") or ()))
    validator = class_validator(version, int(event.get("class_uid", 0)), profiles)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<event>'}: {e.message}"
        for e in sorted(validator.iter_errors(event), key=lambda e: list(map(str, e.path)))
    ]
