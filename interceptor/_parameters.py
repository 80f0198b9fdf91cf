"""The parameters of an activity call as a Chio receipt signs them: ``{"args": [...]}``.

Each argument is converted by Temporal's payload converter (the worker's, or the default JSON
converter) and read back as the JSON value it encodes, so the receipt holds what the activity
received on the wire. When an argument has no JSON form (a binary payload, a custom encoding,
NaN, an integer beyond the kernel's safe range) or the whole value is larger than
:data:`MAX_PARAMETER_BYTES`, the parameters are ``{"args_digest": <HMAC digest>}`` instead: the
attempt is never failed for its parameters' sake, and nothing of them is logged or raised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Final

import temporalio.converter

from chio_receipts.interceptor._digest import (
    ArgumentKey,
    argument_digest,
    frame_plain_json,
    plain_json_data,
)
from chio_receipts.schemas import ChioWireError, canonical_json, parameter_hash

__all__ = ["MAX_PARAMETER_BYTES", "activity_parameters", "call_parameters"]

MAX_PARAMETER_BYTES: Final = 32 * 1024
"""Above this size (canonical JSON) the parameters travel as their digest only: a sidecar
bounds its request bodies (64 KiB by default for ours), and an attempt must not fail for it."""

# Payload encodings whose data is JSON text, and the one that stands for None.
_JSON_ENCODINGS: Final = frozenset({b"json/plain", b"json/protobuf"})
_NULL_ENCODING: Final = b"binary/null"


def activity_parameters(
    args: Sequence[Any],
    digest: str,
    converter: temporalio.converter.PayloadConverter | None = None,
) -> dict[str, Any]:
    """``{"args": [<each argument as JSON>]}``, or ``{"args_digest": digest}`` when an argument
    has no JSON form or the parameters exceed :data:`MAX_PARAMETER_BYTES`."""
    return _checked(_json_arguments(args, converter), digest)[0]


def call_parameters(
    key: ArgumentKey,
    args: Sequence[Any],
    converter: temporalio.converter.PayloadConverter | None = None,
) -> tuple[str, dict[str, Any], str]:
    """The gate's view of one call: ``(argument digest, parameters, parameter hash)``.

    :func:`argument_digest`, :func:`activity_parameters` and ``parameter_hash`` of the
    parameters, with each plain JSON argument encoded once for both the digest and the
    parameters (Temporal's default converter writes exactly those bytes) and the parameters
    canonicalized once for both their size check and their hash.
    """
    data = plain_json_data(args) if converter is None else None
    if data is None:
        digest = argument_digest(key, args, converter)
        values = _json_arguments(args, converter)
    else:
        digest = key.hexdigest(frame_plain_json(data))
        try:
            values = [json.loads(item) for item in data]
        except (ValueError, RecursionError):
            values = None
    parameters, canonical = _checked(values, digest)
    if canonical is None:
        return digest, parameters, parameter_hash(parameters)
    return digest, parameters, hashlib.sha256(canonical).hexdigest()


def _checked(values: list[Any] | None, digest: str) -> tuple[dict[str, Any], bytes | None]:
    """The parameters of ``values`` with their canonical JSON, or the digest's (and None)."""
    if values is not None:
        parameters: dict[str, Any] = {"args": values}
        try:
            # The kernel reads parameters strictly: integers within 2^53, no NaN or Infinity.
            canonical = canonical_json(parameters, safe_integers=True)
        except ChioWireError:
            canonical = None
        if canonical is not None and len(canonical) <= MAX_PARAMETER_BYTES:
            return parameters, canonical
    return {"args_digest": digest}, None


def _json_arguments(
    args: Sequence[Any], converter: temporalio.converter.PayloadConverter | None
) -> list[Any] | None:
    conv = converter or temporalio.converter.default().payload_converter
    try:
        payloads = conv.to_payloads(list(args))
    except Exception:  # noqa: BLE001 - any converter failure means "no JSON form", never fatal
        return None
    values: list[Any] = []
    for payload in payloads:
        encoding = payload.metadata.get("encoding", b"")
        if encoding == _NULL_ENCODING:
            values.append(None)
            continue
        if encoding not in _JSON_ENCODINGS:
            return None
        try:
            values.append(json.loads(payload.data))
        except (ValueError, RecursionError):
            return None
    return values
